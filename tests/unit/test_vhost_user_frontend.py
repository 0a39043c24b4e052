"""The built-in vhost-user front-end (driver side) against our server: the
virtio-net helpers through a Python loopback device, notification
suppression, the back-end channel, and clean teardown."""

from __future__ import annotations

import os
import struct
import time

import pytest

from inspector.spec.virtio import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, VIRTIO_F_RING_PACKED,
                                   VRING_USED_F_NO_NOTIFY)
from inspector.datapath.packed_queue import decode_vring_base
from inspector.errors import ProtocolError
from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.protocol import BackendRequest, Request
from inspector.vhost_user.server import VhostUserServer

from tests.conftest import wait_for
from tests.support.nulldevice import F_EVENT_IDX, F_MRG_RXBUF, F_VERSION_1, LoopbackDevice, NullDevice


@pytest.fixture
def loop_server(tmp_path):
    devices = []

    def factory():
        devices.append(LoopbackDevice(queue_pairs=2))
        return devices[-1]

    with VhostUserServer(str(tmp_path / "vu.sock"), factory) as srv:
        srv.devices = devices
        yield srv


def frames_back(fe, pair, n, timeout=5.0):
    got = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        fe.wait_call(pair, 0.1, "rx")
        got += fe.recv_frames(pair)
    return got


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("mrg_rxbuf", [False, True])
def test_loopback_round_trip(loop_server, event_idx, mrg_rxbuf):
    with VhostUserFrontend(loop_server.socket_path, queue_pairs=2, queue_size=64, mem_size=4 << 20,
                           event_idx=event_idx, mrg_rxbuf=mrg_rxbuf) as fe:
        assert bool(fe.features & F_EVENT_IDX) == event_idx
        assert bool(fe.features & F_MRG_RXBUF) == mrg_rxbuf
        assert fe.net_hdr_len == 12
        for pair in (0, 1):
            assert fe.post_rx_buffers(pair, 32) == 32
        sent = [bytes([i]) * (60 + i) for i in range(40)]
        assert fe.send_frames(1, sent[:20]) == 20
        got = frames_back(fe, 1, 20)
        assert got == sent[:20]
        # More frames than posted RX buffers: the rest waits until we repost.
        assert fe.send_frames(1, sent[20:]) == 20
        got = frames_back(fe, 1, 12)
        assert got == sent[20:32]
        fe.post_rx_buffers(1, 16)
        got = frames_back(fe, 1, 8)
        assert got == sent[32:]
        assert wait_for(lambda: fe.poll_tx_done(1) == 0 and not fe.tx(1).slots)
        assert fe.recv_frames(0) == []
        # The TX ring's last_avail_idx is what the device consumed.
        assert fe.get_vring_base(3) == 40


def test_wait_call_times_out_without_traffic(loop_server):
    with VhostUserFrontend(loop_server.socket_path, queue_pairs=1, queue_size=64, mem_size=1 << 20) as fe:
        t0 = time.monotonic()
        assert fe.wait_call(0, 0.1) is False
        assert time.monotonic() - t0 >= 0.09


def _null_server(tmp_path, **kw):
    devices = []

    def factory():
        devices.append(NullDevice(**kw))
        return devices[-1]

    srv = VhostUserServer(str(tmp_path / "n.sock"), factory)
    srv.devices = devices
    return srv


def test_kick_honours_used_flags_no_notify(tmp_path):
    with _null_server(tmp_path, features=F_VERSION_1) as srv:
        with VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=1 << 20) as fe:
            tx = fe.tx(0)
            fe.send_frames(0, [b"a" * 60])
            assert tx.kicks == 1 and os.eventfd_read(srv.connections[0].vrings[1].kick_fd) == 1
            # The device asks not to be notified (VIRTIO 1.2 §2.7.10).
            mem = srv.connections[0].mem
            used = mem.uva_to_gpa(srv.connections[0].vrings[1].used_uva)
            mem.view(used, 2)[:] = struct.pack("<H", VRING_USED_F_NO_NOTIFY)
            fe.send_frames(0, [b"b" * 60, b"c" * 60])
            assert tx.kicks == 1
            mem.view(used, 2)[:] = b"\0\0"
            fe.send_frames(0, [b"d" * 60])
            assert tx.kicks == 2


