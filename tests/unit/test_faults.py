"""Hostile rings and shrinking memory at run time.

Real sockets, real memfds, the built-in front-end: it writes ring
violations (inspector.vhost_user.frontend.HOSTILE_KINDS on split rings,
HOSTILE_PACKED_KINDS on packed rings) while traffic runs,
or truncates the memfd behind its memory table. The back-end must break only
the queue concerned (queue_broken with the reason in the snapshot, next to
the decoder's anomaly kind), keep every other queue and connection moving,
report VIRTIO_CONFIG_S_NEEDS_RESET through GET_STATUS (VIRTIO 1.2 §2.1.2)
and survive a SIGBUS (checked in a separate `vqscope serve` process: nothing
but a real process can show that no SIGBUS kills it).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

import pytest

from inspector.devices.net import NetDevice
from inspector.introspect.snapshot import backend_snapshot
from inspector.ring.anomalies import AnomalyKind
from inspector.snapshot.model import QueueEntry, Snapshot
from inspector.sources.backend import BackendSource
from inspector.spec.virtio import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from inspector.vhost_user.frontend import HOSTILE_KINDS, HOSTILE_PACKED_KINDS, VhostUserFrontend
from inspector.vhost_user.protocol import BackendRequest, ProtocolFeature
from inspector.vhost_user.server import VhostUserServer
from tests.conftest import ROOT, VQSCOPE, wait_for

FRAME = bytes.fromhex("0a0000000001" "525400123456" "88b5") + bytes(50)
SIZE = 64


def pump(fe: VhostUserFrontend, pair: int, n: int = 16, timeout: float = 10.0) -> int:
    """Post n RX buffers, send n frames on ``pair`` and count the echoes."""
    fe.post_rx_buffers(pair, n)
    sent = fe.send_frames(pair, [FRAME] * n)
    got = 0
    end = time.monotonic() + timeout
    while got < sent and time.monotonic() < end:
        fe.wait_call(pair, 0.05)
        got += len(fe.recv_frames(pair))
        fe.poll_tx_done(pair)
    return got


def frontend(path: str, pairs: int = 1, packed: bool = False) -> VhostUserFrontend:
    return VhostUserFrontend(path, queue_pairs=pairs, queue_size=SIZE, mem_size=2 << 20,
                             event_idx=True, mrg_rxbuf=True, packed=packed)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def entries(snap: Snapshot, device: str) -> dict[int, QueueEntry]:
    return {q.index: q for q in snap.queues if q.device == device}


def kinds(entry: QueueEntry) -> set[AnomalyKind]:
    return {a.kind for a in entry.anomalies}


def details(entry: QueueEntry, kind: AnomalyKind) -> list[str]:
    return [a.detail for a in entry.anomalies if a.kind is kind]


@pytest.fixture
def server(tmp_path):
    with VhostUserServer(str(tmp_path / "vu.sock"), lambda: NetDevice(queue_pairs=2, busy_poll_us=50),
                         snapshot_fn=backend_snapshot) as srv:
        yield srv


def _conn_name(srv: VhostUserServer, fe: VhostUserFrontend) -> str:
    """The snapshot's device name of ``fe``'s connection (the newest)."""
    assert wait_for(lambda: srv.connections and srv.connections[-1].mem is not None)
    conn = srv.connections[-1]
    return f"{conn.device.name}{conn.id}"


# vring 1: transmitq 0 (the device reads it); vring 0: receiveq 0 (it writes).
CASES = [(kind, 1) for kind in HOSTILE_KINDS] + [
    (kind, 0) for kind in ("loop", "addr_out_of_range", "zero_len", "avail_idx_jump", "nested_indirect")]
# chain_too_long fills the whole ring: only on TX, whose buffers all come back.
PACKED_CASES = [(kind, 1) for kind in HOSTILE_PACKED_KINDS] + [
    (kind, 0) for kind in ("id_out_of_range", "addr_out_of_range", "zero_len", "nested_indirect",
                           "avail_used_pattern")]
PACKED_CASES = [pytest.param(k, v, id=f"{k}-vring{v}") for k, v in PACKED_CASES]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,vring", CASES, ids=[f"{k}-vring{v}" for k, v in CASES])
def test_hostile_ring_breaks_only_its_queue(server, caplog, kind, vring):
    _hostile_breaks_only_its_queue(server, caplog, kind, vring, packed=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,vring", PACKED_CASES)
def test_hostile_packed_ring_breaks_only_its_queue(server, caplog, kind, vring):
    """The same on packed rings (§2.8): each violation the built-in
    front-end writes breaks that vring only, with the packed decoder's
    anomaly kind beside the data path's reason; no fd is left behind."""
    _hostile_breaks_only_its_queue(server, caplog, kind, vring, packed=True)


