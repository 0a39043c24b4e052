"""vhost-user wire format (inspector/vhost_user/protocol.py): numbers from the
spec, payload round trips, and every malformed input raising a
ProtocolViolation that names request, field and value."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from inspector.errors import ProtocolError
from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.spec.virtio import vring_need_event
from inspector.vhost_user.protocol import (
    ConfigPayload, InflightPayload, LogPayload, MemoryRegionDesc, MemoryTable,
    ProtocolFeature, ProtocolViolation, Request, VringAddr, VringState,
)


def test_request_numbers_are_the_specs():
    assert Request.GET_FEATURES == 1 and Request.SET_FEATURES == 2
    assert Request.SET_MEM_TABLE == 5 and Request.GET_VRING_BASE == 11
    assert Request.SET_VRING_KICK == 12 and Request.SET_VRING_CALL == 13
    assert Request.GET_PROTOCOL_FEATURES == 15 and Request.SET_VRING_ENABLE == 18
    assert Request.SET_BACKEND_REQ_FD == 21
    assert (Request.GET_CONFIG, Request.SET_CONFIG) == (24, 25)
    assert (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD) == (31, 32)
    assert Request.RESET_DEVICE == 34 and Request.CHECK_DEVICE_STATE == 43
    assert p.BackendRequest.CONFIG_CHANGE_MSG == 2 and p.BackendRequest.VRING_CALL == 4
    assert p.request_name(5) == "SET_MEM_TABLE" and p.request_name(99) == "UNKNOWN(99)"


def test_protocol_feature_bits_are_the_specs():
    bits = {f.name: f.value.bit_length() - 1 for f in ProtocolFeature}
    assert bits["MQ"] == 0 and bits["LOG_SHMFD"] == 1 and bits["RARP"] == 2
    assert bits["REPLY_ACK"] == 3 and bits["MTU"] == 4 and bits["BACKEND_REQ"] == 5
    assert bits["CONFIG"] == 9 and bits["INFLIGHT_SHMFD"] == 12 and bits["STATUS"] == 16
    assert p.VHOST_USER_F_PROTOCOL_FEATURES == 30  # a bit number, as the spec gives it


def test_header_round_trip():
    raw = t.encode_header(Request.SET_VRING_NUM, p.VERSION | p.FLAG_NEED_REPLY, 8)
    assert raw == struct.pack("<III", 8, 0x9, 8)
    assert t.decode_header(raw) == (8, 0x9, 8)
    with pytest.raises(ProtocolViolation):
        t.decode_header(raw[:11])


@pytest.mark.parametrize("obj, unpack", [
    (VringState(3, 256), p.unpack_vring_state),
    (VringAddr(1, 0, 0x7F0000001000, 0x7F0000003000, 0x7F0000002000, 0), p.unpack_vring_addr),
    (MemoryTable([MemoryRegionDesc(0, 1 << 20, 0x7F0000000000, 0),
                  MemoryRegionDesc(1 << 32, 4096, 0x7E0000000000, 8192)]), p.unpack_memory_table),
    (LogPayload(4096, 0), p.unpack_log),
    (ConfigPayload(0, 6, 0, b"\x52\x54\x00\x12\x34\x56"), p.unpack_config),
    (InflightPayload(8192, 0, 2, 256), p.unpack_inflight),
])
def test_payload_round_trip(obj, unpack):
    data = obj.pack()
    assert unpack("X", data) == obj


def test_payload_sizes_match_the_c_structs():
    assert len(VringState(0, 0).pack()) == 8
    assert len(VringAddr(0, 0, 0, 0, 0, 0).pack()) == 40
    assert len(MemoryTable([MemoryRegionDesc(0, 1, 0, 0)]).pack()) == 8 + 32
    assert len(LogPayload(0, 0).pack()) == 16
    assert len(InflightPayload(0, 0, 0, 0).pack()) == 24
    assert p.MAX_PAYLOAD == 12 + 256
    assert p.unpack_u64("X", p.pack_u64(2**64 - 1)) == 2**64 - 1


def _violation(fn, *args) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as ei:
        fn(*args)
    assert isinstance(ei.value, ProtocolError)
    return ei.value


@pytest.mark.parametrize("req, data, field, value", [
    (Request.SET_FEATURES, b"\0" * 4, "size", 4),
    (Request.SET_VRING_NUM, b"\0" * 12, "size", 12),
    (Request.SET_VRING_ADDR, b"\0" * 32, "size", 32),
    (Request.SET_OWNER, b"\0" * 8, "size", 8),
    (Request.SET_LOG_BASE, b"\0" * 8, "size", 8),
    (Request.SET_MEM_TABLE, struct.pack("<II", 0, 0), "num_regions", 0),
    (Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(32 * 8), "num_regions", 9),
    (Request.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(32), "size", 40),
    (Request.SET_MEM_TABLE, b"\0" * 4, "size", 4),
    (Request.GET_CONFIG, struct.pack("<III", 0, 16, 0) + bytes(8), "config.size", 16),
    (Request.GET_CONFIG, struct.pack("<III", 0, 257, 0) + bytes(257 - 13), "config.size", 257),
    (Request.SET_CONFIG, b"\0" * 8, "size", 8),
])
def test_decode_rejects_wrong_sizes(req, data, field, value):
    e = _violation(p.decode_payload, req, data)
    assert (e.request, e.field, e.value) == (req.name, field, value)
    assert req.name in str(e) and f"{field}={value}" in str(e)


def _msg(req, payload=b"", fds=(), flags=p.VERSION):
    return t.Message(int(req), flags, len(payload), payload, list(fds))


@pytest.mark.parametrize("msg, field, value", [
    (_msg(Request.GET_FEATURES, flags=0x2), "flags.version", 2),
    (_msg(Request.GET_FEATURES, flags=0x0), "flags.version", 0),
    (_msg(Request.GET_FEATURES, flags=p.VERSION | p.FLAG_REPLY), "flags", 5),
    (_msg(99), "request", 99),
    (_msg(0), "request", 0),
    (_msg(Request.SET_OWNER, fds=[1000]), "fds", 1),
    (_msg(Request.SET_VRING_KICK, p.pack_u64(0)), "fds", 0),
    (_msg(Request.SET_VRING_KICK, p.pack_u64(0x100), fds=[1000]), "fds", 1),
    (_msg(Request.SET_VRING_CALL, p.pack_u64(0x200)), "u64", 0x200),
    (_msg(Request.SET_LOG_BASE, LogPayload(4096, 0).pack()), "fds", 0),
    (_msg(Request.SET_MEM_TABLE, MemoryTable([MemoryRegionDesc(0, 1, 0, 0)] * 2).pack(), fds=[1000]),
     "fds", 1),
])
def test_check_header_rejects(msg, field, value):
    e = _violation(p.check_header, msg)
    assert (e.field, e.value) == (field, value)


def test_check_header_accepts_and_decodes():
    req, payload = p.check_header(_msg(Request.SET_VRING_KICK, p.pack_u64(0x101)))
    assert req == Request.SET_VRING_KICK and payload == 0x101
    req, payload = p.check_header(_msg(Request.SET_VRING_NUM, VringState(1, 256).pack()))
    assert payload == VringState(1, 256)
    e = _violation(p.check_index, Request.SET_VRING_NUM, VringState(2, 256), 2)
    assert (e.request, e.field, e.value) == ("SET_VRING_NUM", "index", 2)
    e = _violation(p.check_index, Request.SET_VRING_CALL, 0x105, 4)
    assert (e.field, e.value) == ("index", 5)


# --- message I/O over a real socketpair ---------------------------------------

def _memfd(name="vqscope-codec"):
    fd = os.memfd_create(name)
    os.ftruncate(fd, 4096)
    return fd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_message_round_trip_with_fds():
    a, b = socket.socketpair()
    fds = [_memfd() for _ in range(3)]
    try:
        table = MemoryTable([MemoryRegionDesc(i << 20, 4096, 0x1000 + (i << 20), 0) for i in range(3)])
        t.send_message(a, Request.SET_MEM_TABLE, table.pack(), fds=fds)
        msg = t.recv_message(b)
        assert (msg.request, msg.flags, msg.size) == (5, 1, 8 + 96)
        assert len(msg.fds) == 3
        assert all(os.fstat(x).st_ino == os.fstat(y).st_ino for x, y in zip(msg.fds, fds))
        req, payload = p.check_header(msg)
        assert payload == table
        msg.close_fds()
        assert msg.fds == []
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_clean_eof_between_messages_is_none():
    a, b = socket.socketpair()
    a.close()
    assert t.recv_message(b) is None
    b.close()


@pytest.mark.parametrize("cut", [5, 12 + 4])
def test_peer_closing_mid_message_raises_and_closes_fds(cut):
    a, b = socket.socketpair()
    fd = _memfd()
    data = t.encode_message(Request.SET_VRING_CALL, p.pack_u64(0))
    a.sendmsg([data[:cut]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    a.close()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ProtocolViolation) as ei:
        t.recv_message(b)
    assert "closed" in str(ei.value)
    assert set(os.listdir("/proc/self/fd")) <= before  # the received copy is closed
    os.close(fd)
    b.close()


def test_oversized_payload_rejected_before_reading():
    a, b = socket.socketpair()
    t.send_message(a, Request.GET_FEATURES, b"", size=4096)
    e = _violation(t.recv_message, b)
    assert (e.request, e.field, e.value) == ("GET_FEATURES", "size", 4096)
    a.close()
    b.close()


def test_too_many_fds_rejected_and_all_closed():
    a, b = socket.socketpair()
    fds = [_memfd() for _ in range(9)]
    before = len(os.listdir("/proc/self/fd"))
    t.send_message(a, Request.SET_VRING_KICK, p.pack_u64(0), fds=fds)
    e = _violation(t.recv_message, b)
    assert (e.request, e.field, e.value) == ("SET_VRING_KICK", "fds", 9)
    assert len(os.listdir("/proc/self/fd")) == before
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()


def test_stalled_peer_times_out():
    a, b = socket.socketpair()
    b.settimeout(0.2)
    a.send(t.encode_header(Request.SET_FEATURES, 1, 8))
    e = _violation(t.recv_message, b)
    assert "stalled" in str(e)
    a.close()
    b.close()


def test_payload_fields_are_plain_ints():
    assert p.payload_fields(7) == {"u64": 7}
    assert p.payload_fields(VringState(1, 2)) == {"index": 1, "num": 2}
    f = p.payload_fields(MemoryTable([MemoryRegionDesc(0, 4096, 0x1000, 0)]))
    assert f == {"num_regions": 1, "regions": [{"guest_phys_addr": 0, "memory_size": 4096,
                                                 "userspace_addr": 0x1000, "mmap_offset": 0}]}
    assert p.payload_fields(ConfigPayload(0, 4, 0, b"abcd")) == {"offset": 0, "size": 4, "flags": 0}


@pytest.mark.parametrize("event, new, old, need", [
    (0, 1, 0, True), (0, 2, 1, False), (1, 2, 1, True), (5, 10, 0, True), (9, 10, 0, True),
    (10, 10, 0, False),
    (10, 9, 0, False), (0xFFFF, 0, 0xFFFF, True),
])
def test_vring_need_event(event, new, old, need):
    assert vring_need_event(event, new, old) is need


def test_message_reader_resumes_partial_messages_without_blocking():
    """A message trickling in one byte per readable event is assembled across
    calls; each call returns at once (MSG_DONTWAIT) with None until the last
    byte, and the fds sent with the first byte belong to that message."""
    a, b = socket.socketpair()
    b.setblocking(False)
    fd = _memfd()
    reader = t.MessageReader()
    try:
        data = t.encode_message(Request.SET_VRING_CALL, p.pack_u64(1))
        assert reader.feed(b) is None and not reader.eof and not reader.partial
        for i, byte in enumerate(data):
            if i == 0:
                a.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
            else:
                a.send(data[i:i + 1])
            msg = reader.feed(b)
            if i < len(data) - 1:
                assert msg is None and reader.partial
                assert reader.stall_violation().field == ("length" if i < 11 else "size")
        assert (msg.request, msg.size, p.unpack_u64("x", msg.payload)) == (Request.SET_VRING_CALL, 8, 1)
        assert len(msg.fds) == 1 and os.fstat(msg.fds[0]).st_ino == os.fstat(fd).st_ino
        assert not reader.partial
        msg.close_fds()
        a.close()
        assert reader.feed(b) is None and reader.eof
    finally:
        reader.close()
        os.close(fd)
        a.close()
        b.close()