def test_kick_honours_avail_event(tmp_path):
    with _null_server(tmp_path, features=F_VERSION_1 | F_EVENT_IDX) as srv:
        with VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=1 << 20, event_idx=True) as fe:
            tx = fe.tx(0)
            assert fe.event_idx
            fe.send_frames(0, [b"a" * 60])  # avail_event 0: kick when entry 0 is published
            assert tx.kicks == 1
            conn = srv.connections[0]
            mem = conn.mem
            v = conn.vrings[1]
            avail_event = mem.uva_to_gpa(v.used_uva) + 4 + 8 * 64
            mem.view(avail_event, 2)[:] = struct.pack("<H", 3)  # wake me at entry 3
            fe.send_frames(0, [b"b" * 60])  # idx 1 → 2: no
            assert tx.kicks == 1
            fe.send_frames(0, [b"c" * 60, b"d" * 60])  # idx 2 → 4 crosses 3: kick
            assert tx.kicks == 2
            fe.send_frames(0, [b"e" * 60])  # 4 → 5: event 3 is behind
            assert tx.kicks == 2


def test_header_length_follows_features(tmp_path):
    with _null_server(tmp_path, features=0) as srv:
        with VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=1 << 20) as fe:
            assert fe.features & ~(1 << p.VHOST_USER_F_PROTOCOL_FEATURES) == 0
            assert fe.net_hdr_len == 10
            fe.send_frames(0, [b"x" * 50])
            head, slot = next(iter(fe.tx(0).slots.items()))
            assert fe.tx(0).ring.read_desc(head)[1] == 60


def test_backend_channel_and_config_change(tmp_path):
    with _null_server(tmp_path) as srv:
        with VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=1 << 20) as fe:
            assert fe.backend_channel is not None
            conn = srv.connections[0]
            assert wait_for(lambda: conn.backend_req_fd is not None)
            assert conn.send_config_change()
            fe.backend_channel.settimeout(5)
            msg = t.recv_message(fe.backend_channel)
            assert msg.request == BackendRequest.CONFIG_CHANGE_MSG and msg.size == 12


def test_queue_pairs_beyond_the_backend_are_refused(tmp_path):
    with _null_server(tmp_path, num_queues=2) as srv:
        with pytest.raises(ProtocolError, match="queue"):
            VhostUserFrontend(srv.socket_path, queue_pairs=3, queue_size=64, mem_size=1 << 20)


def test_send_raw_and_recv_reply(tmp_path):
    with _null_server(tmp_path) as srv:
        with VhostUserFrontend(srv.socket_path, handshake=False, mem_size=1 << 20) as fe:
            fe.send_raw(Request.GET_FEATURES)
            r = fe.recv_reply()
            assert r.request == Request.GET_FEATURES
            assert struct.unpack("<Q", r.payload)[0] & 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
            fe.send_raw(Request.GET_FEATURES, flags=0)  # version 0: a violation
            with pytest.raises(ProtocolError, match="closed"):
                fe.recv_reply()


def test_frontend_and_backend_release_everything(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    with _null_server(tmp_path) as srv:
        for _ in range(20):
            with VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=1 << 20) as fe:
                fe.send_frames(0, [b"z" * 100])
            assert wait_for(lambda: not srv.connections)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.timeout(120)
