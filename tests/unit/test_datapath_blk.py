"""The virtio-blk data path (csrc/vqd_blk.c, inspector.datapath.blk) driven
directly, without vhost-user: a split ring in a memfd-backed GuestMemory
written by inspector.ring.driver.DriverRing, a DeviceQueue over it, and
BlkQueue.run in a thread against an image on tmpfs (/dev/shm).

Requests follow VIRTIO 1.2 §5.2.6: a 16-byte device-readable header (type,
reserved, sector), data, and a device-writable status byte last. Bad requests
quote the rule they break; each must get its status and counter while the
queue goes on. No timed assertions: waits only bound hangs.
"""

from __future__ import annotations

import gc
import mmap
import os
import shutil
import subprocess
import struct
import tempfile
import threading
import time

import pytest

from inspector.datapath.blk import BAD_REQUEST_KINDS, BlkDisk, BlkQueue
from inspector.datapath.inflight import queue_area_size, read_queue
from inspector.datapath.inflight import InflightAreas
from inspector.datapath.packed_queue import PackedDeviceQueue
from inspector.datapath.queue import DeviceQueue
from inspector.errors import ArgumentError
from inspector.memory import GuestMemory
from inspector.ring.driver import DriverRing
from inspector.ring.driver_packed import PackedDriverRing
from inspector.spec.virtio import (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
                                   VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                                   VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
                                   VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)

GPA = 0x100000
MEM_SIZE = 8 << 20
DATA = GPA + 0x20000
HDR = struct.Struct("<IIQ")        # struct virtio_blk_outhdr
SEG = struct.Struct("<QII")        # struct virtio_blk_discard_write_zeroes
NO_STATUS = None
WAIT_S = 20.0                      # only bounds a hang; never a timing assertion

#: The bad-request kinds of BRIEF_COMMON's shared interface 2, in the C order.
KINDS = ("header_short", "status_missing", "status_not_writable", "data_not_writable",
         "data_not_readable", "out_of_range", "sector_overflow", "unaligned", "too_many_segments",
         "segment_too_large", "read_only", "unsupported", "get_id_short", "discard_over_limit",
         "write_zeroes_over_limit", "discard_bad_segment", "io_error")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def shm():
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="vqd-blk-") as d:
        yield d


