"""The built-in vhost-user front-end (driver side) against our server: the
virtio-net helpers through a Python loopback device, notification
suppression, the back-end channel, and clean teardown."""

from __future__ import annotations

import os
import struct
import time

import pytest

from inspector.spec.virtio import VRING_USED_F_NO_NOTIFY
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