def test_full_rate_traffic_never_shows_the_back_end_a_torn_index(tmp_path):
    """The front-end publishes avail->idx and reads used->idx while the
    back-end's C worker runs on another CPU: each must be one 16-bit access
    (struct.pack_into zeroes a field before writing it; our back-end saw
    avail->idx 0 mid-traffic and broke the ring). Hundreds of thousands of
    frames through `vqscope serve` (every 0x..ff -> 0x..00 carry, and
    wraps of the 16-bit indices), none lost, no queue broken."""
    from inspector.sources.backend import BackendSource
    from tests.unit.test_faults import FRAME, _serve, frontend, pump

    sock, proc = _serve(tmp_path)
    try:
        with frontend(sock) as fe, BackendSource(sock) as src:
            sent = got = 0
            end = time.monotonic() + 4
            while time.monotonic() < end or sent < 70000:
                got += pump(fe, 0, 8, timeout=5)     # small bursts: the worker polls the ring
                sent += 8
                if got != sent or sent > 400000:
                    break
            snap = src.snapshot()
        assert got == sent >= 70000, (got, sent)       # beyond one wrap of the indices
        assert all(not q.anomalies for q in snap.queues), snap.queues
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


# --- packed rings (VIRTIO 1.2 §2.8) --------------------------------------------------------------
F_RING_PACKED = 1 << VIRTIO_F_RING_PACKED


@pytest.mark.parametrize("packed", [True, False])
def test_packed_rings_negotiated_when_offered(tmp_path, packed):
    """VIRTIO_F_RING_PACKED is acked when offered (unless packed=False);
    SET_VRING_ADDR then carries the descriptor ring, the driver event
    suppression area (avail) and the device's (used), SET_VRING_BASE the
    packed encoding of the initial positions (slot 0, wrap counters 1),
    and a packed ring's size need not be a power of two."""
    size = 100 if packed else 64
    with _null_server(tmp_path, features=F_VERSION_1 | F_EVENT_IDX | F_RING_PACKED) as srv:
        with VhostUserFrontend(srv.socket_path, queue_size=size, mem_size=1 << 20, event_idx=True,
                               packed=packed) as fe:
            dev = srv.devices[0]
            assert fe.packed is packed
            assert bool(dev.acked & F_RING_PACKED) is packed
            assert wait_for(lambda: sorted(dev.started) == [0, 1])
            for i, q in enumerate(fe.queues):
                assert q.packed is packed and dev.started[i].num == size
                if packed:
                    assert dev.gpas[i] == (q.ring.desc_addr, q.ring.driver_event_addr, q.ring.device_event_addr)
                    assert decode_vring_base(dev.started[i].base) == (0, 1, 0, 1)
                else:
                    assert dev.gpas[i] == (q.ring.desc_addr, q.ring.avail_addr, q.ring.used_addr)
                    assert dev.started[i].base == 0


def test_packed_rings_not_offered_stay_split(tmp_path):
    with _null_server(tmp_path, features=F_VERSION_1 | F_EVENT_IDX) as srv:
        with VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=1 << 20) as fe:
            assert not fe.packed and not fe.tx(0).packed


@pytest.mark.parametrize("event_idx", [False, True])
def test_packed_kick_honours_device_event_suppression(tmp_path, event_idx):
    """§2.8.10: the device's event suppression area decides the kicks:
    DISABLE none, ENABLE each publish, DESC (with EVENT_IDX) when the
    descriptor at its off/wrap is published."""
    feats = F_VERSION_1 | F_RING_PACKED | (F_EVENT_IDX if event_idx else 0)
    with _null_server(tmp_path, features=feats) as srv:
        with VhostUserFrontend(srv.socket_path, queue_size=8, mem_size=1 << 20, event_idx=event_idx) as fe:
            tx = fe.tx(0)
            assert fe.packed and fe.event_idx is event_idx
            conn = srv.connections[0]
            dev_event = conn.mem.view(conn.mem.uva_to_gpa(conn.vrings[1].used_uva), 4)
            fe.send_frames(0, [b"a" * 60])                    # ENABLE (zeroed area): kick
            assert tx.kicks == 1 and os.eventfd_read(conn.vrings[1].kick_fd) == 1
            dev_event[:] = struct.pack("<HH", 0, RING_EVENT_FLAGS_DISABLE)
            fe.send_frames(0, [b"b" * 60])
            assert tx.kicks == 1
            dev_event[:] = struct.pack("<HH", 3 | 1 << 15, RING_EVENT_FLAGS_DESC)   # slot 3, wrap 1
            fe.send_frames(0, [b"c" * 60])                    # slot 2
            assert tx.kicks == (1 if event_idx else 2)
            fe.send_frames(0, [b"d" * 60, b"e" * 60])         # slots 3, 4: slot 3 published
            assert tx.kicks == (2 if event_idx else 3)


