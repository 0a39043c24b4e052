"""The vhost-user back-end core and server over real Unix sockets and memfds.

Every rejected message: one log line naming request, field and value; the
connection closed; every fd that came with the message closed; and the server
still serving a new front-end through a full handshake.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspector.devices.base import Device, QueueStats, VringConfig
from inspector.errors import DeviceError, InspectorError
from inspector.layout import inflight_queue_size
from inspector.spec.vhost import INFLIGHT_DESC_SIZE, INFLIGHT_HEADER_SIZE
from inspector.snapshot.model import Snapshot
from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.protocol import (
    ConfigPayload, LogPayload, MemoryRegionDesc, MemoryTable, Request, VringAddr, VringState,
)
from inspector.vhost_user.server import VhostUserServer

from tests.conftest import wait_for
from tests.support.nulldevice import F_VERSION_1, NullDevice

MARK = "vqscope-test-mark"


def marked_fds() -> int:
    """How many fds of this process point at a memfd named MARK."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if MARK in os.readlink(f"/proc/self/fd/{name}"):
                n += 1
        except OSError:
            pass
    return n


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size=1 << 20) -> int:
    fd = os.memfd_create(MARK)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def server(tmp_path):
    devices: list[NullDevice] = []

    def factory():
        d = NullDevice(num_queues=2)
        devices.append(d)
        return d

    srv = VhostUserServer(str(tmp_path / "vu.sock"), factory, introspect_path=str(tmp_path / "vu.sock.introspect"))
    srv.devices = devices
    srv.start()
    yield srv
    srv.stop()


def raw_client(server) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.socket_path)
    return s


def send(sock, req, payload=b"", fds=(), flags=p.VERSION, size=None):
    t.send_message(sock, int(req), payload, fds=fds, flags=flags, size=size)


def reply(sock) -> t.Message:
    msg = t.recv_message(sock)
    assert msg is not None, "back-end closed instead of replying"
    assert msg.flags & p.FLAG_REPLY
    return msg