def _hostile_breaks_only_its_queue(server, caplog, kind, vring, packed):
    caplog.set_level(logging.ERROR, logger="inspector.devices.net")
    expected = (HOSTILE_PACKED_KINDS if packed else HOSTILE_KINDS)[kind]
    base_fds = fd_count()
    with frontend(server.socket_path, pairs=2, packed=packed) as fe:
        assert fe.packed is packed
        name = _conn_name(server, fe)
        with frontend(server.socket_path, packed=packed) as other:
            other_name = _conn_name(server, other)
            assert fe.protocol_features & ProtocolFeature.STATUS
            assert fe.get_status() & VIRTIO_CONFIG_S_DRIVER_OK
            assert not fe.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
            assert pump(fe, 0) == 16 and pump(fe, 1) == 16 and pump(other, 0) == 16

            fe.write_hostile(vring, kind)
            if vring == 0:   # the device touches RX only to deliver a frame
                fe.send_frames(0, [FRAME])

            def broken_entry():
                e = entries(backend_snapshot(server), name)[vring]
                return e if AnomalyKind.QUEUE_BROKEN in kinds(e) else None

            assert wait_for(broken_entry, timeout=10), f"vring {vring} never broke on {kind}"
            entry = broken_entry()
            # The decoder's anomaly kind for this violation, and the data path's reason.
            assert expected in kinds(entry), entry.anomalies
            assert {e.layout for e in entries(backend_snapshot(server), name).values()} == \
                {"packed" if packed else "split"}
            reason = details(entry, AnomalyKind.QUEUE_BROKEN)[0]
            # DEVICE_NEEDS_RESET (§2.1.2) and the configuration change notification.
            # The worker thread sets it right after the data path marks the queue
            # broken (which the snapshot shows at once): wait for it.
            assert wait_for(lambda: fe.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET, timeout=5)
            msg = fe.recv_backend_request(timeout=5)
            assert msg is not None and msg.request == BackendRequest.CONFIG_CHANGE_MSG
            assert not other.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
            # The other pair of this connection and the other connection keep moving.
            assert pump(fe, 1) == 16
            assert pump(other, 0) == 16
            snap = backend_snapshot(server)
            assert all(AnomalyKind.QUEUE_BROKEN not in kinds(e) for i, e in entries(snap, name).items() if i >= 2)
            assert all(not e.anomalies for e in entries(snap, other_name).values())
            # One log line for the broken pair, naming the reason.
            lines = [r.getMessage() for r in caplog.records
                     if r.name == "inspector.devices.net" and "broken" in r.getMessage()]
            assert len(lines) == 1 and f"vring {vring}" in lines[0] and reason in lines[0], lines
            # A reset clears NEEDS_RESET (the driver then sets the rings up again).
            fe.set_status(0)
            assert fe.get_status() == 0
    # Both connections gone: every fd the back-end had for them is closed.
    assert wait_for(lambda: not server.connections and fd_count() == base_fds, timeout=10), \
        (fd_count(), base_fds)