class Rig:
    """Guest memory (a memfd), a driver ring, the device's queue and a
    BlkQueue serviced by a thread until :meth:`close`."""

    def __init__(self, image: str | None, *, qsize: int = 256, depth: int = 128, engine: str = "auto",
                 event_idx: bool = True, disk: BlkDisk | None = None, image_size: int = 1 << 20,
                 inflight: bytearray | None = None, layout: str = "split", **disk_kw):
        self.memfd = os.memfd_create("vqd-blk-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mm = mmap.mmap(self.memfd, MEM_SIZE)
        self.mem = GuestMemory()
        self.mem.add(GPA, self.mm)
        self.layout = layout
        self.drv = (PackedDriverRing if layout == "packed" else DriverRing)(self.mem, GPA, qsize)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.qsize, self.event_idx, self.depth, self.engine = qsize, event_idx, depth, engine
        self.inflight, self.areas = inflight, None
        self.disk = disk or BlkDisk(image, size=image_size, **disk_kw)
        self.next = DATA
        self.done: dict[int, int] = {}   # head -> used len
        self.errors: list[BaseException] = []
        self._start(0)

    def _start(self, last_avail_idx: int) -> int:
        """A back-end incarnation: device queue (inflight tracking attached
        first, if any), BlkQueue, run thread. Returns the heads resubmitted."""
        fds = {"call_fd": self.call, "kick_fd": self.kick, "event_capacity": 1024,
               "event_idx": self.event_idx, "gpa": True}
        if self.layout == "packed":
            self.dev = PackedDeviceQueue(self.mem, self.qsize, self.drv.desc_addr,
                                         self.drv.driver_event_addr, self.drv.device_event_addr, **fds)
        else:
            self.dev = DeviceQueue(self.mem, self.qsize, self.drv.desc_addr, self.drv.avail_addr,
                                   self.drv.used_addr, last_avail_idx=last_avail_idx, **fds)
        resubmit = 0
        if self.inflight is not None:
            self.areas = InflightAreas()
            self.areas.set(self.inflight, 1, self.qsize)
            resubmit = self.areas.attach(self.dev, 0)
        self.q = BlkQueue(self.dev, self.disk, depth=self.depth, engine=self.engine)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return resubmit

    def _stop(self, complete: bool) -> None:
        self.stop = True
        os.eventfd_write(self.wake, 1)
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        self.q.close(complete=complete)
        if self.areas is not None:
            self.areas.close()
        self.dev.release()

    def crash(self) -> None:
        """The back-end dies with its requests in flight: nothing more is
        written to the ring."""
        self._stop(complete=False)

    def restart(self) -> int:
        """A new back-end on the same ring, inflight area and disk, from
        SET_VRING_BASE = used->idx (as QEMU sends after a crash). Returns the
        heads it resubmits."""
        return self._start(self.drv.used_idx)

    def _run(self):
        try:
            while not self.stop and not self.q.broken:
                self.q.run(self.wake, 500)
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.errors.append(e)

    # --- guest memory ---------------------------------------------------------
    def alloc(self, n: int, align: int = 16) -> int:
        self.next = (self.next + align - 1) & ~(align - 1)
        a = self.next
        self.next += max(n, 1)
        assert self.next < GPA + MEM_SIZE
        return a

    def put(self, data: bytes, align: int = 16) -> int:
        a = self.alloc(len(data), align)
        self.mem.view(a, len(data))[:] = data
        return a

    def get(self, gpa: int, n: int) -> bytes:
        return self.mem.read(gpa, n)

    # --- requests ---------------------------------------------------------------
    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        return self.drv.add_chain(buffers)

    def publish(self):
        self.drv.publish()
        os.eventfd_write(self.kick, 1)

    def chain(self, rtype: int, sector: int = 0, data: bytes = b"", in_len: int = 0, *,
              data_align: int = 512):
        """A well-formed request; returns (head, data-in gpa, status gpa)."""
        bufs = [(self.put(HDR.pack(rtype, 0, sector)), 16, False)]
        if data:
            bufs.append((self.put(data, data_align), len(data), False))
        din = None
        if in_len:
            din = self.alloc(in_len, data_align)
            bufs.append((din, in_len, True))
        st = self.put(b"\xee")
        bufs.append((st, 1, True))
        return self.add(bufs), din, st

    def wait(self, heads) -> dict[int, int]:
        heads = set(heads)
        deadline = time.monotonic() + WAIT_S
        while not heads <= self.done.keys():
            for h, n in self.drv.get_used():
                self.done[h] = n
            if self.q.broken or time.monotonic() > deadline:
                break
            time.sleep(0.0005)
        missing = heads - self.done.keys()
        assert not missing, f"heads {sorted(missing)} not completed; broken: {self.q.broken}"
        return {h: self.done.pop(h) for h in heads}

    def wait_in_flight(self, n: int) -> None:
        """Wait until the queue holds ``n`` requests in flight."""
        deadline = time.monotonic() + WAIT_S
        while self.counters()["in_flight"] < n and time.monotonic() < deadline:
            time.sleep(0.001)
        assert self.counters()["in_flight"] == n

    def request(self, rtype: int, sector: int = 0, data: bytes = b"", in_len: int = 0, **kw):
        """Submit one request and wait: (status, data read, used len)."""
        head, din, st = self.chain(rtype, sector, data, in_len, **kw)
        self.publish()
        used = self.wait([head])[head]
        return self.get(st, 1)[0], (self.get(din, in_len) if in_len else b""), used

    def raw(self, buffers: list[tuple[bytes | int, bool]], status_at: int | None = -1):
        """Submit a hostile chain of (bytes to put / length, device_writable)
        and wait; returns (status byte at buffer ``status_at``'s last byte, used len)."""
        bufs = []
        for b, w in buffers:
            if isinstance(b, int):
                bufs.append((self.alloc(b, 512), b, w))
            else:
                bufs.append((self.put(b, 512), len(b), w))
        # a sentinel in the would-be status byte
        a, n, _ = bufs[status_at]
        self.mem.view(a + n - 1, 1)[:] = b"\xee"
        head = self.add(bufs)
        self.publish()
        used = self.wait([head])[head]
        return self.get(a + n - 1, 1)[0], used

    def counters(self) -> dict:
        return self.q.counters()

    def close(self, complete: bool = True):
        self._stop(complete)
        self.disk.close()
        self.drv = self.mem = None     # their views of the mapping
        gc.collect()
        self.mm.close()
        for fd in (self.memfd, self.kick, self.call, self.wake):
            os.close(fd)
        if self.errors:
            raise self.errors[0]


def image(d: str, size: int = 1 << 20, fill: bytes = b"\0") -> str:
    p = os.path.join(d, "disk.img")
    with open(p, "wb") as f:
        f.write(fill * (size // len(fill)))
    return p


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# --- the names -------------------------------------------------------------------

def test_bad_request_kinds_are_the_shared_interface():
    assert BAD_REQUEST_KINDS == KINDS


# --- requests that work -------------------------------------------------------------

@pytest.mark.parametrize("engine,layout", [("io_uring", "split"), ("sync", "split"),
                                           ("io_uring", "packed")])
def test_write_then_read_returns_the_data(shm, engine, layout):
    path = image(shm)
    rig = Rig(path, engine=engine, layout=layout)
    try:
        assert rig.q.engine == engine
        data = pattern(4096, 1)
        st, _, used = rig.request(VIRTIO_BLK_T_OUT, 8, data)
        assert (st, used) == (VIRTIO_BLK_S_OK, 1)      # §5.2.6: only the status byte written
        st, got, used = rig.request(VIRTIO_BLK_T_IN, 8, in_len=4096)
        assert (st, got, used) == (VIRTIO_BLK_S_OK, data, 4097)
        with open(path, "rb") as f:
            f.seek(8 * 512)
            assert f.read(4096) == data
        c = rig.counters()
        assert c["requests"]["in"] == 1 and c["requests"]["out"] == 1
        assert c["status"] == {"ok": 2, "ioerr": 0, "unsupp": 0}
        assert c["bytes_read"] == 4096 and c["bytes_written"] == 4096
        assert c["in_flight"] == 0 and set(c["bad_requests"]) == set(KINDS)
        assert not any(c["bad_requests"].values())
        assert [(r["type"], r["sector"], r["data_len"], r["status"], r["bad"]) for r in c["recent"]] == [
            ("out", 8, 4096, "ok", None), ("in", 8, 4096, "ok", None)]
        # kicks read and calls written are in the queue's event log, as for net
        assert {"kick", "call"} <= {kind for _, kind, _ in rig.dev.drain_events()}
    finally:
        rig.close()
    assert rig.dev.counters["kicks"] >= 1


def test_header_and_status_may_share_descriptors_with_data(shm):
    """§5.2.6: the header is the first 16 readable bytes, the status the last
    writable byte, wherever the descriptors split them."""
    rig = Rig(image(shm))
    try:
        data = pattern(1024, 3)
        hdr = HDR.pack(VIRTIO_BLK_T_OUT, 4, 0)
        # header split 5 + 11, the second piece followed by the data in one buffer
        st, used = rig.raw([(hdr[:5], False), (hdr[5:] + data, False), (1, True)])
        assert (st, used) == (VIRTIO_BLK_S_OK, 1)
        # a read whose data and status are one 1025-byte writable buffer
        head_buf = rig.put(HDR.pack(VIRTIO_BLK_T_IN, 4, 0))
        din = rig.alloc(1025, 512)
        head = rig.add([(head_buf, 16, False), (din, 1025, True)])
        rig.publish()
        assert rig.wait([head])[head] == 1025
        assert rig.get(din, 1024) == data and rig.get(din + 1024, 1)[0] == VIRTIO_BLK_S_OK
    finally:
        rig.close()


def test_flush_get_id_and_writethrough(shm):
    rig = Rig(image(shm), serial=b"vqd-serial")
    try:
        assert rig.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
        st, got, used = rig.request(VIRTIO_BLK_T_GET_ID, in_len=20)
        assert (st, got, used) == (VIRTIO_BLK_S_OK, b"vqd-serial".ljust(20, b"\0"), 21)
        rig.disk.writeback = False                     # writethrough: RWF_DSYNC writes
        assert rig.request(VIRTIO_BLK_T_OUT, 0, pattern(512, 9))[0] == VIRTIO_BLK_S_OK
        assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[1] == pattern(512, 9)
        c = rig.counters()
        assert c["requests"]["flush"] == 1 and c["requests"]["get_id"] == 1
    finally:
        rig.close()


@pytest.mark.parametrize("engine", ["io_uring", "sync"])
def test_discard_and_write_zeroes_change_the_image(shm, engine):
    """tmpfs has no FALLOC_FL_ZERO_RANGE: WRITE_ZEROES without UNMAP falls
    back to writing zeros; with UNMAP and DISCARD it punches a hole."""
    path = image(shm, fill=b"\xab")
    rig = Rig(path, engine=engine, max_discard_seg=2, max_write_zeroes_seg=2)
    try:
        def seg(sector, n, flags=0):
            return SEG.pack(sector, n, flags)
        st, _, _ = rig.request(VIRTIO_BLK_T_DISCARD, 0, seg(0, 8) + seg(16, 8))
        assert st == VIRTIO_BLK_S_OK
        st, _, _ = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(32, 8) + seg(48, 200))
        assert st == VIRTIO_BLK_S_OK
        st, _, _ = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(300, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        assert st == VIRTIO_BLK_S_OK
        with open(path, "rb") as f:
            img = f.read()
        zero = [(0, 8), (16, 8), (32, 8), (48, 200), (300, 8)]
        for s, n in zero:
            assert img[s * 512:(s + n) * 512] == bytes(n * 512), (s, n)
        assert img[8 * 512:16 * 512] == b"\xab" * 4096
        assert img[248 * 512:300 * 512] == b"\xab" * (52 * 512)
        assert img[308 * 512:] == b"\xab" * (len(img) - 308 * 512)
        assert rig.counters()["requests"]["discard"] == 1
        assert rig.counters()["requests"]["write_zeroes"] == 2
    finally:
        rig.close()


# --- bad requests: each gets its status and counter, the queue goes on ----------------

def _bad_cases():
    h = lambda t, s=0: HDR.pack(t, 0, s)  # noqa: E731
    seg = SEG.pack
    return [
        # (kind, disk kwargs, chain, expected status (None: no status written), used len)
        ("header_short", {}, [(b"\0" * 8, False), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        ("status_missing", {}, [(h(VIRTIO_BLK_T_FLUSH), False)], None, 0),
        ("status_not_writable", {}, [(h(VIRTIO_BLK_T_OUT), False), (b"\0" * 512, False), (1, False)], None, 0),
        ("data_not_writable", {}, [(h(VIRTIO_BLK_T_IN), False), (b"\0" * 512, False), (1, True)],
         VIRTIO_BLK_S_IOERR, 1),
        ("data_not_readable", {}, [(h(VIRTIO_BLK_T_OUT), False), (512, True), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        ("out_of_range", {}, [(h(VIRTIO_BLK_T_IN, 2047), False), (1024, True), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        ("sector_overflow", {}, [(h(VIRTIO_BLK_T_IN, (1 << 64) - 1), False), (512, True), (1, True)],
         VIRTIO_BLK_S_IOERR, 1),
        ("unaligned", {}, [(h(VIRTIO_BLK_T_IN), False), (100, True), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        ("too_many_segments", {"seg_max": 2},
         [(h(VIRTIO_BLK_T_IN), False), (512, True), (512, True), (512, True), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        ("segment_too_large", {"size_max": 4096}, [(h(VIRTIO_BLK_T_IN), False), (8192, True), (1, True)],
         VIRTIO_BLK_S_IOERR, 1),
        ("read_only", {"readonly": True}, [(h(VIRTIO_BLK_T_OUT), False), (b"\1" * 512, False), (1, True)],
         VIRTIO_BLK_S_IOERR, 1),
        ("unsupported", {}, [(h(99), False), (1, True)], VIRTIO_BLK_S_UNSUPP, 1),
        ("get_id_short", {}, [(h(VIRTIO_BLK_T_GET_ID), False), (10, True), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        ("discard_over_limit", {"max_discard_sectors": 64},
         [(h(VIRTIO_BLK_T_DISCARD) + seg(0, 65, 0), False), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        ("write_zeroes_over_limit", {"max_write_zeroes_seg": 1},
         [(h(VIRTIO_BLK_T_WRITE_ZEROES) + seg(0, 1, 0) + seg(8, 1, 0), False), (1, True)], VIRTIO_BLK_S_IOERR, 1),
        # §5.2.6.2: UNSUPP for a discard with the unmap flag
        ("discard_bad_segment", {}, [(h(VIRTIO_BLK_T_DISCARD) + seg(0, 8, 1), False), (1, True)],
         VIRTIO_BLK_S_UNSUPP, 1),
        ("io_error", {"truncate": True}, [(h(VIRTIO_BLK_T_IN, 1024), False), (512, True), (1, True)],
         VIRTIO_BLK_S_IOERR, 1),
    ]


@pytest.mark.parametrize("engine", ["io_uring", "sync"])
def test_every_bad_request_gets_its_status_and_the_queue_goes_on(shm, engine):
    cases = _bad_cases()
    assert {c[0] for c in cases} == set(KINDS)
    for kind, kw, chain, status, used in cases:
        kw = dict(kw)
        path = image(shm)
        truncate = kw.pop("truncate", False)
        rig = Rig(path, engine=engine, **kw)
        try:
            if truncate:   # capacity stays 2048 sectors; the file now ends at 512 KiB
                os.truncate(path, 512 * 1024)
            st, got_used = rig.raw(chain)
            assert got_used == used, kind
            assert st == (0xEE if status is None else status), kind
            c = rig.counters()
            assert c["bad_requests"][kind] == 1, (kind, c["bad_requests"])
            assert sum(c["bad_requests"].values()) == 1, kind
            assert c["recent"][-1]["bad"] == kind
            assert kind in rig.q.last_bad
            assert not rig.q.broken
            # the queue goes on
            st, _, _ = rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)
            assert st == VIRTIO_BLK_S_OK, kind
        finally:
            rig.close()


def test_discard_segment_buffer_not_a_multiple_of_16(shm):
    rig = Rig(image(shm))
    try:
        st, used = rig.raw([(HDR.pack(VIRTIO_BLK_T_DISCARD, 0, 0) + b"\0" * 8, False), (1, True)])
        assert (st, used) == (VIRTIO_BLK_S_IOERR, 1)
        assert rig.counters()["bad_requests"]["discard_bad_segment"] == 1
        assert "8 bytes" in rig.q.last_bad
    finally:
        rig.close()


# --- many requests in flight, hold-io ------------------------------------------------------

@pytest.mark.parametrize("engine,layout", [("io_uring", "split"), ("sync", "split"),
                                           ("io_uring", "packed")])
def test_hold_keeps_many_requests_in_flight_and_release_completes_them(shm, engine, layout):
    path = image(shm, size=1 << 20)
    with open(path, "r+b") as f:
        for i in range(100):
            f.seek(i * 4096)
            f.write(pattern(4096, i))
    rig = Rig(path, engine=engine, qsize=512, layout=layout)
    try:
        rig.q.set_hold(True)
        reqs = [rig.chain(VIRTIO_BLK_T_IN, i * 8, in_len=4096) for i in range(100)]
        rig.publish()
        rig.wait_in_flight(100)
        assert not rig.drv.has_used() if layout == "packed" else rig.drv.used_idx == 0
        rig.q.set_hold(False)
        rig.wait([h for h, _, _ in reqs])
        for i, (_, din, st) in enumerate(reqs):
            assert rig.get(st, 1)[0] == VIRTIO_BLK_S_OK
            assert rig.get(din, 4096) == pattern(4096, i)
        c = rig.counters()
        assert c["in_flight"] == 0 and c["requests"]["in"] == 100 and len(c["recent"]) == 32
    finally:
        rig.close()


def test_depth_bounds_the_requests_in_flight(shm):
    rig = Rig(image(shm), depth=16)
    try:
        rig.q.set_hold(True)
        reqs = [rig.chain(VIRTIO_BLK_T_IN, i, in_len=512) for i in range(40)]
        rig.publish()
        rig.wait_in_flight(16)
        time.sleep(0.05)
        assert rig.counters()["in_flight"] == 16
        assert rig.dev.last_avail_idx == 16
        rig.q.set_hold(False)
        rig.wait([h for h, _, _ in reqs])
    finally:
        rig.close()


def test_close_completes_held_requests_on_the_ring(shm):
    rig = Rig(image(shm))
    rig.q.set_hold(True)
    reqs = [rig.chain(VIRTIO_BLK_T_IN, i, in_len=512) for i in range(8)]
    rig.publish()
    rig.wait_in_flight(8)
    rig.stop = True
    os.eventfd_write(rig.wake, 1)
    rig.thread.join(WAIT_S)
    assert rig.q.close() == 8
    assert sorted(h for h, _ in rig.drv.get_used()) == sorted(h for h, _, _ in reqs)
    assert rig.q.counters()["in_flight"] == 0    # the counters at close
    with pytest.raises(ArgumentError, match="after close"):
        rig.q.set_hold(True)
    rig.close()


# --- crash safety: the inflight area ---------------------------------------------------------

def test_requests_in_flight_at_a_crash_complete_once_after_restart(shm):
    """Writes held in flight when the back-end dies are resubmitted from the
    inflight area by the next one, each completed exactly once, and new
    requests that complete before them (out of order) keep the area right."""
    path = image(shm)
    area = bytearray(queue_area_size(64))
    rig = Rig(path, qsize=64, inflight=area)
    try:
        assert rig.request(VIRTIO_BLK_T_OUT, 0, pattern(512, 99))[0] == VIRTIO_BLK_S_OK
        rig.q.set_hold(True)
        writes = [rig.chain(VIRTIO_BLK_T_OUT, 8 * (i + 1), pattern(4096, i)) for i in range(6)]
        rig.publish()
        rig.wait_in_flight(6)
        assert read_queue(area, 0, 64).heads == [h for h, _, _ in writes]
        rig.crash()
        # the driver adds GET_IDs the dead back-end never saw
        ids = [rig.chain(VIRTIO_BLK_T_GET_ID, in_len=20) for _ in range(3)]
        rig.drv.publish()
        assert rig.restart() == 6
        os.eventfd_write(rig.kick, 1)
        rig.wait([h for h, _, _ in writes + ids])     # get_used refuses a head returned twice
        assert all(rig.get(st, 1)[0] == VIRTIO_BLK_S_OK for _, _, st in writes + ids)
        c = rig.counters()
        assert c["resubmitted"] == 6 and c["requests"]["out"] == 6 and c["requests"]["get_id"] == 3
        assert read_queue(area, 0, 64).heads == []
        with open(path, "rb") as f:
            img = f.read()
        for i in range(6):
            assert img[8 * (i + 1) * 512:][:4096] == pattern(4096, i)
        assert rig.drv.used_idx == 1 + 6 + 3
    finally:
        rig.close()


# --- O_DIRECT ---------------------------------------------------------------------------------

def test_direct_io_bounces_unaligned_buffers(tmp_path):
    path = image(str(tmp_path))
    try:
        rig = Rig(path, direct=True)
    except OSError as e:   # a filesystem without O_DIRECT
        pytest.skip(f"O_DIRECT not supported here: {e}")
    try:
        data = pattern(2048, 5)
        assert rig.request(VIRTIO_BLK_T_OUT, 2, data, data_align=8)[0] == VIRTIO_BLK_S_OK
        st, got, used = rig.request(VIRTIO_BLK_T_IN, 2, in_len=2048, data_align=8)
        assert (st, got, used) == (VIRTIO_BLK_S_OK, data, 2049)
        st, got, _ = rig.request(VIRTIO_BLK_T_IN, 2, in_len=2048)   # aligned: straight into guest memory
        assert got == data
    finally:
        rig.close()


# --- a hostile ring breaks only the queue; no leaks ------------------------------------------

def test_hostile_ring_breaks_only_the_queue(shm):
    before = fd_count()
    rig = Rig(image(shm), qsize=8)
    try:
        assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
        # §2.7.6: avail->idx more than the queue size ahead of last_avail_idx
        rig.drv.set_avail_idx(rig.drv.avail_idx + 100)
        os.eventfd_write(rig.kick, 1)
        rig.thread.join(WAIT_S)
        assert not rig.thread.is_alive()
        assert "avail->idx" in rig.q.broken
        assert rig.counters()["status"]["ok"] == 1
    finally:
        rig.close()
    # another queue of the same process works
    rig = Rig(image(shm), qsize=8)
    try:
        assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    finally:
        rig.close()
    assert fd_count() == before


def test_truncated_guest_memory_breaks_the_queue_not_the_process(shm):
    """A front-end that shrinks its memfd after SET_MEM_TABLE: the status byte
    lies in the lost pages, writing it raises SIGBUS, the guard breaks the
    queue naming the guest-physical address."""
    rig = Rig(image(shm))
    try:
        assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
        lost = GPA + (4 << 20)
        head = rig.add([(rig.put(HDR.pack(VIRTIO_BLK_T_GET_ID, 0, 0)), 16, False), (lost, 20, True),
                        (lost + 20, 1, True)])
        os.ftruncate(rig.memfd, 2 << 20)
        rig.publish()
        rig.thread.join(WAIT_S)
        assert not rig.thread.is_alive()
        assert "SIGBUS" in rig.q.broken and f"{lost:#x}" in rig.q.broken
        assert head not in rig.done
    finally:
        rig.close()


def test_chain_longer_than_any_request_gets_ioerr(shm):
    """A chain of more pieces than a slot holds is popped anyway and gets
    too_many_segments (an indirect table of 300 descriptors)."""
    rig = Rig(image(shm), seg_max=4)
    try:
        hdr = rig.put(HDR.pack(VIRTIO_BLK_T_IN, 0, 0))
        bufs = [(hdr, 16, False)] + [(rig.alloc(512, 512), 512, True) for _ in range(300)]
        st = rig.put(b"\xee")
        bufs.append((st, 1, True))
        table = rig.alloc(16 * len(bufs), 16)
        head = rig.drv.add_indirect_chain(table, bufs)
        rig.publish()
        assert rig.wait([head])[head] == 1
        assert rig.get(st, 1)[0] == VIRTIO_BLK_S_IOERR
        assert rig.counters()["bad_requests"]["too_many_segments"] == 1
        assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    finally:
        rig.close()


@pytest.mark.parametrize("engine", ["io_uring", "sync"])
def test_no_fd_leak(shm, engine):
    path = image(shm)
    before = fd_count()
    for _ in range(3):
        rig = Rig(path, engine=engine)
        rig.request(VIRTIO_BLK_T_OUT, 0, pattern(512, 1))
        rig.close()
    disk = BlkDisk(memory=True, size=1 << 20)
    disk.close()
    assert fd_count() == before


# --- the disk -------------------------------------------------------------------------------

def test_block_device_is_sized_and_discarded_by_ioctl(shm):
    """A loop device over a tmpfs image: size from BLKGETSIZE64, DISCARD
    through BLKDISCARD (the loop driver punches a hole: zeros)."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup for a loop device")
    path = image(shm, fill=b"\xab")
    r = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True, check=False)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        rig = Rig(dev)
        try:
            assert rig.disk.is_block and rig.disk.capacity == 2048 and rig.disk.blk_size == 512
            assert rig.request(VIRTIO_BLK_T_OUT, 8, pattern(4096, 3))[0] == VIRTIO_BLK_S_OK
            assert rig.request(VIRTIO_BLK_T_IN, 8, in_len=4096)[1] == pattern(4096, 3)
            assert rig.request(VIRTIO_BLK_T_DISCARD, 0, SEG.pack(8, 8, 0))[0] == VIRTIO_BLK_S_OK
            assert rig.request(VIRTIO_BLK_T_IN, 8, in_len=4096)[1] == bytes(4096)
            assert rig.request(VIRTIO_BLK_T_IN, 16, in_len=512)[1] == b"\xab" * 512
        finally:
            rig.close()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_ram_disk_serves_requests():
    disk = BlkDisk(memory=True, size=1 << 20)
    rig = Rig(None, disk=disk)
    try:
        assert disk.capacity == 2048 and disk.blk_size == 512
        assert rig.request(VIRTIO_BLK_T_OUT, 100, pattern(4096, 2))[0] == VIRTIO_BLK_S_OK
        assert rig.request(VIRTIO_BLK_T_IN, 100, in_len=4096)[1] == pattern(4096, 2)
    finally:
        rig.close()


def test_disk_arguments_are_checked(shm):
    with pytest.raises(ArgumentError, match="path or memory"):
        BlkDisk()
    with pytest.raises(ArgumentError, match="seg_max"):
        BlkDisk(memory=True, size=4096, seg_max=0)
    with pytest.raises(ArgumentError, match="serial"):
        BlkDisk(memory=True, size=4096, serial=b"x" * 21)
    with pytest.raises(FileNotFoundError):
        BlkDisk(os.path.join(shm, "missing.img"))
    d = BlkDisk(os.path.join(shm, "new.img"), size=3 << 20)
    assert d.capacity == 6144
    d.close()