def closed_by_peer(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def handshake_works(server, pairs=1) -> None:
    with VhostUserFrontend(server.socket_path, queue_pairs=pairs, mem_size=1 << 20, queue_size=64) as fe:
        assert wait_for(lambda: any(len(d.started) == 2 for d in server.devices[-1:]))
        assert fe.get_features() & F_VERSION_1


# --- each rejected message ---------------------------------------------------

def _region(gpa, size, uva, off=0):
    return MemoryRegionDesc(gpa, size, uva, off)


def case_mem(regions, nfds=None, fd_size=1 << 20):
    def build():
        fds = [memfd(fd_size) for _ in range(len(regions) if nfds is None else nfds)]
        return Request.SET_MEM_TABLE, MemoryTable(regions).pack(), fds, p.VERSION, None
    return build


def case(req, payload=b"", nfds=0, flags=p.VERSION, size=None, fd_factory=None):
    def build():
        fds = [(fd_factory or memfd)() for _ in range(nfds)]
        return req, payload, fds, flags, size
    return build


U64 = p.pack_u64
CASES = {
    # header and framing
    "size_vs_type": (case(Request.SET_FEATURES, b"\0" * 4), "SET_FEATURES", "size", 4),
    "size_over_max": (case(Request.GET_FEATURES, size=4096), "GET_FEATURES", "size", 4096),
    "unknown_request": (case(99), "UNKNOWN(99)", "request", 99),
    "request_zero": (case(0), "UNKNOWN(0)", "request", 0),
    "version_bits": (case(Request.GET_FEATURES, flags=0x2), "GET_FEATURES", "flags.version", 2),
    "reply_bit": (case(Request.GET_FEATURES, flags=p.VERSION | p.FLAG_REPLY), "GET_FEATURES", "flags", 5),
    "unsupported": (case(Request.SEND_RARP, U64(0)), "SEND_RARP", "request", 19),
    # fds
    "fd_on_fdless": (case(Request.SET_OWNER, nfds=1), "SET_OWNER", "fds", 1),
    "fds_too_many": (case(Request.SET_VRING_KICK, U64(0), nfds=9), "SET_VRING_KICK", "fds", 9),
    "fd_missing": (case(Request.SET_VRING_KICK, U64(0)), "SET_VRING_KICK", "fds", 0),
    "fd_with_nofd_bit": (case(Request.SET_VRING_CALL, U64(0x100), nfds=1), "SET_VRING_CALL", "fds", 1),
    "log_base_no_fd": (case(Request.SET_LOG_BASE, LogPayload(4096, 0).pack()), "SET_LOG_BASE", "fds", 0),
    "mem_fd_missing": (case_mem([_region(0, 4096, 0x10000), _region(1 << 20, 4096, 0x20000)], nfds=1),
                       "SET_MEM_TABLE", "fds", 1),
    "kick_extra_bits": (case(Request.SET_VRING_KICK, U64(0x10000), nfds=1), "SET_VRING_KICK", "u64", 0x10000),
    # vring index and values
    "index_num": (case(Request.SET_VRING_NUM, VringState(2, 256).pack()), "SET_VRING_NUM", "index", 2),
    "index_kick": (case(Request.SET_VRING_KICK, U64(7), nfds=1), "SET_VRING_KICK", "index", 7),
    "index_get_base": (case(Request.GET_VRING_BASE, VringState(5, 0).pack()), "GET_VRING_BASE", "index", 5),
    "index_enable": (case(Request.SET_VRING_ENABLE, VringState(2, 1).pack()), "SET_VRING_ENABLE", "index", 2),
    "num_zero": (case(Request.SET_VRING_NUM, VringState(0, 0).pack()), "SET_VRING_NUM", "num", 0),
    "num_not_pow2": (case(Request.SET_VRING_NUM, VringState(0, 3).pack()), "SET_VRING_NUM", "num", 3),
    "num_too_big": (case(Request.SET_VRING_NUM, VringState(0, 65536).pack()), "SET_VRING_NUM", "num", 65536),
    "base_too_big": (case(Request.SET_VRING_BASE, VringState(0, 65536).pack()), "SET_VRING_BASE", "num", 65536),
    "enable_two": (case(Request.SET_VRING_ENABLE, VringState(0, 2).pack()), "SET_VRING_ENABLE", "num", 2),
    "addr_misaligned": (case(Request.SET_VRING_ADDR, VringAddr(0, 0, 0x1008, 0x3000, 0x2000, 0).pack()),
                        "SET_VRING_ADDR", "desc_user_addr", 0x1008),
    # memory table
    "mem_zero_regions": (case(Request.SET_MEM_TABLE, struct.pack("<II", 0, 0)), "SET_MEM_TABLE", "num_regions", 0),
    "mem_nine_regions": (case(Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(256), nfds=8),
                         "SET_MEM_TABLE", "num_regions", 9),
    "mem_overlap_gpa": (case_mem([_region(0, 8192, 0x100000), _region(4096, 4096, 0x200000)]),
                        "SET_MEM_TABLE", "regions[1].guest_phys_addr", 4096),
    "mem_overlap_uva": (case_mem([_region(0, 4096, 0x100000), _region(1 << 20, 4096, 0x100000)]),
                        "SET_MEM_TABLE", "regions[1].userspace_addr", 0x100000),
    "mem_zero_size": (case_mem([_region(0, 0, 0x100000)]), "SET_MEM_TABLE", "regions[0].memory_size", 0),
    "mem_offset_overflow": (case_mem([_region(0, 4096, 0x100000, 2**64 - 2048)]),
                            "SET_MEM_TABLE", "regions[0].mmap_offset", 2**64 - 2048),
    "mem_gpa_overflow": (case_mem([_region(2**64 - 4096, 8192, 0x100000)]),
                         "SET_MEM_TABLE", "regions[0].guest_phys_addr", 2**64 - 4096),
    "mem_beyond_fd": (case_mem([_region(0, 8192, 0x100000, 4096)], fd_size=8192),
                      "SET_MEM_TABLE", "regions[0].mmap_offset", 4096),
    # features and config
    "features_not_offered": (case(Request.SET_FEATURES, U64(1 << 40)), "SET_FEATURES", "features", 1 << 40),
    "log_all_not_offered": (case(Request.SET_FEATURES, U64(1 << 26)), "SET_FEATURES", "features", 1 << 26),
    "protocol_features_not_offered": (case(Request.SET_PROTOCOL_FEATURES, U64(1 << 12)),
                                      "SET_PROTOCOL_FEATURES", "protocol_features", 1 << 12),
    "config_size_beyond_payload": (case(Request.GET_CONFIG, struct.pack("<III", 0, 16, 0) + bytes(8)),
                                   "GET_CONFIG", "config.size", 16),
    "config_size_over_max": (case(Request.SET_CONFIG, struct.pack("<III", 0, 300, 0) + bytes(200)),
                             "SET_CONFIG", "config.size", 300),
    # device status without VHOST_USER_PROTOCOL_F_STATUS
    "get_status_not_negotiated": (case(Request.GET_STATUS), "GET_STATUS", "protocol_features", 0),
    "set_status_not_negotiated": (case(Request.SET_STATUS, U64(0x0F)), "SET_STATUS", "protocol_features", 0),
}


def _shown(value) -> str:
    return f"{value} ({value:#x})" if isinstance(value, int) and value > 0xFFF else str(value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rejected_message(server, caplog, name):
    build, req_name, field, value = CASES[name]
    caplog.set_level(logging.INFO, logger="inspector.vhost_user")
    assert marked_fds() == 0
    sock = raw_client(server)
    assert wait_for(lambda: len(server.connections) == 1)
    conn = server.connections[0]
    req, payload, fds, flags, size = build()
    try:
        send(sock, req, payload, fds, flags, size)
        assert closed_by_peer(sock), "the back-end must close the connection"
        assert conn.broken and conn.closed
        # The received copies of the fds are closed: only ours remain.
        assert marked_fds() == len(fds)
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
    assert marked_fds() == 0
    errors = [r.getMessage() for r in caplog.records
              if r.name == "inspector.vhost_user" and r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    assert req_name in errors[0] and f"{field}={_shown(value)}" in errors[0], errors[0]
    # Later calls refuse work.
    assert conn.handle_readable() is False
    # The server goes on: a new front-end completes a handshake.
    assert wait_for(lambda: not server.connections)
    handshake_works(server)


def test_reply_ack_is_nonzero_on_rejection(server):
    sock = raw_client(server)
    send(sock, Request.SET_VRING_NUM, VringState(0, 3).pack(), flags=p.VERSION | p.FLAG_NEED_REPLY)
    r = reply(sock)
    assert r.request == Request.SET_VRING_NUM and struct.unpack("<Q", r.payload)[0] != 0
    assert closed_by_peer(sock)
    sock.close()


def test_reply_ack_is_zero_on_success_and_not_doubled(server):
    sock = raw_client(server)
    send(sock, Request.SET_OWNER, flags=p.VERSION | p.FLAG_NEED_REPLY)
    r = reply(sock)
    assert r.request == Request.SET_OWNER and r.payload == p.pack_u64(0)
    # A request with its own reply gets that reply only.
    send(sock, Request.GET_QUEUE_NUM, flags=p.VERSION | p.FLAG_NEED_REPLY)
    r = reply(sock)
    assert r.request == Request.GET_QUEUE_NUM and r.payload == p.pack_u64(2)
    send(sock, Request.GET_FEATURES)
    assert reply(sock).request == Request.GET_FEATURES
    sock.close()


def test_peer_closing_mid_message_closes_its_fds(server, caplog):
    caplog.set_level(logging.INFO, logger="inspector.vhost_user")
    sock = raw_client(server)
    fd = memfd()
    data = t.encode_message(Request.SET_VRING_CALL, p.pack_u64(0))
    sock.sendmsg([data[:14]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    sock.shutdown(socket.SHUT_WR)
    assert closed_by_peer(sock)
    assert marked_fds() == 1
    os.close(fd)
    sock.close()
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(msgs) == 1 and "SET_VRING_CALL" in msgs[0] and "size=" in msgs[0]
    handshake_works(server)


# --- handshake, start rule, stop -------------------------------------------------

def test_frontend_handshake_starts_every_vring_with_translated_addresses(tmp_path):
    devices = []
    srv = VhostUserServer(str(tmp_path / "s"), lambda: devices.append(NullDevice(num_queues=4)) or devices[-1])
    with srv:
        with VhostUserFrontend(srv.socket_path, queue_pairs=2, queue_size=128, mem_size=4 << 20,
                               event_idx=True) as fe:
            dev = devices[0]
            assert wait_for(lambda: len(dev.started) == 4)
            assert sorted(dev.starts) == [0, 1, 2, 3]
            conn = srv.connections[0]
            assert fe.uva != 0  # uva differs from gpa: translation is exercised
            for q in fe.queues:
                ring = q.ring
                assert dev.gpas[q.index] == (ring.desc_addr, ring.avail_addr, ring.used_addr)
                v = dev.started[q.index]
                assert v.num == 128 and v.desc_uva == ring.desc_addr + fe.uva
                assert v.kick_fd is not None and v.call_fd is not None and v.enabled
                assert conn.vrings[q.index].started
            assert dev.acked == fe.features & ~(1 << p.VHOST_USER_F_PROTOCOL_FEATURES)
            assert fe.protocol_features & p.ProtocolFeature.REPLY_ACK
            assert fe.queue_num == 4
            assert conn.mem is not None and conn.mem.regions[0].uva == fe.uva
            # Rings started only on SET_VRING_ENABLE (protocol features negotiated).
            names = [e["request"] for e in conn.log]
            assert names[:4] == ["GET_FEATURES", "SET_OWNER", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
            assert names.count("SET_VRING_ENABLE") == 4 and "GET_VRING_BASE" not in names
            # What the device sees in memory is what the driver wrote.
            fe.queues[1].ring.add_chain([(0x200000, 64, False)])
            fe.queues[1].ring.publish()
            assert conn.mem.read(dev.gpas[1][1] + 2, 2) == b"\x01\x00"
        assert wait_for(lambda: dev.closed)
        assert dev.started == {} and sorted(dev.stops) == [0, 1, 2, 3]


def test_get_vring_base_stops_the_ring_and_returns_last_avail_idx(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        dev = server.devices[0]
        assert wait_for(lambda: len(dev.started) == 2)
        dev.last_avail[1] = 1234
        assert fe.get_vring_base(1) == 1234
        conn = server.connections[0]
        v = conn.vrings[1]
        assert not v.started and v.kick_fd is None and v.call_fd is None and v.base == 1234
        assert 1 not in dev.started and 0 in dev.started and dev.stops == [1]
        entry = [e for e in conn.log if e["request"] == "GET_VRING_BASE"][-1]
        assert entry["fields"] == {"index": 1, "num": 0}
        # A stopped ring's base is returned again without a device call.
        assert fe.get_vring_base(1) == 1234 and dev.stops == [1]
        # A new kick restarts it from that base.
        fe._request(Request.SET_VRING_KICK, p.pack_u64(1), fds=[fe.queues[1].kick_fd])
        assert wait_for(lambda: 1 in dev.started) and dev.started[1].base == 1234


def test_rings_start_enabled_without_protocol_features(server):
    """Spec: without VHOST_USER_F_PROTOCOL_FEATURES a ring starts enabled,
    i.e. on SET_VRING_KICK once size and addresses are known."""
    sock = raw_client(server)
    mfd = memfd()
    ev = os.eventfd(0)
    try:
        send(sock, Request.SET_FEATURES, U64(F_VERSION_1))
        send(sock, Request.SET_MEM_TABLE, MemoryTable([_region(0, 1 << 20, 0x7000_0000)]).pack(), [mfd])
        send(sock, Request.SET_VRING_NUM, VringState(0, 64).pack())
        send(sock, Request.SET_VRING_ADDR, VringAddr(0, 0, 0x7000_0000, 0x7000_2000, 0x7000_1000, 0).pack())
        send(sock, Request.GET_FEATURES)
        reply(sock)
        dev = server.devices[0]
        assert dev.started == {}
        send(sock, Request.SET_VRING_KICK, U64(0), [ev])
        assert wait_for(lambda: 0 in dev.started)
        assert dev.gpas[0] == (0, 0x1000, 0x2000)
        # Polling mode (no-fd bit) also counts as a kick source.
        send(sock, Request.SET_VRING_NUM, VringState(1, 64).pack())
        send(sock, Request.SET_VRING_ADDR, VringAddr(1, 0, 0x7000_4000, 0x7000_6000, 0x7000_5000, 0).pack())
        send(sock, Request.SET_VRING_KICK, U64(0x101))
        assert wait_for(lambda: 1 in dev.started) and dev.started[1].kick_fd is None
    finally:
        sock.close()
        os.close(mfd)
        os.close(ev)


def test_ring_not_in_memory_is_a_violation(server, caplog):
    sock = raw_client(server)
    mfd = memfd()
    try:
        send(sock, Request.SET_MEM_TABLE, MemoryTable([_region(0, 1 << 20, 0x7000_0000)]).pack(), [mfd])
        send(sock, Request.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0).pack())
        assert closed_by_peer(sock)
        assert any("SET_VRING_ADDR" in r.getMessage() and "desc_user_addr=4096" in r.getMessage()
                   for r in caplog.records)
    finally:
        sock.close()
        os.close(mfd)


def test_changing_call_fd_restarts_the_ring_and_closes_the_old_fd(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        dev = server.devices[0]
        assert wait_for(lambda: len(dev.started) == 2)
        conn = server.connections[0]
        dev.last_avail[0] = 77
        ev = os.eventfd(0)
        before = fd_count()
        try:
            fe._request(Request.SET_VRING_CALL, p.pack_u64(0), fds=[ev])
            assert wait_for(lambda: 0 in dev.started)
            assert dev.stops == [0] and dev.started[0].base == 77
            assert dev.started[0].call_fd == conn.vrings[0].call_fd
            # The back-end holds the new copy and closed the old one.
            assert fd_count() == before
        finally:
            os.close(ev)


def test_new_memory_table_restarts_running_rings(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        dev = server.devices[0]
        assert wait_for(lambda: len(dev.started) == 2)
        conn = server.connections[0]
        old_mem = conn.mem
        fe._request(Request.SET_MEM_TABLE, MemoryTable([_region(0, 1 << 20, fe.uva)]).pack(), fds=[fe.memfd])
        assert conn.mem is not old_mem and sorted(dev.stops) == [0, 1]
        assert sorted(dev.started) == [0, 1]
        assert old_mem.regions[0].buf.closed
        # A table that would leave a running ring unmapped is refused, and the
        # old table stays.
        with pytest.raises(Exception):
            fe._request(Request.SET_MEM_TABLE, MemoryTable([_region(0, 1 << 20, fe.uva + (1 << 30))]).pack(),
                        fds=[fe.memfd])
        assert conn.broken and wait_for(lambda: conn.closed)


def test_config_space(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        dev = server.devices[0]
        assert fe.get_config(4, 8) == bytes(range(4, 12))
        fe._request(Request.SET_CONFIG, ConfigPayload(0, 2, 0, b"\xaa\xbb").pack())
        assert dev.config[:2] == b"\xaa\xbb"
        # A refused write is a failure (REPLY_ACK non-zero), not a violation.
        dev.refuse_config = True
        with pytest.raises(Exception, match="REPLY_ACK"):
            fe._request(Request.SET_CONFIG, ConfigPayload(0, 2, 0, b"\x00\x00").pack())
        assert not server.connections[0].broken
        # A failed read is a reply of size 0 (libvhost-user's convention).
        fe.send_raw(Request.GET_CONFIG, ConfigPayload(30, 8, 0, bytes(8)).pack())
        assert fe.recv_reply().size == 0


def test_reset_device_stops_rings_and_drops_fds(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        dev = server.devices[0]
        assert wait_for(lambda: len(dev.started) == 2)
        fe._request(Request.RESET_DEVICE)
        conn = server.connections[0]
        assert dev.started == {} and all(v.kick_fd is None and not v.enabled for v in conn.vrings)
        assert conn.mem is not None


def test_log_base_is_mapped_and_acked(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        lfd = memfd(8192)
        try:
            r = fe._request(Request.SET_LOG_BASE, LogPayload(8192, 0).pack(), fds=[lfd])
            assert r.payload == p.pack_u64(0)
            assert server.connections[0].log_map is not None
            fe._request(Request.SET_LOG_FD, fds=[lfd])
        finally:
            os.close(lfd)
    assert wait_for(lambda: marked_fds() == 0)


def test_no_fd_leak_over_1000_connections(server):
    before = fd_count()
    ev = os.eventfd(0)
    mfd = memfd(1 << 16)
    table = MemoryTable([_region(0, 1 << 16, 0x5000_0000)]).pack()
    try:
        for i in range(1000):
            s = raw_client(server)
            send(s, Request.SET_OWNER)
            send(s, Request.SET_VRING_CALL, U64(i % 2), [ev])
            if i % 10 == 0:
                send(s, Request.SET_MEM_TABLE, table, [mfd])
                send(s, Request.SET_VRING_KICK, U64(1), [ev])
                send(s, Request.SET_BACKEND_REQ_FD, fds=[ev])
            if i % 7 == 0:
                send(s, Request.SET_VRING_NUM, VringState(0, 3).pack())  # violation
                assert closed_by_peer(s)
            else:
                send(s, Request.GET_FEATURES)
                reply(s)
            s.close()
            if i % 100 == 99:
                assert wait_for(lambda: not server.connections)
    finally:
        os.close(ev)
        os.close(mfd)
    assert wait_for(lambda: server.accepted == 1000 and not server.connections)
    assert fd_count() == before
    assert all(d.closed for d in server.devices)


# --- server: sockets and introspection -----------------------------------------------

def introspect(server, *ops: str) -> list[dict]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.introspect_path)
    f = s.makefile("rb")
    try:
        s.sendall(b"".join(json.dumps({"op": op}).encode() + b"\n" for op in ops))
        return [json.loads(f.readline()) for _ in ops]
    finally:
        f.close()
        s.close()


def test_sockets_are_0600(server):
    for path in (server.socket_path, server.introspect_path):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    with VhostUserServer(path, NullDevice) as srv:
        handshake_works_plain(srv)
        with pytest.raises(InspectorError, match="in use"):
            VhostUserServer(path, NullDevice).start()
    assert not os.path.exists(path)
    open(path, "w").close()
    with pytest.raises(InspectorError, match="not a socket"):
        VhostUserServer(path, NullDevice).start()
    assert os.path.exists(path)


def handshake_works_plain(srv):
    with VhostUserFrontend(srv.socket_path, mem_size=1 << 20, queue_size=64):
        assert wait_for(lambda: srv.connections and all(v.started for v in srv.connections[0].vrings))


def test_introspection_ops(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64):
        snap, msgs, bad = introspect(server, "snapshot", "messages", "write")
    assert snap["queues"] == [] and "time" in snap and "source" in snap
    names = [m["request"] for m in msgs["messages"]]
    assert names[0] == "GET_FEATURES" and "SET_MEM_TABLE" in names
    assert all(m["connection"] == 1 for m in msgs["messages"])
    assert {"time", "request", "flags", "size", "nfds", "fields"} <= set(msgs["messages"][0])
    mem = [m for m in msgs["messages"] if m["request"] == "SET_MEM_TABLE"][0]
    assert mem["nfds"] == 1 and mem["fields"]["num_regions"] == 1
    assert "error" in bad
    # The log of a closed connection is still served.
    assert wait_for(lambda: not server.connections)
    (msgs,) = introspect(server, "messages")
    assert len(msgs["messages"]) == len(names)


def test_snapshot_fn_is_called(tmp_path):
    calls = []

    def snap(srv):
        calls.append(srv)
        return Snapshot(source=f"x{len(srv.connections)}", time=0.0, pid=7)

    with VhostUserServer(str(tmp_path / "s"), NullDevice, str(tmp_path / "i"), snap) as srv:
        (out,) = introspect(srv, "snapshot")
    assert out == {"source": "x0", "time": 0.0, "pid": 7, "queues": []} and calls == [srv]


def test_silent_introspection_client_does_not_block_vhost_user(server):
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(server.introspect_path)
    idle.sendall(b'{"op": "snap')  # no newline, never finished
    try:
        t0 = time.monotonic()
        handshake_works(server)
        assert time.monotonic() - t0 < 5
    finally:
        idle.close()


def test_device_factory_failure_keeps_serving(tmp_path):
    n = [0]

    def factory():
        n[0] += 1
        if n[0] == 1:
            raise RuntimeError("no device today")
        return NullDevice()

    with VhostUserServer(str(tmp_path / "s"), factory) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(srv.socket_path)
        assert closed_by_peer(s)
        s.close()
        handshake_works_plain(srv)


def test_device_start_failure_breaks_only_that_connection(tmp_path, caplog):
    def factory():
        d = NullDevice()
        d.fail_start = True
        return d

    with VhostUserServer(str(tmp_path / "s"), factory) as srv:
        with pytest.raises(Exception):
            VhostUserFrontend(srv.socket_path, mem_size=1 << 20, queue_size=64)
        assert any("cannot start" in r.getMessage() for r in caplog.records)
        assert wait_for(lambda: not srv.connections)


# --- GET/SET_INFLIGHT_FD (spec "Inflight I/O tracking") ---------------------------------------

class InflightDevice(NullDevice):
    """A NullDevice that takes an inflight area."""

    supports_inflight = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.inflight: list[tuple[object, int, int]] = []

    def set_inflight(self, area, num_queues, queue_size):
        self.inflight.append((area, num_queues, queue_size))


@pytest.fixture
def inflight_server(tmp_path):
    devices: list[InflightDevice] = []

    def factory():
        devices.append(InflightDevice(num_queues=2))
        return devices[-1]

    srv = VhostUserServer(str(tmp_path / "inflight.sock"), factory)
    srv.devices = devices
    with srv:
        yield srv


def _negotiate(sock, protocol_features) -> None:
    send(sock, Request.GET_PROTOCOL_FEATURES)
    offered = p.unpack_u64("GET_PROTOCOL_FEATURES", reply(sock).payload)
    assert offered & protocol_features == protocol_features
    send(sock, Request.SET_PROTOCOL_FEATURES, U64(protocol_features))


def test_inflight_offered_only_when_the_device_supports_it(server, inflight_server):
    for srv, want in ((server, 0), (inflight_server, int(p.ProtocolFeature.INFLIGHT_SHMFD))):
        sock = raw_client(srv)
        send(sock, Request.GET_PROTOCOL_FEATURES)
        offered = p.unpack_u64("GET_PROTOCOL_FEATURES", reply(sock).payload)
        assert offered & p.ProtocolFeature.INFLIGHT_SHMFD == want
        sock.close()


def test_get_and_set_inflight_fd_map_the_area_shared_for_the_device(inflight_server):
    sock = raw_client(inflight_server)
    try:
        _negotiate(sock, int(p.ProtocolFeature.INFLIGHT_SHMFD | p.ProtocolFeature.REPLY_ACK))
        send(sock, Request.GET_INFLIGHT_FD, p.InflightPayload(0, 0, 2, 256).pack())
        r = reply(sock)
        got = p.unpack_inflight("GET_INFLIGHT_FD", r.payload)
        per_queue = inflight_queue_size(256)
        assert per_queue == 4096 + 64 and per_queue >= INFLIGHT_HEADER_SIZE + 256 * INFLIGHT_DESC_SIZE
        assert (got.mmap_size, got.mmap_offset, got.num_queues, got.queue_size) == (2 * per_queue, 0, 2, 256)
        (fd,) = r.fds
        assert os.fstat(fd).st_size == got.mmap_size
        with pytest.raises(OSError):  # sealed against resizing, as libvhost-user's
            os.ftruncate(fd, 1)
        send(sock, Request.SET_INFLIGHT_FD, got.pack(), [fd], flags=p.VERSION | p.FLAG_NEED_REPLY)
        assert reply(sock).payload == U64(0)
        dev = inflight_server.devices[0]
        (area, nq, qs), = dev.inflight
        assert (nq, qs, len(area)) == (2, 256, got.mmap_size)
        area[100] = 0xAB  # MAP_SHARED: the front-end's fd sees the device's write
        assert os.pread(fd, 1, 100) == b"\xab"
        os.close(fd)
    finally:
        sock.close()
    assert wait_for(lambda: not inflight_server.connections)
    assert area.closed


INFLIGHT_CASES = {
    "not_negotiated": (0, p.InflightPayload(0, 0, 1, 256), Request.GET_INFLIGHT_FD, "protocol_features", 0),
    "num_queues_zero": (1, p.InflightPayload(0, 0, 0, 256), Request.GET_INFLIGHT_FD, "num_queues", 0),
    "num_queues_over": (1, p.InflightPayload(0, 0, 3, 256), Request.GET_INFLIGHT_FD, "num_queues", 3),
    "queue_size_odd": (1, p.InflightPayload(0, 0, 1, 100), Request.GET_INFLIGHT_FD, "queue_size", 100),
    "set_too_small": (1, p.InflightPayload(4096, 0, 2, 256), Request.SET_INFLIGHT_FD, "mmap_size", 4096),
    "set_beyond_fd": (1, p.InflightPayload(8320, 4096, 1, 256), Request.SET_INFLIGHT_FD, "mmap_offset", 4096),
    "set_not_negotiated": (0, p.InflightPayload(8192, 0, 1, 256), Request.SET_INFLIGHT_FD,
                           "protocol_features", 0),
    # an area that could be truncated under the back-end (the fd's number is the back-end's)
    "set_unsealed": (1, p.InflightPayload(8192, 0, 1, 256), Request.SET_INFLIGHT_FD, "fd", None),
}


@pytest.mark.parametrize("name", sorted(INFLIGHT_CASES))
def test_inflight_rejections(inflight_server, caplog, name):
    negotiate, payload, req, field, value = INFLIGHT_CASES[name]
    caplog.set_level(logging.INFO, logger="inspector.vhost_user")
    sock = raw_client(inflight_server)
    fds = [memfd(8192)] if req == Request.SET_INFLIGHT_FD else []
    try:
        if negotiate:
            _negotiate(sock, int(p.ProtocolFeature.INFLIGHT_SHMFD))
        send(sock, req, payload.pack(), fds, flags=p.VERSION | p.FLAG_NEED_REPLY)
        r = reply(sock)
        assert p.unpack_u64(req.name, r.payload) != 0 and not r.fds
        assert closed_by_peer(sock)
        assert marked_fds() == len(fds)
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    shown = f"{field}=" if value is None else f"{field}={_shown(value)}"
    assert len(errors) == 1 and req.name in errors[0] and shown in errors[0], errors
    assert not inflight_server.devices[0].inflight


# --- more rejected messages ----------------------------------------------------------------------

CASES.update({
    "index_above_0xffff": (case(Request.SET_VRING_NUM, VringState(0x10000, 64).pack()),
                           "SET_VRING_NUM", "index", 0x10000),   # 0 once narrowed to 16 bits
    "request_u32_max": (case(0xFFFFFFFF), "UNKNOWN(4294967295)", "request", 0xFFFFFFFF),
    "log_offset_overflow": (case(Request.SET_LOG_BASE, LogPayload(8192, 2**64 - 4096).pack(), nfds=1),
                            "SET_LOG_BASE", "mmap_offset", 2**64 - 4096),
    "log_size_zero": (case(Request.SET_LOG_BASE, LogPayload(0, 0).pack(), nfds=1), "SET_LOG_BASE", "mmap_size", 0),
    "get_base_unconfigured": (case(Request.GET_VRING_BASE, VringState(1, 0).pack()),
                              "GET_VRING_BASE", "index", 1),
    "inflight_not_offered": (case(Request.GET_INFLIGHT_FD, p.InflightPayload(0, 0, 1, 64).pack()),
                             "GET_INFLIGHT_FD", "protocol_features", 0),
})


# --- the inspector never writes ------------------------------------------------------------------

def _maps_of(name: str) -> list[str]:
    """Permissions of this process's mappings of the memfd called ``name``."""
    with open("/proc/self/maps") as f:
        return [line.split()[1] for line in f if f"/memfd:{name} " in line + " "]


def test_log_area_is_mapped_read_only_and_guest_memory_shared(server):
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        lfd = os.memfd_create("vqscope-log-area")
        os.ftruncate(lfd, 8192)
        try:
            fe._request(Request.SET_LOG_BASE, LogPayload(8192, 0).pack(), fds=[lfd])
            # Only the inspector uses the log area (dirty logging is never
            # offered): read-only. Guest memory is the data path's: shared, writable.
            assert _maps_of("vqscope-log-area") == ["r--s"]
            assert "rw-s" in _maps_of("vqscope-guest")
            with pytest.raises(TypeError):
                server.connections[0].log_map[0] = 1
        finally:
            os.close(lfd)
    assert wait_for(lambda: not _maps_of("vqscope-log-area"))


def test_proc_pid_mem_is_opened_read_only():
    from inspector.memory.process import ProcessMemory

    with ProcessMemory(os.getpid()) as pm:
        with open(f"/proc/self/fdinfo/{pm.mem_fd}") as f:
            flags = int(dict(line.split(":", 1) for line in f)["flags"].strip(), 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        assert os.readlink(f"/proc/self/fd/{pm.mem_fd}") == f"/proc/{os.getpid()}/mem"


def _state(srv) -> tuple:
    return [(c.id, c.broken, len(c.log), [vars(v).copy() for v in c.vrings], c.features, c.protocol_features)
            for c in srv.connections]


def test_introspection_ops_are_all_read_only_and_others_refused(server):
    from inspector.introspect.server import INTROSPECT_OPS

    assert INTROSPECT_OPS == ("snapshot", "messages", "events")
    with VhostUserFrontend(server.socket_path, mem_size=1 << 20, queue_size=64) as fe:
        assert wait_for(lambda: len(server.devices[0].started) == 2)
        fe.queues[0].ring.add_chain([(0x80000, 64, False)])
        fe.queues[0].ring.publish()
        memory = bytes(fe.map)
        state = _state(server)
        for op in INTROSPECT_OPS:
            (out,) = introspect(server, op)
            assert "error" not in out, out
        for op in ("write", "poke", "set_config", "reset", "stop", "kick", "SNAPSHOT", None, 1, ["snapshot"]):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(server.introspect_path)
            s.sendall(json.dumps({"op": op, "addr": 0, "data": "00"}).encode() + b"\n")
            out = json.loads(s.makefile("rb").readline())
            s.close()
            assert "unknown op" in out["error"] and "read-only" in out["error"], out
        # Nothing the inspector reads changed: guest memory and back-end state.
        assert bytes(fe.map) == memory and _state(server) == state


_READER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"op": "messages"}\\n')
    line = s.makefile("rb").readline()
except (ConnectionResetError, BrokenPipeError):
    line = b""
print(json.dumps({"reply": line.decode()}))
"""


def _read_as_nobody(path: str) -> str:
    import subprocess

    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                        "-c", _READER, path], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["reply"]


@pytest.mark.parametrize("any_uid", [False, True])
def test_introspection_serves_only_the_same_uid(tmp_path, caplog, any_uid):
    import shutil
    import tempfile

    from tests.conftest import require

    require(os.geteuid() == 0 and shutil.which("setpriv") is not None,
            "needs root and setpriv to connect as another uid")
    d = tempfile.mkdtemp(prefix="vqs", dir="/tmp")
    os.chmod(d, 0o711)
    caplog.set_level(logging.INFO, logger="inspector.vhost_user")
    try:
        with VhostUserServer(os.path.join(d, "s"), NullDevice, os.path.join(d, "s.i"),
                             introspect_any_uid=any_uid) as srv:
            # 0600 alone keeps uid 65534 out; loosen it to test the second check.
            assert stat.S_IMODE(os.stat(srv.introspect_path).st_mode) == 0o600
            os.chmod(srv.introspect_path, 0o666)
            reply_line = _read_as_nobody(srv.introspect_path)
            if any_uid:
                assert "messages" in json.loads(reply_line)
                assert srv.introspection.refused_readers == 0
            else:
                assert reply_line == ""
                assert srv.introspection.refused_readers == 1
                lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
                assert len(lines) == 1 and "uid 65534" in lines[0] and "refused" in lines[0], lines
            # The server's own uid is still served.
            (out,) = introspect(srv, "messages")
            assert "messages" in out
    finally:
        shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"op": st.sampled_from(["snapshot", "messages", "events", "write", 0])},
                          optional={"since": st.integers(-5, 10**30) | st.floats() | st.text(max_size=3),
                                    "limit": st.integers(-5, 10**30) | st.floats() | st.none(),
                                    "binary": st.booleans() | st.integers(0, 2) | st.none()})
    .map(lambda d: json.dumps(d).encode()),
    st.integers(1000, 30000).map(lambda n: b"[" * n + b"]" * n)))
def test_introspection_answers_any_line_without_raising(server, line):
    """Whatever a reader sends, the introspection op answers with a reply or
    an error object (both JSON), never an exception (which would close the
    reader's connection with a traceback in the log)."""
    reply = server.introspection.answer(line)
    header, payload = reply if isinstance(reply, tuple) else (reply, b"")
    assert isinstance(header, dict) and json.loads(json.dumps(header)) is not None
    if "binary" in header:
        assert header["binary"] == len(payload)
    assert server.introspection.reply(line).count(b"\n") >= 1


def test_device_base_class_defaults_describe_a_device_without_capabilities():
    """inspector.devices.base.Device: the core calls every method without
    probing; the defaults are no features, no events, no inflight area, no
    config space, no data path, and GET_QUEUE_NUM answers the vring count."""
    d = Device()
    d.num_queues = 4
    assert d.features() == 0 and d.queue_num() == 4
    assert d.drain_events(1) == (b"", 0) and d.queue_stats(1) == QueueStats()
    assert d.supports_inflight is False and d.on_needs_reset is None
    d.set_features(1)
    d.close()
    with pytest.raises(DeviceError, match="inflight"):
        d.set_inflight(None, 1, 64)
    with pytest.raises(DeviceError, match="no config space"):
        d.get_config(0, 4)
    with pytest.raises(DeviceError, match="no config space"):
        d.set_config(0, b"x")
    with pytest.raises(DeviceError, match="vring 2"):
        d.start_queue(VringConfig(index=2), None)
    with pytest.raises(DeviceError, match="vring 2"):
        d.stop_queue(2)


def test_socket_appears_only_once_it_listens(tmp_path, monkeypatch):
    """listen_unix binds and listens under a temporary name and renames the
    socket into place: whoever sees the path can connect (no ECONNREFUSED
    window between bind and listen), and no temporary file is left. A
    directory where the temporary name would not fit sun_path still works
    (bound in place)."""
    from inspector.introspect import server as introspect_server

    seen = []
    real_listen = socket.socket.listen

    class Watching(socket.socket):
        def listen(self, *a):
            seen.append(os.path.exists(path))    # the final path, just before listen
            return real_listen(self, *a)

    path = str(tmp_path / "vu.sock")
    monkeypatch.setattr(introspect_server.socket, "socket", Watching)
    s = introspect_server.listen_unix(path)
    try:
        assert seen == [False]
        assert os.listdir(tmp_path) == ["vu.sock"]
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        c.close()
    finally:
        introspect_server.close_listener(s, path)
    deep = tmp_path / ("d" * (100 - len(str(tmp_path))))
    deep.mkdir()
    path = str(deep / "s")                       # 102 bytes: the temporary name would not fit
    s = introspect_server.listen_unix(path)
    try:
        assert seen == [False, True] and os.listdir(deep) == ["s"]
    finally:
        introspect_server.close_listener(s, path)
