"""Soak: ``vqscope serve net --loopback`` under DPDK load with the TUI attached.

dpdk-testpmd (a virtio-user port, io forwarding, ``start tx_first``: a burst
of frames circulates through the back-end's loopback as fast as both go)
drives the back-end for SOAK_SECONDS (default 600); the real
``vqscope tui --connect SOCK`` runs on a pseudo-terminal (its screen output
is read and discarded) refreshing every 0.25 s, so the introspection
endpoint serves snapshots and events the whole time. Every SAMPLE_SECONDS
(10) the back-end's RSS (VmRSS), open fds and threads are sampled, with the
TUI's RSS and testpmd's packet counters.

The warm-up lasts WARMUP_SECONDS (60) and, beyond that, until the server's
central event buffer has gone round once (the ``events`` op's ``head``, the
number of events ever buffered, reached its capacity). That buffer is one
ring of 2^20 events (16 MiB, inspector/introspect/buffer.py) whose pages are
touched as it fills, at the rate kicks and calls come, which on a loaded
machine can take minutes; until then the RSS grows by design. The soak keeps
one introspection connection of its own open from the start (so it does not
move the fd count).

Pass: after the warm-up, every RSS sample of the back-end is within ±5 % of
the first one after the warm-up, the fd count never changes, the back-end,
the TUI and testpmd are alive at the end, and packets kept moving in every
interval. The TUI's RSS is held to the same ±5 % after TUI_WARMUP_SECONDS
(120): Textual's caches fill over its first ~100 s of a busy screen
(measured: 42 → 60 MB, then within 2.3 % for the remaining 8 minutes).

Prints ONE JSON line and exits 0 (pass) or 1:
  {"bench": "soak", "seconds", "samples", "warmup_end", "rss_kb": {...}, "rss_dev_pct",
   "fds": {...}, "threads": {...}, "tui_rss_kb": {...}, "tui_rss_dev_pct", "mpps": {...},
   "pass", "why"}

  SOAK_SECONDS=120 python tests/bench/soak.py      # a shorter trial
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from inspector.sources.backend import BackendSource
from inspector.introspect.buffer import EVENT_BUFFER
from tests.support.peers import (
    VQSCOPE,
    DpdkTestpmd,
    VqscopeNet,
    find_testpmd,
    socket_dir,
    virtio_user_vdev,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SAMPLE_SECONDS = float(os.environ.get("SOAK_SAMPLE_SECONDS", "10"))
WARMUP_SECONDS = float(os.environ.get("SOAK_WARMUP_SECONDS", "60"))
TUI_WARMUP_SECONDS = float(os.environ.get("SOAK_TUI_WARMUP_SECONDS", "120"))
RSS_TOLERANCE = 0.05


def proc_sample(pid: int) -> dict:
    """RSS (kB), open fds and threads of ``pid`` from /proc."""
    rss = threads = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


class PtyTui:
    """``vqscope tui --connect SOCK`` on a 160x50 pseudo-terminal; a thread
    reads (and counts) what it draws so it never blocks on output."""

    def __init__(self, sock: str):
        master, slave = pty.openpty()
        import fcntl
        import struct
        import termios
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="160", LINES="50")
        self.proc = subprocess.Popen([*VQSCOPE, "tui", "--connect", sock], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, cwd=str(ROOT), start_new_session=True)
        os.close(slave)
        self.master = master
        self.bytes = 0
        self.tail = b""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.bytes += len(chunk)
            self.tail = (self.tail + chunk)[-4096:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            try:
                os.write(self.master, b"q")
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        os.close(self.master)
        self._t.join(2)


def summary(values: list[float]) -> dict:
    return {"first": values[0], "min": min(values), "max": max(values), "last": values[-1]} if values else {}


def main() -> int:
    if find_testpmd() is None:
        print(json.dumps({"bench": "soak", "pass": False, "why": "dpdk-testpmd is not installed"}))
        return 1
    d = socket_dir()
    sock = f"{d}/vu.sock"
    be = pmd = tui = src = None
    samples: list[dict] = []
    why: list[str] = []
    try:
        be = VqscopeNet(sock)
        pid = be.peer.proc.pid
        src = BackendSource(sock)
        src.request("snapshot")
        pmd = DpdkTestpmd([virtio_user_vdev(sock)], main_lcore=1, name="testpmd virtio-user")
        pmd.start(tx_first=32)
        tui = PtyTui(sock)
        t0 = time.monotonic()
        last_pkts = None
        while True:
            now = time.monotonic() - t0
            s = proc_sample(pid)
            s["t"] = round(now, 1)
            s["tui_rss_kb"] = proc_sample(tui.proc.pid)["rss_kb"] if tui.alive() else None
            ev = src.request("events", since=0, limit=1)
            s["evicted"], s["ev_full"] = ev["gap"], ev["head"] >= EVENT_BUFFER  # the ring went round
            rx, tx = pmd.port_stats()[0]
            if last_pkts is not None:
                s["mpps"] = round((rx - last_pkts[0]) / (now - last_pkts[2]) / 1e6, 3)
            last_pkts = (rx, tx, now)
            samples.append(s)
            print(f"soak t={now:6.1f}s rss={s['rss_kb']} kB fds={s['fds']} threads={s['threads']} "
                  f"tui_rss={s['tui_rss_kb']} kB mpps={s.get('mpps')} evicted={s['evicted']} "
                  f"ring_wrapped={s['ev_full']}", file=sys.stderr, flush=True)
            if now >= SOAK_SECONDS:
                break
            if not (be.peer.alive() and pmd.alive() and tui.alive()):
                break
            time.sleep(max(0.0, SAMPLE_SECONDS - (time.monotonic() - t0 - now)))
        alive = {"backend": be.peer.alive(), "testpmd": pmd.alive(), "tui": tui.alive()}
        tui_bytes = tui.bytes
    finally:
        if src is not None:
            src.close()
        for p in (tui, pmd, be):
            if p is not None:
                try:
                    p.close()
                except (OSError, AssertionError, subprocess.SubprocessError) as e:  # report; close the rest
                    why.append(f"closing {type(p).__name__}: {e}")
        shutil.rmtree(d, ignore_errors=True)

    # Warm-up: at least WARMUP_SECONDS and until the event ring went round.
    warm = len(samples)
    for k in range(len(samples) - 1, -1, -1):
        if samples[k]["t"] < WARMUP_SECONDS or not samples[k]["ev_full"]:
            break
        warm = k
    steady = samples[warm:]
    rss = [s["rss_kb"] for s in steady]
    fds = [s["fds"] for s in steady]
    dev = max(abs(r - rss[0]) / rss[0] for r in rss) if rss else None
    tui_rss = [s["tui_rss_kb"] for s in steady if s["t"] >= TUI_WARMUP_SECONDS and s["tui_rss_kb"]]
    tui_dev = max(abs(r - tui_rss[0]) / tui_rss[0] for r in tui_rss) if tui_rss else None
    for name, ok in alive.items():
        if not ok:
            why.append(f"{name} died")
    if samples[-1]["t"] < SOAK_SECONDS:
        why.append(f"ended after {samples[-1]['t']} s of {SOAK_SECONDS}")
    if len(steady) < 2:
        why.append("fewer than 2 samples after the warm-up (the event ring went round "
                   f"{'at ' + str(steady[0]['t']) + ' s' if steady else 'never'}): run longer")
    if dev is not None and dev > RSS_TOLERANCE:
        why.append(f"RSS moved {dev:.1%} after the warm-up (limit {RSS_TOLERANCE:.0%})")
    if tui_dev is not None and tui_dev > RSS_TOLERANCE:
        why.append(f"the TUI's RSS moved {tui_dev:.1%} after {TUI_WARMUP_SECONDS:.0f} s "
                   f"(limit {RSS_TOLERANCE:.0%})")
    if len(tui_rss) < 2:
        why.append(f"fewer than 2 TUI samples after {TUI_WARMUP_SECONDS:.0f} s: run longer")
    if fds and min(fds) != max(fds):
        why.append(f"fd count moved after the warm-up: {min(fds)}..{max(fds)}")
    stalled = [s["t"] for s in samples[1:] if not s.get("mpps")]
    if stalled:
        why.append(f"no packets in the intervals ending at {stalled} s")
    if tui_bytes == 0:
        why.append("the TUI drew nothing")
    rates = [s["mpps"] for s in samples if s.get("mpps") is not None]
    print(json.dumps({
        "bench": "soak", "seconds": samples[-1]["t"], "samples": len(samples),
        "warmup_end": steady[0]["t"] if steady else None, "events_evicted": samples[-1]["evicted"],
        "rss_kb": summary(rss),
        "rss_dev_pct": round(100 * dev, 2) if dev is not None else None,
        "rss_kb_all": summary([s["rss_kb"] for s in samples]),
        "fds": summary(fds), "threads": summary([s["threads"] for s in steady]),
        "tui_rss_kb": summary(tui_rss),
        "tui_rss_dev_pct": round(100 * tui_dev, 2) if tui_dev is not None else None,
        "mpps": {"min": min(rates), "median": sorted(rates)[len(rates) // 2], "max": max(rates)} if rates else {},
        "tui_bytes": tui_bytes, "pass": not why, "why": "; ".join(why),
    }))
    return 0 if not why else 1


if __name__ == "__main__":
    sys.exit(main())