@pytest.fixture
def net_server(tmp_path):
    from inspector.devices.net import NetDevice
    from inspector.introspect.snapshot import backend_snapshot

    with VhostUserServer(str(tmp_path / "net.sock"), lambda: NetDevice(queue_pairs=1, busy_poll_us=0),
                         snapshot_fn=backend_snapshot) as srv:
        yield srv


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event_idx,mrg_rxbuf", [(False, False), (True, True), (True, False)])
def test_packed_round_trip_through_the_c_data_path(net_server, event_idx, mrg_rxbuf):
    """Frames of every size through our C data path on packed rings of a
    size that is not a power of two, for several laps of each ring (every
    wrap of both wrap counters); the back-end's snapshot shows them packed."""
    from inspector.introspect.snapshot import backend_snapshot

    with VhostUserFrontend(net_server.socket_path, queue_size=24, mem_size=4 << 20, event_idx=event_idx,
                           mrg_rxbuf=mrg_rxbuf) as fe:
        assert fe.packed
        sent = [bytes([i % 251]) * (60 + i % 900) for i in range(200)]
        got = []
        for k in range(0, len(sent), 10):
            fe.post_rx_buffers(0, 12)
            assert fe.send_frames(0, sent[k:k + 10]) == 10
            got += frames_back(fe, 0, 10)
            assert wait_for(lambda: fe.poll_tx_done(0) >= 0 and not fe.tx(0).slots, timeout=5)
        assert got == sent
        assert fe.tx(0).ring.used_wrap_counter in (0, 1) and fe.tx(0).ring.published == 200
        snap = backend_snapshot(net_server)
        qs = {q.index: q for q in snap.queues}
        assert qs[0].layout == qs[1].layout == "packed"
        assert all(not q.anomalies for q in qs.values()), [q.anomalies for q in qs.values()]
        tx = fe.tx(0).ring
        assert (qs[1].next_used, qs[1].used_wrap_counter) == (tx.next_used, tx.used_wrap_counter)


@pytest.mark.timeout(60)
def test_packed_reconnect_resumes_where_the_device_was(tmp_path):
    """A new back-end on the same socket gets the device's positions as the
    ring shows them (both halves of the packed SET_VRING_BASE), and frames
    flow on from there."""
    from inspector.devices.net import NetDevice

    path = str(tmp_path / "re.sock")
    srv = VhostUserServer(path, lambda: NetDevice(queue_pairs=1, busy_poll_us=0))
    srv.start()
    try:
        with VhostUserFrontend(path, queue_size=10, mem_size=2 << 20, event_idx=True) as fe:
            assert fe.packed
            fe.post_rx_buffers(0, 8)
            assert fe.send_frames(0, [b"x" * 60] * 7) == 7
            assert len(frames_back(fe, 0, 7)) == 7
            assert wait_for(lambda: fe.poll_tx_done(0) >= 0 and not fe.tx(0).slots, timeout=5)
            srv.stop()
            srv = VhostUserServer(path, lambda: NetDevice(queue_pairs=1, busy_poll_us=0))
            srv.start()
            fe.reconnect()
            conn = srv.connections[0]
            tx = fe.tx(0).ring
            assert decode_vring_base(conn.vrings[1].base) == (7, 1, 7, 1) == (tx.next_used, 1, tx.next_used, 1)
            for _ in range(3):   # across the end of the 10-slot rings
                fe.post_rx_buffers(0, 8)
                assert fe.send_frames(0, [b"y" * 70] * 5) == 5
                assert frames_back(fe, 0, 5) == [b"y" * 70] * 5
                assert wait_for(lambda: fe.poll_tx_done(0) >= 0 and not fe.tx(0).slots, timeout=5)
    finally:
        srv.stop()
