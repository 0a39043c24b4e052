"""``vqscope proxy`` as a test peer: started between a real front-end and a
real back-end (tests/integration/test_proxy.py, tests/bench/bench_proxy.py).

:class:`VqscopeProxy` runs ``python -m inspector proxy --listen FRONT
--connect BACK`` in its own process group (tests/support/peers.py Peer),
returns once FRONT and its introspection socket exist, and reads the
proxy's snapshot, message log, log lines and fd count.

:func:`interpose` is the one switch of the harness: it yields the socket a
front-end should use, FRONT with a proxy in front of BACK, or BACK itself
when ``VQSCOPE_TEST_PROXY=off`` (the same tests then prove the harness and
the peers without the proxy; every assertion about the proxy is left out).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from contextlib import contextmanager

from inspector.introspect.client import IntrospectionClient

from tests.conftest import ROOT, VQSCOPE
from tests.support.peers import Peer, PeerError, PeerHandle, wait_path

#: The hostile corpus's cases (tests/support/hostile_corpus.py) whose
#: violation the proxy sees from the message alone (framing, payload types,
#: fds, memory table checks) and logs once, "(forwarded as-is)"; the other
#: cases break device semantics only the back-end judges, and pass silently.
PROXY_SEES = frozenset({
    "size_over_limit", "size_vs_type", "payload_on_fdless_noarg", "fds_too_many", "fd_on_fdless",
    "fd_with_nofd_bit", "fd_missing", "mem_fd_missing", "mem_zero_regions", "mem_too_many_regions",
    "mem_overlap", "mem_zero_size", "mem_offset_overflow", "mem_beyond_fd", "index_above_0xffff",
    "index_u32_max", "kick_index_bits", "config_beyond_payload", "set_config_over_max",
    "request_zero", "request_beyond_spec", "request_u32_max", "reply_bit", "version_2", "version_0"})
#: The cases whose front-end hangs up in the middle of a message.
CUT_CASES = frozenset({"closed_in_header", "closed_in_payload"})

#: The proxy's log line for a malformed message it forwarded (COMMON interface).
MALFORMED_RX = r"proxy: connection \d+: (front-end|back-end|back-end request) .*\(forwarded as-is\)"


def proxy_enabled() -> bool:
    """False when ``VQSCOPE_TEST_PROXY=off``: front-ends connect straight to
    the back-end (the harness without the proxy)."""
    v = os.environ.get("VQSCOPE_TEST_PROXY", "on")
    if v not in ("on", "off"):
        raise ValueError(f"VQSCOPE_TEST_PROXY={v!r}: expected 'on' or 'off'")
    return v == "on"


class VqscopeProxy(PeerHandle):
    """``vqscope proxy --listen listen --connect connect`` (plus
    ``--count-notifications``, ``--device-type``), up once ``listen`` and
    its introspection socket (``listen + ".introspect"``) exist.
    PeerError when it exits or does not come up in ``startup_timeout`` s."""

    kind = "proxy"

    def __init__(self, listen: str, connect: str, *, count_notifications: bool = False,
                 device_type: str | None = None, startup_timeout: float = 30, name: str = "vqscope proxy"):
        self.sock = listen
        self.backend_sock = connect
        self.introspect = listen + ".introspect"
        argv = [*VQSCOPE, "proxy", "--listen", listen, "--connect", connect]
        if count_notifications:
            argv.append("--count-notifications")
        if device_type:
            argv += ["--device-type", device_type]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.peer = Peer(argv, name, env=env, cwd=str(ROOT))
        self._client: IntrospectionClient | None = None
        try:
            wait_path(listen, startup_timeout, self.peer.alive)
            wait_path(self.introspect, startup_timeout, self.peer.alive)
        except PeerError as e:
            self.peer.close()
            raise PeerError(f"{e}\n{self.peer.tail()}") from None

    @property
    def pid(self) -> int:
        return self.peer.proc.pid

    def _request(self, op: str, **params) -> dict:
        if self._client is None:
            self._client = IntrospectionClient(self.introspect, timeout=15)
        try:
            return self._client.request(op, **params)
        except Exception as e:
            raise PeerError(f"proxy introspection {op}: {e}\n{self.tail()}") from None

    def snapshot(self) -> dict:
        """The snapshot JSON (introspection op ``snapshot``)."""
        return self._request("snapshot")

    def snapshot_cli(self) -> dict:
        """The snapshot JSON through ``vqscope snapshot --connect FRONT --json``
        (the CLI finds the introspection socket beside FRONT, as for serve)."""
        r = subprocess.run([*VQSCOPE, "snapshot", "--connect", self.sock, "--json"], cwd=str(ROOT),
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise PeerError(f"vqscope snapshot --connect {self.sock} failed ({r.returncode}): {r.stderr}\n"
                            f"{self.tail()}")
        return json.loads(r.stdout)

    def queues(self, snap: dict | None = None) -> dict[tuple[int, int], dict]:
        """``{(connection, vring index): QueueEntry}`` of a snapshot (taken now
        when ``snap`` is None); the connection from the entry's ``proxy``
        extras (the snapshot JSON puts extras at the entry's top level)."""
        snap = self.snapshot() if snap is None else snap
        out = {}
        for q in snap.get("queues", []):
            conn = q.get("proxy", {}).get("connection")
            out[(conn, q["index"])] = q
        return out

    def messages(self, since: int | None = None) -> list[dict]:
        """The message log (op ``messages``), each entry with ``direction``
        and ``malformed``."""
        params = {} if since is None else {"since": since}
        return self._request("messages", **params)["messages"]

    def fd_count(self) -> int:
        """Open fds of the proxy process (/proc/PID/fd)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def mappings(self, marker: str = "memfd:") -> int:
        """Lines of /proc/PID/maps naming ``marker`` (guest memory it maps)."""
        with open(f"/proc/{self.pid}/maps") as f:
            return sum(marker in ln for ln in f)

    def log_lines(self, pattern: str, start: int = 0) -> list[str]:
        """Lines of the proxy's output from offset ``start`` matching ``pattern``."""
        rx = re.compile(pattern)
        return [ln for ln in self.peer.output[start:].splitlines() if rx.search(ln)]

    def malformed_lines(self, start: int = 0, side: str | None = None) -> list[str]:
        """The proxy's "(forwarded as-is)" lines from offset ``start``; with
        ``side`` ("front-end", "back-end", "back-end request") that side's only."""
        lines = self.log_lines(MALFORMED_RX, start)
        if side is not None:
            lines = [ln for ln in lines if re.search(rf"connection \d+: {side} ", ln)]
        return lines

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.peer.close()


@contextmanager
def interpose(backend_sock: str, front_sock: str, *, enabled: bool | None = None, **kw):
    """Yield ``(socket for the front-end, VqscopeProxy or None)``: a proxy
    listening on ``front_sock`` and connecting to ``backend_sock`` (``kw``:
    :class:`VqscopeProxy`'s options), or, when ``enabled`` is false (default:
    :func:`proxy_enabled`), ``backend_sock`` itself and None."""
    if enabled is None:
        enabled = proxy_enabled()
    if not enabled:
        yield backend_sock, None
        return
    with VqscopeProxy(front_sock, backend_sock, **kw) as px:
        yield front_sock, px
