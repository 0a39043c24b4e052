"""Many fake vqscope back-ends from one recording, for the exporter's
benchmark (tests/bench/bench_exporter.py): one process listening on COUNT
Unix sockets ``DIR/N.introspect`` (N = 1..COUNT) that speaks the
introspection protocol (inspector/introspect/__init__.py: newline-delimited
JSON, one reply line per request line) and never touches a ring.

- ``snapshot``: the recorded snapshots (``--recording``, one snapshot JSON
  object a line, as ``vqscope snapshot --json`` prints it; without chains
  and with ``chains_omitted`` when asked with ``"chains": false``, as the
  exporter asks) in turn, socket N
  starting at snapshot N mod len(recording) so the 64 back-ends differ; each
  reply with ``time`` set to now, ``source`` renamed ``vqscope serve DIR/N``
  and ``pid`` this process's. When a socket has played the whole recording
  it starts it again one lap on: every queue's counters (kicks, calls,
  calls_suppressed, packets, bytes, dropped) and its ring indices
  (avail_idx, used_idx, last_avail_idx, shadow_avail_idx; mod 2^16, all by
  the same step so inflight is unchanged) are moved on by what the whole
  recording moved them plus one step, so counters never go backwards and
  indices keep moving.
- ``events``: ``{"next": 0, "head": 0, "dropped": 0, "gap": 0, "events": [],
  "instance": I}`` (no events: the exporter's event path is idle).
- ``messages``: ``{"messages": [], "next": 0, "instance": I}``.
- anything else: ``{"error": "..."}``, the connection stays open.

Cost: each lap's snapshot bodies (everything but ``time`` and ``source``) are
JSON-encoded once and shared by all sockets; a reply is a 60-byte head
(``time``, ``source``) followed by that body, written with sendmsg. The
process's own CPU time is printed by the bench (``replay_cpu_pct``) to show
it is not the bottleneck.

Prints ``ready N`` on stdout once every socket listens; runs until SIGTERM
or SIGINT, then removes its sockets.

  python tests/bench/replay_backends.py --recording REC.jsonl --dir DIR [--count 64]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import sys
import time

#: Per-queue counters (cumulative) moved on each lap.
COUNTERS = ("kicks", "calls", "calls_suppressed", "packets", "bytes", "dropped")
#: Split-ring indices (free-running mod 2^16) moved on each lap, all by the used_idx step.
INDICES = ("avail_idx", "used_idx", "last_avail_idx", "shadow_avail_idx")
MAX_REQUEST = 64 * 1024
#: Laps whose encoded bodies are kept (sockets are at most one lap apart).
KEEP_LAPS = 3


def load_recording(path: str) -> list[dict]:
    """The snapshots of a recording file (one JSON object a line);
    SystemExit when there are fewer than 2 or one has no queues."""
    with open(path, encoding="utf-8") as f:
        snaps = [json.loads(line) for line in f if line.strip()]
    if len(snaps) < 2:
        raise SystemExit(f"replay_backends: {path}: {len(snaps)} snapshots, need at least 2")
    for k, s in enumerate(snaps):
        if not isinstance(s, dict) or not s.get("queues"):
            raise SystemExit(f"replay_backends: {path}: snapshot {k + 1} has no queues")
    return snaps


class Recording:
    """The recording as encoded reply bodies: ``body(k, lap)`` is snapshot k
    moved on ``lap`` laps, without ``time`` and ``source`` (the bytes after
    the head's last field, from ``"pid"`` to the closing brace and newline)."""

    def __init__(self, snaps: list[dict]):
        self.snaps = snaps
        self.n = len(snaps)
        first, last = snaps[0]["queues"], snaps[-1]["queues"]
        self.steps: list[dict[str, int]] = []   # per queue position: field -> step per lap
        for qi, q0 in enumerate(first):
            q1 = last[qi] if qi < len(last) else q0
            step = {}
            for f in COUNTERS:
                if isinstance(q0.get(f), int) and isinstance(q1.get(f), int):
                    # the whole recording's move plus one (average) step between snapshots
                    step[f] = max(0, (q1[f] - q0[f]) * self.n // (self.n - 1))
            if isinstance(q0.get("used_idx"), int) and isinstance(q1.get("used_idx"), int):
                span = (q1["used_idx"] - q0["used_idx"]) % 65536
                step["_idx"] = span * self.n // (self.n - 1)
            self.steps.append(step)
        self._cache: dict[tuple[int, int], bytes] = {}

    def body(self, k: int, lap: int, chains: bool = True) -> bytes:
        key = (k, lap, chains)
        b = self._cache.get(key)
        if b is None:
            if len(self._cache) >= 2 * KEEP_LAPS * self.n:
                for old in [x for x in self._cache if x[1] < lap - 1]:
                    del self._cache[old]
            b = self._cache[key] = self._encode(self.snaps[k], lap, chains)
        return b

    def _encode(self, snap: dict, lap: int, chains: bool = True) -> bytes:
        out = {k: v for k, v in snap.items() if k not in ("time", "source")}
        out["pid"] = os.getpid()
        if not chains:   # the introspection op's "chains": false (the exporter asks so)
            out["queues"] = [{**q, "chains": []} for q in snap["queues"]]
            out["chains_omitted"] = True
            snap = out
        if lap:
            queues = []
            for qi, q in enumerate(snap["queues"]):
                step = self.steps[qi] if qi < len(self.steps) else {}
                q = dict(q)
                for f in COUNTERS:
                    if f in step and isinstance(q.get(f), int):
                        q[f] += step[f] * lap
                if "_idx" in step and q.get("layout", "split") == "split":
                    for f in INDICES:
                        if isinstance(q.get(f), int):
                            q[f] = (q[f] + step["_idx"] * lap) % 65536
                queues.append(q)
            out["queues"] = queues
        # the head ends with `"source": "...", ` -- the body continues the object
        return json.dumps(out, separators=(",", ":"))[1:].encode() + b"\n"


class Conn:
    """One reader's connection: its request bytes and the reply bytes not yet sent."""

    __slots__ = ("sock", "inbuf", "out", "name")

    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.inbuf = b""
        self.out: list[memoryview] = []
        self.name = name


class ReplayServer:
    """COUNT listening sockets in ``directory`` served from one selector."""

    def __init__(self, rec: Recording, directory: str, count: int):
        self.rec = rec
        self.sel = selectors.DefaultSelector()
        self.paths: list[str] = []
        self.instance = f"replay-{os.getpid()}".encode()
        self.next_snapshot: dict[str, int] = {}   # per socket name: the next snapshot number (all laps)
        ev = json.dumps({"next": 0, "head": 0, "dropped": 0, "gap": 0, "events": [],
                         "instance": self.instance.decode()}, separators=(",", ":"))
        self.events_reply = ev.encode() + b"\n"
        self.messages_reply = json.dumps({"messages": [], "next": 0, "instance": self.instance.decode()},
                                         separators=(",", ":")).encode() + b"\n"
        self.snapshots_served = 0
        for n in range(1, count + 1):
            path = os.path.join(directory, f"{n}.introspect")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ls.bind(path)
            os.chmod(path, 0o600)
            ls.listen(16)
            ls.setblocking(False)
            self.paths.append(path)
            name = os.path.join(directory, str(n))
            self.next_snapshot[name] = n % rec.n
            self.sel.register(ls, selectors.EVENT_READ, ("listen", name))

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()
        for p in self.paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def serve(self, stop) -> None:
        while not stop():
            for key, mask in self.sel.select(0.5):
                kind, obj = key.data
                if kind == "listen":
                    self._accept(key.fileobj, obj)
                else:
                    if mask & selectors.EVENT_READ:
                        self._read(obj)
                    if mask & selectors.EVENT_WRITE and obj.sock.fileno() >= 0:
                        self._flush(obj)

    def _accept(self, ls: socket.socket, name: str) -> None:
        try:
            s, _ = ls.accept()
        except BlockingIOError:
            return
        s.setblocking(False)
        c = Conn(s, name)
        self.sel.register(s, selectors.EVENT_READ, ("conn", c))

    def _drop(self, c: Conn) -> None:
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _read(self, c: Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(c)
            return
        if not data:
            self._drop(c)
            return
        c.inbuf += data
        while b"\n" in c.inbuf:
            line, c.inbuf = c.inbuf.split(b"\n", 1)
            self._answer(c, line)
        if len(c.inbuf) > MAX_REQUEST:
            self._drop(c)
            return
        if c.out:
            self._flush(c)

    def _answer(self, c: Conn, line: bytes) -> None:
        try:
            req = json.loads(line)
            op = req.get("op")
        except (ValueError, AttributeError):
            req, op = {}, None
        if op == "snapshot":
            i = self.next_snapshot[c.name]
            self.next_snapshot[c.name] = i + 1
            lap, k = divmod(i, self.rec.n)
            head = b'{"time":%.6f,"source":%s,' % (time.time(), json.dumps(f"vqscope serve {c.name}").encode())
            c.out += [memoryview(head), memoryview(self.rec.body(k, lap, req.get("chains", True) is not False))]
            self.snapshots_served += 1
        elif op == "events":
            c.out.append(memoryview(self.events_reply))
        elif op == "messages":
            c.out.append(memoryview(self.messages_reply))
        else:
            c.out.append(memoryview(json.dumps({"error": f"replay_backends: no op {op!r}"}).encode() + b"\n"))

    def _flush(self, c: Conn) -> None:
        while c.out:
            try:
                n = c.sock.sendmsg(c.out[:64])
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    self._drop(c)
                    return
                break
            while n and c.out:
                if n >= len(c.out[0]):
                    n -= len(c.out.pop(0))
                else:
                    c.out[0] = c.out[0][n:]
                    n = 0
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        try:
            self.sel.modify(c.sock, want, ("conn", c))
        except (KeyError, ValueError):
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recording", required=True, help="snapshot JSON lines (vqscope snapshot --json, one a line)")
    ap.add_argument("--dir", required=True, help="directory for the sockets N.introspect")
    ap.add_argument("--count", type=int, default=64, help="sockets (back-ends) to serve (default 64)")
    args = ap.parse_args()
    rec = Recording(load_recording(args.recording))
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    srv = ReplayServer(rec, args.dir, args.count)
    try:
        print(f"ready {args.count}", flush=True)
        srv.serve(lambda: bool(stopping))
    finally:
        srv.close()
        print(f"replay_backends: served {srv.snapshots_served} snapshots", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
