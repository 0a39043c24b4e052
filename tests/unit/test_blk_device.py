"""BlkDevice (inspector/devices/blk.py) behind the real vhost-user server,
driven by the built-in vhost-user-blk front-end (BlkFrontend) over a real
socket: in-process for the device's answers and counters, and as
``python -m inspector serve blk`` for the command line and its
introspection socket. Images live on tmpfs.

Every bad-request kind (BLK_BAD_REQUEST_KINDS) is sent once and gets its
status and its counter while the queue and the server go on.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

from inspector.datapath.blk import BlkDisk
from inspector.devices.blk import BLK_BAD_REQUEST_KINDS, BlkDevice
from inspector.errors import DeviceError, InspectorError, ProtocolError
from inspector.faults import parse_fault
from inspector.introspect.snapshot import backend_snapshot
from inspector.spec.virtio import (VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE,
                                   VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
                                   VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
                                   VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
                                   VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
                                   VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                                   VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                                   VIRTIO_RING_F_INDIRECT_DESC, has_feature)
from inspector.vhost_user.blk_frontend import BlkFrontend
from inspector.vhost_user.protocol import FLAG_NEED_REPLY, VERSION, ConfigPayload, ProtocolFeature, Request
from inspector.vhost_user.server import VhostUserServer
from tests.conftest import ROOT, VQSCOPE, wait_for
from tests.support.peers import wait_path

IMAGE_SIZE = 4 << 20
CAPACITY = IMAGE_SIZE // 512
SEG_MAX = 4
SIZE_MAX = 8192
MAX_DISCARD = 64          # sectors
MAX_WZ = 64


def _shm_dir() -> str:
    return tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="vqs-blkdev-")


def _image(d: str, name: str = "img", fill: bytes = b"") -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        if fill:
            f.write(fill)
    return path


def _disk(path: str, **kw) -> BlkDisk:
    return BlkDisk(path, seg_max=SEG_MAX, size_max=SIZE_MAX, max_discard_sectors=MAX_DISCARD,
                   max_discard_seg=1, max_write_zeroes_sectors=MAX_WZ, max_write_zeroes_seg=1, **kw)


class Served:
    """An in-process server of BlkDevice(disk) on a fresh socket."""

    def __init__(self, d: str, disk: BlkDisk, num_queues: int = 1, **kw):
        self.sock = os.path.join(d, f"vu-{time.monotonic_ns()}.sock")
        self.disk = disk
        self.devices: list[BlkDevice] = []

        def factory():
            dev = BlkDevice(disk, num_queues, **kw)
            self.devices.append(dev)
            return dev

        self.server = VhostUserServer(self.sock, factory, introspect_path=self.sock + ".i",
                                      snapshot_fn=backend_snapshot)
        self.server.start()

    def blk(self, q: int = 0) -> dict:
        return self.devices[-1].queue_stats(q).extras["blk"]

    def close(self) -> None:
        self.server.stop()
        self.disk.close()


@pytest.fixture
def tmpd():
    d = _shm_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(tmpd):
    s = Served(tmpd, _disk(_image(tmpd)))
    yield s
    s.close()


def _set_config(fe: BlkFrontend, offset: int, data: bytes) -> int:
    """SET_CONFIG with REPLY_ACK; the ack (0: done)."""
    fe.send_raw(Request.SET_CONFIG, ConfigPayload(offset, len(data), 0, data).pack(),
                flags=VERSION | FLAG_NEED_REPLY)
    reply = fe.recv_reply()
    assert reply.request == Request.SET_CONFIG
    return struct.unpack("<Q", reply.payload)[0]


def _status(fe: BlkFrontend, head: int, q: int = 0):
    """Wait for ``head``: its completion and its status (None when the used
    length is 0: nothing written). A device that fails a request writes
    only the status byte (§5.2.6, used length 1): BlkFrontend reads it all
    the same."""
    c = fe.wait_head(q, head, 5.0)
    return c, c.status


def _read_image(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# --- features and config space --------------------------------------------------------------
def test_features_and_config_space(served):
    with BlkFrontend(served.sock) as fe:
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
                    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC):
            assert has_feature(fe.device_features, bit), bit
        assert not has_feature(fe.device_features, VIRTIO_BLK_F_RO)
        assert has_feature(fe.device_features, VIRTIO_F_RING_PACKED)
        assert not has_feature(fe.features, VIRTIO_F_RING_PACKED)     # BlkFrontend asks for split rings
        for pf in (ProtocolFeature.CONFIG, ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                   ProtocolFeature.BACKEND_REQ):
            assert fe.protocol_features & pf, pf
        cfg = fe.config()
        assert cfg["capacity"] == CAPACITY
        assert (cfg["seg_max"], cfg["size_max"], cfg["blk_size"], cfg["num_queues"]) == (SEG_MAX, SIZE_MAX, 512, 1)
        assert (cfg["max_discard_sectors"], cfg["max_discard_seg"]) == (MAX_DISCARD, 1)
        assert (cfg["max_write_zeroes_sectors"], cfg["max_write_zeroes_seg"]) == (MAX_WZ, 1)
        assert cfg["writeback"] == 1
        # QEMU 7.2 asks for its own sizeof (60 bytes); any range inside the 72 is answered.
        assert fe.get_config(0, 60) == fe.get_config(0, VIRTIO_BLK_CONFIG_SIZE)[:60]
        assert fe.get_config(32, 1) == b"\x01"
        with pytest.raises(ProtocolError):
            fe.get_config(0, VIRTIO_BLK_CONFIG_SIZE + 1)   # refused: an empty reply
        # The connection lives on.
        assert fe.request(0, VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK


def test_set_config_changes_writeback_only(served):
    with BlkFrontend(served.sock) as fe:
        assert _set_config(fe, 32, b"\x00") == 0
        assert fe.config()["writeback"] == 0 and served.disk.writeback is False
        # Writethrough: writes still complete, and land in the image.
        assert fe.request(0, VIRTIO_BLK_T_OUT, 0, b"w" * 512).status == VIRTIO_BLK_S_OK
        assert _set_config(fe, 32, b"\x01") == 0
        assert served.disk.writeback is True
        assert _set_config(fe, 32, b"\x02") != 0                 # not a cache mode
        assert _set_config(fe, 0, b"\x00" * 8) != 0              # capacity is read-only
        assert _set_config(fe, 70, b"\x00" * 8) != 0             # beyond struct virtio_blk_config
        whole = fe.get_config(0, VIRTIO_BLK_CONFIG_SIZE)         # the same bytes, writeback flipped: fine
        assert _set_config(fe, 0, whole[:32] + b"\x00" + whole[33:]) == 0
        assert fe.config()["writeback"] == 0
        assert fe.request(0, VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
    dev = BlkDevice(served.disk)
    with pytest.raises(DeviceError, match="capacity"):
        dev.set_config(0, b"\x01")


# --- requests ----------------------------------------------------------------------------------
def test_write_read_flush_get_id_discard_write_zeroes(tmpd):
    img = _image(tmpd)
    s = Served(tmpd, _disk(img, serial=b"vqscope-test"))
    try:
        with BlkFrontend(s.sock) as fe:
            data = os.urandom(8192)
            c = fe.request(0, VIRTIO_BLK_T_OUT, 16, data)
            assert (c.status, c.used_len) == (VIRTIO_BLK_S_OK, 1)
            c = fe.request(0, VIRTIO_BLK_T_IN, 16, in_len=8192)
            assert (c.status, c.data, c.used_len) == (VIRTIO_BLK_S_OK, data, 8193)
            assert fe.request(0, VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
            assert _read_image(img, 16 * 512, 8192) == data
            c = fe.request(0, VIRTIO_BLK_T_GET_ID, in_len=VIRTIO_BLK_ID_BYTES)
            assert c.status == VIRTIO_BLK_S_OK and c.data == b"vqscope-test".ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            c = fe.request(0, VIRTIO_BLK_T_WRITE_ZEROES, segments=[(16, 4, 0)])
            assert c.status == VIRTIO_BLK_S_OK
            assert _read_image(img, 16 * 512, 2048) == bytes(2048)
            assert _read_image(img, 20 * 512, 6144) == data[2048:]
            c = fe.request(0, VIRTIO_BLK_T_WRITE_ZEROES, segments=[(20, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)])
            assert c.status == VIRTIO_BLK_S_OK and _read_image(img, 20 * 512, 2048) == bytes(2048)
            c = fe.request(0, VIRTIO_BLK_T_DISCARD, segments=[(24, 8, 0)])
            assert c.status == VIRTIO_BLK_S_OK
            blk = s.blk()
            assert blk["requests"] == {"in": 1, "out": 1, "flush": 1, "get_id": 1, "discard": 1,
                                       "write_zeroes": 2, "other": 0}
            assert blk["status"] == {"ok": 7, "ioerr": 0, "unsupp": 0}
            assert blk["bytes_written"] >= 8192 and blk["bytes_read"] >= 8192
            assert [r["type"] for r in blk["recent"]] == ["out", "in", "flush", "get_id", "write_zeroes",
                                                           "write_zeroes", "discard"]
            assert blk["in_flight"] == 0 and blk["resubmitted"] == 0
            assert set(blk["bad_requests"]) == set(BLK_BAD_REQUEST_KINDS)
            assert not any(blk["bad_requests"].values())
            st = s.devices[-1].queue_stats(0)
            assert st.packets == 7 and st.broken is None
            # A stopped vring (GET_VRING_BASE) keeps its counters, counted once.
            fe.get_vring_base(0)
            assert s.blk() == blk
            assert s.devices[-1].queue_stats(0).packets == 7
    finally:
        s.close()


def test_packed_rings(tmpd):
    s = Served(tmpd, _disk(_image(tmpd)))
    try:
        with BlkFrontend(s.sock, packed=True) as fe:
            assert has_feature(fe.features, VIRTIO_F_RING_PACKED)
            data = os.urandom(4096)
            assert fe.request(0, VIRTIO_BLK_T_OUT, 8, data).status == VIRTIO_BLK_S_OK
            assert fe.request(0, VIRTIO_BLK_T_IN, 8, in_len=4096).data == data
            c, got = _status(fe, fe.submit(0, 99))
            assert got == VIRTIO_BLK_S_UNSUPP
            assert s.blk()["requests"]["out"] == 1
            snap = backend_snapshot(s.server)
            assert snap.queues[0].layout == "packed" and snap.queues[0].extras["blk"]["requests"]["in"] == 1
    finally:
        s.close()
    dev = BlkDevice(s.disk, packed=False)
    assert not has_feature(dev.features(), VIRTIO_F_RING_PACKED)


def test_many_requests_in_flight_complete(served):
    with BlkFrontend(served.sock, queue_size=128) as fe:
        heads = {}
        for i in range(40):
            heads[fe.submit(0, VIRTIO_BLK_T_OUT, 8 * i, bytes([i]) * 4096, publish=False)] = i
        fe.publish(0)
        done = []
        deadline = time.monotonic() + 20
        while len(done) < len(heads) and time.monotonic() < deadline:
            done += fe.complete(0, 1.0)
        assert sorted(c.head for c in done) == sorted(heads)
        assert all(c.status == VIRTIO_BLK_S_OK for c in done)
        for i in (0, 17, 39):
            assert fe.request(0, VIRTIO_BLK_T_IN, 8 * i, in_len=4096).data == bytes([i]) * 4096


# --- bad requests -------------------------------------------------------------------------------
_HDR = struct.Struct("<IIQ")


def _hdr(type_: int, sector: int = 0) -> bytes:
    return _HDR.pack(type_, 0, sector)


#: kind -> (how to send it, the status it gets; None: no status written, used len 0).
BAD = {
    "header_short": (lambda fe: fe.submit_chain(0, [(b"\0" * 8, False), (1, True)]), VIRTIO_BLK_S_IOERR),
    "status_missing": (lambda fe: fe.submit_chain(0, [(_hdr(VIRTIO_BLK_T_IN), False)]), None),
    "status_not_writable": (lambda fe: fe.submit_chain(0, [(_hdr(VIRTIO_BLK_T_OUT), False), (b"\0" * 512, False),
                                                            (b"\0", False)]), None),
    "data_not_writable": (lambda fe: fe.submit(0, VIRTIO_BLK_T_IN, 0, b"\0" * 512), VIRTIO_BLK_S_IOERR),
    "data_not_readable": (lambda fe: fe.submit(0, VIRTIO_BLK_T_OUT, 0, in_len=512), VIRTIO_BLK_S_IOERR),
    "out_of_range": (lambda fe: fe.submit(0, VIRTIO_BLK_T_IN, CAPACITY - 1, in_len=1024), VIRTIO_BLK_S_IOERR),
    "sector_overflow": (lambda fe: fe.submit(0, VIRTIO_BLK_T_OUT, (1 << 64) - 1, b"\0" * 512),
                        VIRTIO_BLK_S_IOERR),
    "unaligned": (lambda fe: fe.submit(0, VIRTIO_BLK_T_OUT, 0, b"\0" * 100), VIRTIO_BLK_S_IOERR),
    "too_many_segments": (lambda fe: fe.submit_chain(0, [(_hdr(VIRTIO_BLK_T_OUT), False)]
                                                     + [(b"\0" * 512, False)] * (SEG_MAX + 1) + [(1, True)]),
                          VIRTIO_BLK_S_IOERR),
    "segment_too_large": (lambda fe: fe.submit(0, VIRTIO_BLK_T_OUT, 0, b"\0" * (2 * SIZE_MAX)),
                          VIRTIO_BLK_S_IOERR),
    "unsupported": (lambda fe: fe.submit(0, 99), VIRTIO_BLK_S_UNSUPP),
    "get_id_short": (lambda fe: fe.submit(0, VIRTIO_BLK_T_GET_ID, in_len=VIRTIO_BLK_ID_BYTES - 1),
                     VIRTIO_BLK_S_IOERR),
    "discard_over_limit": (lambda fe: fe.submit(0, VIRTIO_BLK_T_DISCARD, segments=[(0, MAX_DISCARD + 8, 0)]),
                           VIRTIO_BLK_S_IOERR),
    "write_zeroes_over_limit": (lambda fe: fe.submit(0, VIRTIO_BLK_T_WRITE_ZEROES,
                                                     segments=[(0, 8, 0), (8, 8, 0)]), VIRTIO_BLK_S_IOERR),
    # §5.2.6.2: a DISCARD with flags other than 0 (unmap is WRITE_ZEROES') is UNSUPP.
    "discard_bad_segment": (lambda fe: fe.submit(0, VIRTIO_BLK_T_DISCARD,
                                                 segments=[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]),
                            VIRTIO_BLK_S_UNSUPP),
}


def test_every_bad_request_gets_its_status_and_counter_and_the_queue_goes_on(served):
    assert set(BAD) | {"read_only", "io_error"} == set(BLK_BAD_REQUEST_KINDS)
    with BlkFrontend(served.sock, max_data=4 * SIZE_MAX) as fe:
        for kind, (send, status) in BAD.items():
            before = served.blk()["bad_requests"][kind]
            c, got = _status(fe, send(fe))
            assert got == status, (kind, c)
            if status is None:
                assert c.used_len == 0, (kind, c)
            assert served.blk()["bad_requests"][kind] == before + 1, kind
            assert served.blk()["recent"][-1]["bad"] == kind
            # The queue goes on.
            assert fe.request(0, VIRTIO_BLK_T_OUT, 8, b"ok" * 256).status == VIRTIO_BLK_S_OK, kind
        st = served.devices[-1].queue_stats(0)
        assert st.broken is None
        assert served.blk()["status"]["unsupp"] == 2
    # The server goes on: a second connection works.
    with BlkFrontend(served.sock) as fe:
        assert fe.request(0, VIRTIO_BLK_T_IN, 8, in_len=512).data == b"ok" * 256


def test_io_error_is_counted(tmpd):
    """The host I/O fails: the image shrank under the device, so a read
    within the capacity it announced runs past the end of the file."""
    img = _image(tmpd)
    s = Served(tmpd, _disk(img))
    try:
        with BlkFrontend(s.sock) as fe:
            os.truncate(img, IMAGE_SIZE // 2)
            c, got = _status(fe, fe.submit(0, VIRTIO_BLK_T_IN, CAPACITY - 8, in_len=4096))
            assert got == VIRTIO_BLK_S_IOERR, c
            assert s.blk()["bad_requests"]["io_error"] == 1
            assert fe.request(0, VIRTIO_BLK_T_IN, 0, in_len=512).status == VIRTIO_BLK_S_OK
    finally:
        s.close()


def test_readonly_disk_refuses_writes(tmpd):
    img = _image(tmpd, fill=b"r" * 4096)
    s = Served(tmpd, _disk(img, readonly=True))
    try:
        with BlkFrontend(s.sock) as fe:
            assert has_feature(fe.device_features, VIRTIO_BLK_F_RO)
            for type_, kw in ((VIRTIO_BLK_T_OUT, dict(data=b"x" * 512)),
                              (VIRTIO_BLK_T_DISCARD, dict(segments=[(0, 8, 0)])),
                              (VIRTIO_BLK_T_WRITE_ZEROES, dict(segments=[(0, 8, 0)]))):
                assert fe.request(0, type_, 0, **kw).status == VIRTIO_BLK_S_IOERR
            assert s.blk()["bad_requests"]["read_only"] == 3
            c = fe.request(0, VIRTIO_BLK_T_IN, 0, in_len=4096)
            assert c.status == VIRTIO_BLK_S_OK and c.data == b"r" * 4096
        assert _read_image(img, 0, 4096) == b"r" * 4096
    finally:
        s.close()


def test_two_request_queues(tmpd):
    s = Served(tmpd, _disk(_image(tmpd)), num_queues=2)
    try:
        with BlkFrontend(s.sock, num_queues=2) as fe:
            assert fe.config()["num_queues"] == 2
            assert fe.request(0, VIRTIO_BLK_T_OUT, 0, b"0" * 512).status == VIRTIO_BLK_S_OK
            assert fe.request(1, VIRTIO_BLK_T_OUT, 8, b"1" * 512).status == VIRTIO_BLK_S_OK
            assert fe.request(1, VIRTIO_BLK_T_IN, 0, in_len=512).data == b"0" * 512
            assert fe.request(0, VIRTIO_BLK_T_IN, 8, in_len=512).data == b"1" * 512
            assert s.blk(0)["requests"]["out"] == 1 and s.blk(1)["requests"]["out"] == 1
            snap = backend_snapshot(s.server)
            assert [q.index for q in snap.queues] == [0, 1]
            assert all(q.device_type == "block" and q.extras["blk"]["requests"]["in"] == 1 for q in snap.queues)
    finally:
        s.close()


def test_hold_io_keeps_requests_in_flight_until_it_ends(tmpd):
    s = Served(tmpd, _disk(_image(tmpd)), faults=[parse_fault("hold-io=0,for=3")])
    try:
        with BlkFrontend(s.sock) as fe:
            heads = [fe.submit(0, VIRTIO_BLK_T_OUT, 8 * i, b"h" * 512) for i in range(4)]
            assert wait_for(lambda: s.blk()["in_flight"] == 4, 5.0), s.blk()
            assert fe.complete(0, 0.2) == []
            st = s.devices[-1].queue_stats(0)
            assert st.inject["faults"] == ["hold-io=0,for=3"]
            done = []
            deadline = time.monotonic() + 10
            while len(done) < 4 and time.monotonic() < deadline:
                done += fe.complete(0, 0.5)
            assert sorted(c.head for c in done) == sorted(heads)
            assert all(c.status == VIRTIO_BLK_S_OK for c in done)
            assert wait_for(lambda: s.blk()["in_flight"] == 0, 5.0)
    finally:
        s.close()


def test_device_refuses_what_it_does_not_have(tmpd):
    disk = _disk(_image(tmpd))
    try:
        with pytest.raises(InspectorError, match="not a device fault of virtio-blk"):
            BlkDevice(disk, faults=[parse_fault("stall=0")])
        with pytest.raises(InspectorError, match="vring 2 does not exist"):
            BlkDevice(disk, 2, faults=[parse_fault("hold-io=2")])
        with pytest.raises(InspectorError, match="num_queues 0"):
            BlkDevice(disk, 0)
        dev = BlkDevice(disk)
        assert (dev.name, dev.device_type, dev.supports_inflight, dev.queue_num()) == ("blk", "block", True, 1)
        with pytest.raises(DeviceError, match="outside struct virtio_blk_config"):
            dev.get_config(64, 16)
    finally:
        disk.close()


def test_no_fd_leak_after_connections_close(served):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with BlkFrontend(served.sock, inflight=True) as fe:     # warm up (threads, lazily opened fds)
        fe.request(0, VIRTIO_BLK_T_OUT, 0, b"x" * 512)
    assert wait_for(lambda: not served.server.connections, 5.0)
    before = fds()
    for _ in range(3):
        with BlkFrontend(served.sock, num_queues=1, inflight=True) as fe:
            fe.request(0, VIRTIO_BLK_T_OUT, 0, b"x" * 512)
            fe.wait_head(0, fe.submit(0, 99), 5.0)
    assert wait_for(lambda: not served.server.connections, 5.0)
    assert wait_for(lambda: fds() <= before, 5.0), (before, fds())


# --- the command line ----------------------------------------------------------------------------
def test_serve_blk_subprocess_and_its_snapshot(tmpd):
    img = _image(tmpd)
    sock = os.path.join(tmpd, "serve.sock")
    proc = subprocess.Popen(VQSCOPE + ["serve", "blk", "--socket", sock, "--file", img, "--queues", "2"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_path(sock + ".introspect", 20, alive=lambda: proc.poll() is None)
        assert proc.poll() is None, proc.stderr.read()
        with BlkFrontend(sock, num_queues=2) as fe:
            assert fe.config()["capacity"] == CAPACITY
            data = os.urandom(4096)
            assert fe.request(1, VIRTIO_BLK_T_OUT, 64, data).status == VIRTIO_BLK_S_OK
            assert fe.request(0, VIRTIO_BLK_T_IN, 64, in_len=4096).data == data
            assert fe.wait_head(1, fe.submit(1, 99)).status == VIRTIO_BLK_S_UNSUPP
            out = subprocess.run(VQSCOPE + ["snapshot", "--connect", sock, "--json"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            queues = json.loads(out.stdout)["queues"]
            assert [(q["device_type"], q["index"]) for q in queues] == [("block", 0), ("block", 1)]
            assert queues[1]["blk"]["requests"]["out"] == 1
            assert queues[1]["blk"]["bad_requests"]["unsupported"] == 1
            assert queues[0]["blk"]["bytes_read"] == 4096
        assert _read_image(img, 64 * 512, 4096) == data
    finally:
        proc.terminate()
        proc.wait(10)
        err = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == 0, err
    assert "virtio-blk" in err


@pytest.mark.parametrize("argv, message", [
    (["--file", "/nonexistent/vqscope.img"], "no such file"),
    (["--memory", "--size", "12Q"], "--size '12Q' is invalid"),
    (["--memory", "--size", "1000"], "not a multiple of 512"),
    (["--memory"], "--memory needs --size"),
    (["--memory", "--size", "1M", "--queues", "0"], "--queues 0 is invalid"),
])
def test_serve_blk_errors_are_one_line_and_exit_2(tmpd, argv, message):
    out = subprocess.run(VQSCOPE + ["serve", "blk", "--socket", os.path.join(tmpd, "s"), *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
