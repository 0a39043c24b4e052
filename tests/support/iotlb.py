"""Helpers of the IOTLB back-end tests (tests/unit/test_iotlb_*.py): frames
through ``vqscope serve net --loopback`` behind the built-in front-end's
IOMMU (inspector/vhost_user/frontend_iommu.py), the back-end's snapshot by
queue, its log lines and its fds."""

from __future__ import annotations

import contextlib
import os
import shutil
import time

from inspector.introspect.client import IntrospectionClient

from tests.conftest import wait_for
from tests.support.peers import VqscopeNet, socket_dir


def frame(i: int, size: int = 60) -> bytes:
    """An Ethernet frame numbered ``i``: broadcast from 02:00:00:00:00:01,
    EtherType 0x88b5 (local experimental), the number, then filler."""
    body = i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(size - 18))
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + body


def echoed(f: bytes) -> bytes:
    """What the loopback device sends back for frame ``f``: source and
    destination MAC swapped (inspector/devices/net.py)."""
    return f[6:12] + f[0:6] + f[12:]


def exchange(fe, pair: int, frames: list[bytes], timeout: float = 15.0, *, post: bool = True) -> list[bytes]:
    """Post as many RX buffers as ``frames`` (unless ``post`` is False),
    send ``frames`` on ``pair``'s TX vring and collect what comes back on
    its RX vring for up to ``timeout`` s, reclaiming TX buffers and
    answering IOTLB misses (wait_call serves them) on the way. Returns the
    frames received (possibly fewer)."""
    if post:
        assert fe.post_rx_buffers(pair, len(frames)) == len(frames)
    assert fe.send_frames(pair, frames) == len(frames)
    return collect(fe, pair, len(frames), timeout)


def collect(fe, pair: int, want: int, timeout: float) -> list[bytes]:
    """Frames received on ``pair`` within ``timeout`` s, until ``want`` came."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        fe.wait_call(pair, 0.05)
        fe.poll_tx_done(pair)
        got += fe.recv_frames(pair)
    fe.poll_tx_done(pair)
    return got


class Introspect:
    """The back-end's snapshot through its introspection socket, by queue."""

    def __init__(self, sock: str):
        self.client = IntrospectionClient(sock + ".introspect")

    def queues(self) -> dict[int, dict]:
        return {q["index"]: q for q in self.client.request("snapshot")["queues"]}

    def queue(self, index: int) -> dict:
        return self.queues()[index]

    def iotlb(self, index: int) -> dict:
        q = self.queue(index)
        assert "iotlb" in q, f"queue {index} has no iotlb extras: {sorted(q)}"
        return q["iotlb"]

    def wait(self, cond, timeout: float = 10.0, serve=None) -> dict[int, dict]:
        """Poll the snapshot until ``cond(queues)`` holds, answering the
        IOTLB misses of front-end ``serve`` meanwhile; return the last
        snapshot (callers assert on it)."""
        last: list[dict[int, dict]] = [{}]

        def check() -> bool:
            if serve is not None:
                serve.serve_misses(0.05)
            last[0] = self.queues()
            try:
                return bool(cond(last[0]))
            except (KeyError, TypeError):   # a queue or field not there yet
                return False
        wait_for(check, timeout, 0.1)
        return last[0]

    def close(self) -> None:
        self.client.close()


def anomalies(q: dict, kind: str) -> list[dict]:
    """The anomalies of ``kind`` of one snapshot queue."""
    return [a for a in q.get("anomalies", []) if a.get("kind") == kind]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def new_lines(peer, start: int) -> list[str]:
    """The complete lines ``peer`` printed after offset ``start`` of its output."""
    text = peer.output[start:]
    return [line for line in text.split("\n")[:-1] if line.strip()]


def premap(fe) -> None:
    """Map all of the front-end's IOVA windows up front (the misses its
    vrings sent before are read and left unanswered, so that no page answer
    overlaps the windows' entries): frames then move without a miss, for
    tests about something else than misses."""
    answer = fe.iotlb_policy.answer
    fe.iotlb_policy.answer = False
    try:
        fe.serve_misses(0.2)
        fe.premap()
        fe.serve_misses(0.2)    # misses the vrings sent while the UPDATEs arrived
    finally:
        fe.iotlb_policy.answer = answer


@contextlib.contextmanager
def serve_net(queues: int = 1):
    """``vqscope serve net --loopback --queues N`` on a private socket dir,
    with an :class:`Introspect` client: yields (back-end, socket path,
    introspection); everything closed and removed after."""
    d = socket_dir()
    sock = os.path.join(d, "vu.sock")
    try:
        with VqscopeNet(sock, queues=queues) as be:
            look = Introspect(sock)
            try:
                yield be, sock, look
            finally:
                look.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