@pytest.mark.timeout(60)
def test_loop_walk_is_bounded_by_the_queue_size(server):
    """§2.7.5.2: a chain is never longer than the queue; the walk stops there."""
    with frontend(server.socket_path) as fe:
        name = _conn_name(server, fe)
        fe.write_hostile(1, "loop")
        assert wait_for(lambda: server.connections[-1].device.queue_stats(1).broken, timeout=10)
        reason = server.connections[-1].device.queue_stats(1).broken
        assert f"more than {SIZE} descriptors" in reason
        entry = entries(backend_snapshot(server), name)[1]
        assert AnomalyKind.LOOP in kinds(entry)


def _serve(tmp_path):
    sock = str(tmp_path / "vq.sock")
    proc = subprocess.Popen(VQSCOPE + ["serve", "net", "--socket", sock, "--loopback"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock + ".introspect"):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "vqscope serve never listened"
        time.sleep(0.05)
    return sock, proc


class Traffic(threading.Thread):
    """Keeps frames moving on one front-end's pair 0, counting echoes."""

    def __init__(self, fe: VhostUserFrontend):
        super().__init__(daemon=True)
        self.fe = fe
        self.echoed = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.echoed += pump(self.fe, 0, 8, timeout=2)
        except BaseException as e:  # reported by the test
            self.error = e

    def moved_since(self, before: int, timeout: float = 10) -> bool:
        return wait_for(lambda: self.echoed >= before + 64, timeout=timeout)


@pytest.mark.timeout(120)
def test_shrinking_memfd_breaks_the_queue_not_the_back_end(tmp_path):
    sock, proc = _serve(tmp_path)
    try:
        with BackendSource(sock) as src:
            a = frontend(sock)
            try:
                name_a = {q.device for q in src.snapshot().queues}.pop()
                with frontend(sock) as b:
                    traffic = Traffic(b)
                    traffic.start()
                    try:
                        assert traffic.moved_since(0)
                        assert pump(a, 0) == 16
                        # Frames written, then the frame slots cut off the memfd,
                        # then published: the back-end's copy faults (SIGBUS).
                        a.post_rx_buffers(0, 8)
                        assert a.send_frames(0, [FRAME] * 8, publish=False) == 8
                        a.shrink_memory(a.slots_base)
                        a.publish(1, force_kick=True)

                        def reason():
                            e = entries(src.snapshot(), name_a).get(1)
                            return e and next(iter(details(e, AnomalyKind.QUEUE_BROKEN)), None)

                        assert wait_for(reason, timeout=20), "the truncated queue never broke"
                        assert "SIGBUS at guest-physical" in reason(), reason()
                        assert "memfd truncated" in reason()
                        assert proc.poll() is None
                        assert a.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
                        assert traffic.moved_since(traffic.echoed)
                        # Now the rings too: the snapshot's decoder faults, guarded.
                        a.shrink_memory(0)
                        snap = src.snapshot()
                        e = entries(snap, name_a)[1]
                        unmapped = details(e, AnomalyKind.RING_UNMAPPED)
                        assert unmapped and "SIGBUS" in unmapped[0], e.anomalies
                        assert proc.poll() is None
                        assert traffic.moved_since(traffic.echoed)
                        other = [q for q in snap.queues if q.device != name_a]
                        assert other and all(not q.anomalies for q in other)
                    finally:
                        traffic.stop.set()
                        traffic.join(10)
                    assert traffic.error is None, traffic.error
            finally:
                a.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log = proc.stderr.read()
        sigbus = [ln for ln in log.splitlines() if "SIGBUS" in ln]
        assert len(sigbus) == 1 and "broken" in sigbus[0], log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


@pytest.mark.timeout(60)
def test_unguarded_sigbus_still_kills(tmp_path):
    """The handler chains: a SIGBUS outside the guarded sections keeps its
    default action (a crash, not a silent hang or a swallowed fault)."""
    code = ("import os, signal, inspector._cffi as v; v.install_sigbus_guard(); "
            "os.kill(os.getpid(), signal.SIGBUS)")
    r = subprocess.run([VQSCOPE[0], "-c", code], cwd=ROOT, capture_output=True, timeout=30,
                       check=False)
    assert r.returncode == -signal.SIGBUS
