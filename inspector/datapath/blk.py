"""virtio-blk's data path (VIRTIO 1.2 §5.2.6) in C (csrc/vqd_blk.c, io_uring
through liburing; csrc/vqd_blk.h says why): :class:`BlkDisk` is a device's
backing store (raw image, block device or RAM disk), :class:`BlkQueue` one
requestq's engine over a started split
:class:`~inspector.datapath.queue.DeviceQueue` or packed
:class:`~inspector.datapath.packed_queue.PackedDeviceQueue`, run by the
device's worker thread without the GIL.

Every request the ring rules allow gets a status; a bad one is counted under
its kind (:data:`BAD_REQUEST_KINDS`) and the queue goes on. A chain the ring
rules break (csrc/vqd_vq.c) breaks the queue, as for net: :attr:`BlkQueue.broken`.
"""

from __future__ import annotations

import os
import stat

from .._cffi import check, ffi, lib
from ..errors import ArgumentError
from ..spec.virtio import (VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_NAMES, VIRTIO_BLK_SECTOR_SIZE,
                           VIRTIO_BLK_T_NAMES)
from .packed_queue import PackedDeviceQueue
from .queue import DeviceQueue

#: Bad-request kinds in the C data path's order (csrc/vqd_blk.h VQD_BLK_BAD_*),
#: each counted in :meth:`BlkQueue.counters` ``bad_requests``.
BAD_REQUEST_KINDS: tuple[str, ...] = tuple(
    ffi.string(lib.vqd_blk_bad_name(i)).decode() for i in range(1, lib.VQD_BLK_BAD_COUNT))

#: Request classes of ``counters()["requests"]`` (csrc/vqd_blk.h VQD_BLK_REQ_*, in order).
REQUEST_CLASSES = ("in", "out", "flush", "get_id", "discard", "write_zeroes", "other")

#: Completed requests kept in ``counters()["recent"]``.
RECENT = lib.VQD_BLK_RECENT

_ENGINES = {"auto": lib.VQD_BLK_ENGINE_AUTO, "io_uring": lib.VQD_BLK_ENGINE_URING,
            "sync": lib.VQD_BLK_ENGINE_SYNC}
_NO_HEADER = 0xFFFFFFFF


class BlkDisk:
    """The backing store of one blk device, shared by its queues.

    ``path``: a raw image file or a block device (its size from st_size or
    BLKGETSIZE64, its logical block size from BLKSSZGET; 512 for files). With
    ``size`` (bytes) a missing image is created and a shorter one extended to
    it (never shrunk; a block device keeps its size). ``memory=True`` (no path): a RAM disk of ``size``
    bytes, a memfd, so the same io_uring path serves it. ``direct``: the file
    is opened O_DIRECT (not with ``memory``). ``readonly``: opened O_RDONLY;
    writes, DISCARD and WRITE_ZEROES get IOERR.

    Limits (virtio_blk_config, §5.2.4): ``seg_max`` data segments per request
    (1..1024), ``size_max`` bytes per segment (0: none), DISCARD and
    WRITE_ZEROES ``max_*_sectors`` per segment (0: the request type is
    UNSUPP) and ``max_*_seg`` segments per request (1..256). ``serial``: the
    GET_ID answer, at most 20 bytes.

    Attributes: ``capacity`` (512-byte sectors), ``blk_size`` (bytes),
    ``readonly``, ``direct``, ``fd``, the limits, and :attr:`writeback`.
    Raises ArgumentError for bad arguments, OSError when the file cannot be
    opened or sized."""

    def __init__(self, path: str | None = None, *, size: int | None = None, memory: bool = False,
                 readonly: bool = False, direct: bool = False, serial: bytes = b"vqscope",
                 seg_max: int = 126, size_max: int = 1 << 20, max_discard_sectors: int = 1 << 16,
                 max_discard_seg: int = 1, max_write_zeroes_sectors: int = 1 << 16,
                 max_write_zeroes_seg: int = 1):
        if memory == (path is not None):
            raise ArgumentError("give either a path or memory=True (a RAM disk)")
        if memory and (size is None or size < VIRTIO_BLK_SECTOR_SIZE):
            raise ArgumentError(f"a RAM disk needs a size of at least 512 bytes, not {size}")
        if memory and direct:
            raise ArgumentError("direct (O_DIRECT) does not apply to a RAM disk")
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ArgumentError(f"serial is {len(serial)} bytes; GET_ID holds {VIRTIO_BLK_ID_BYTES}")
        limits = {"seg_max": (seg_max, 1, lib.VQD_BLK_MAX_SEG_MAX),
                  "size_max": (size_max, 0, 0xFFFFFFFF),
                  "max_discard_sectors": (max_discard_sectors, 0, 0xFFFFFFFF),
                  "max_discard_seg": (max_discard_seg, 1, lib.VQD_BLK_MAX_DWZ_SEG),
                  "max_write_zeroes_sectors": (max_write_zeroes_sectors, 0, 0xFFFFFFFF),
                  "max_write_zeroes_seg": (max_write_zeroes_seg, 1, lib.VQD_BLK_MAX_DWZ_SEG)}
        for name, (v, lo, hi) in limits.items():
            if not lo <= v <= hi:
                raise ArgumentError(f"{name} {v} is outside {lo}..{hi}")
        self.path = path
        self.memory = memory
        self.fd = -1
        if memory:
            self.fd = os.memfd_create("vqscope-blk", os.MFD_CLOEXEC)
        else:
            flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
            if direct:
                flags |= os.O_DIRECT
            if size is not None and not readonly:
                flags |= os.O_CREAT
            self.fd = os.open(path, flags, 0o644)
        try:
            st = os.fstat(self.fd)
            if size is not None and not readonly and stat.S_ISREG(st.st_mode) and st.st_size < size:
                os.ftruncate(self.fd, size)
            out_size = ffi.new("uint64_t *")
            out_blk = ffi.new("uint32_t *")
            out_isblk = ffi.new("int *")
            rc = lib.vqd_blk_disk_probe(self.fd, out_size, out_blk, out_isblk)
            if rc < 0:
                raise OSError(-rc, f"{path or 'RAM disk'}: cannot size it: {os.strerror(-rc)}")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = out_size[0]
        self.is_block = bool(out_isblk[0])
        self._d = d = ffi.new("struct vqd_blk_disk *")
        d.fd = self.fd
        d.readonly = 1 if readonly else 0
        d.direct = 1 if direct else 0
        d.writeback = 1
        d.is_block = 1 if self.is_block else 0
        d.blk_size = out_blk[0]
        d.capacity = self.size // VIRTIO_BLK_SECTOR_SIZE
        for name, (v, _, _) in limits.items():
            setattr(d, name, v)
        d.serial = serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.readonly, self.direct, self.serial = readonly, direct, serial
        self.seg_max, self.size_max = seg_max, size_max
        self.max_discard_sectors, self.max_discard_seg = max_discard_sectors, max_discard_seg
        self.max_write_zeroes_sectors, self.max_write_zeroes_seg = max_write_zeroes_sectors, max_write_zeroes_seg

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors (§5.2.4 capacity)."""
        return self._d.capacity

    @property
    def blk_size(self) -> int:
        """Logical block size in bytes (§5.2.4 blk_size)."""
        return self._d.blk_size

    @property
    def writeback(self) -> bool:
        """True: writes complete from the page cache (FLUSH makes them
        durable); False: writethrough, every write is RWF_DSYNC (§5.2.5
        VIRTIO_BLK_F_CONFIG_WCE, config ``writeback``). Settable while queues run."""
        return bool(self._d.writeback)

    @writeback.setter
    def writeback(self, on: bool) -> None:
        self._d.writeback = 1 if on else 0

    def close(self) -> None:
        """Close the file (after every :class:`BlkQueue` on it is closed)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._d.fd = -1

    def __enter__(self) -> BlkDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BlkQueue:
    """One requestq's engine (csrc/vqd_blk.c) over a started ``queue``
    (split :class:`~inspector.datapath.queue.DeviceQueue` or packed
    :class:`~inspector.datapath.packed_queue.PackedDeviceQueue`) and ``disk``.
    Requests complete out of order: a packed ring must not have negotiated
    VIRTIO_F_IN_ORDER (ArgumentError). Inflight tracking (crash safety) is
    the split ring's (inspector/datapath/inflight.py).

    At most ``depth`` requests are in flight (capped at the queue size): a
    fixed array of per-request slots, allocated here once. ``engine``:
    "auto" (io_uring, else synchronous calls in the run thread), "io_uring"
    (OSError if it cannot start) or "sync". Raises ArgumentError for a packed
    ring with IN_ORDER or bad limits. The queue and disk must outlive this object; call
    :meth:`close` before releasing the DeviceQueue's memory."""

    def __init__(self, queue: DeviceQueue | PackedDeviceQueue, disk: BlkDisk, *, depth: int = 128, engine: str = "auto"):
        if queue.layout == "packed" and queue.vq.in_order:
            raise ArgumentError("the blk data path completes out of order: VIRTIO_F_IN_ORDER "
                                "(§2.8.8) cannot be served")
        if engine not in _ENGINES:
            raise ArgumentError(f"engine {engine!r}: give one of {', '.join(_ENGINES)}")
        if not 1 <= depth <= 65536:
            raise ArgumentError(f"depth {depth} is outside 1..65536")
        self.queue, self.disk = queue, disk
        out = ffi.new("struct vqd_blk_queue **")
        rc = lib.vqd_blk_queue_new(queue.vq, disk._d, depth, _ENGINES[engine], out)
        if rc == lib.VQD_E_INVAL:
            raise ArgumentError("blk queue: invalid limits (seg_max, segments or blk_size) or an "
                                "IN_ORDER packed ring")
        if rc < 0:
            raise OSError(-rc, f"blk queue: {os.strerror(-rc)}")
        self._q = ffi.gc(out[0], lib.vqd_blk_queue_free)
        self._c = lib.vqd_blk_counters(self._q)
        self._recent = ffi.new("struct vqd_blk_recent[]", RECENT)

    # --- state ------------------------------------------------------------------
    @property
    def engine(self) -> str:
        """"io_uring", or "sync" (io_uring could not start: :attr:`uring_error`)."""
        return "io_uring" if lib.vqd_blk_engine(self._live()) == lib.VQD_BLK_ENGINE_URING else "sync"

    @property
    def uring_error(self) -> str | None:
        """Why io_uring_queue_init failed when :attr:`engine` fell back to "sync"."""
        e = lib.vqd_blk_uring_errno(self._live())
        return f"io_uring_queue_init: {os.strerror(e)}" if e else None

    @property
    def broken(self) -> str | None:
        """The ring's broken reason (its rules were broken), or None."""
        return self.queue.broken

    @property
    def last_bad(self) -> str:
        """The last bad request, with its head, kind, field and value ("" if none)."""
        return ffi.string(lib.vqd_blk_last_bad(self._live())).decode(errors="replace")

    def counters(self) -> dict:
        """The ``extras["blk"]`` dict of a blk queue (BRIEF shared interface 2):
        ``requests`` by class, ``status`` by name, ``bad_requests`` by kind
        (every kind, zeros included), ``in_flight`` (popped, not completed,
        held ones included), ``resubmitted`` (from the inflight area),
        ``bytes_read``/``bytes_written`` (data of requests that ended OK), and
        ``recent``: the last <= 32 completed requests, oldest first, each
        ``{"head", "type", "sector", "data_len", "status", "bad"}`` (type None
        without a header, an unknown type as its number in a string; status
        None without a status byte; bad None or a kind). Safe while
        :meth:`run` runs; after :meth:`close`, the counters at close."""
        if self._q is None:
            return self._final
        c = self._c
        n = lib.vqd_blk_recent(self._q, self._recent, RECENT)
        recent = []
        for i in range(n):
            r = self._recent[i]
            t = None if r.type == _NO_HEADER else VIRTIO_BLK_T_NAMES.get(r.type, str(r.type))
            recent.append({"head": r.head, "type": t, "sector": r.sector, "data_len": r.data_len,
                           "status": VIRTIO_BLK_S_NAMES.get(r.status),
                           "bad": BAD_REQUEST_KINDS[r.bad - 1] if r.bad else None})
        return {"requests": {k: c.requests[i] for i, k in enumerate(REQUEST_CLASSES)},
                "status": {VIRTIO_BLK_S_NAMES[i]: c.status[i] for i in range(3)},
                "bad_requests": {k: c.bad[i + 1] for i, k in enumerate(BAD_REQUEST_KINDS)},
                "in_flight": c.in_flight, "resubmitted": c.resubmitted,
                "bytes_read": c.bytes_read, "bytes_written": c.bytes_written,
                "recent": recent}

    # --- operations ---------------------------------------------------------------
    def run(self, wake_fd: int, timeout_ms: int = -1) -> int:
        """Service the ring without the GIL until ``wake_fd`` (a non-blocking
        eventfd; -1: none) is readable (it is read), ``timeout_ms`` passes
        (-1: no limit) or the queue breaks (:attr:`broken`). Kicks, the wake
        fd and I/O completions are waited for together; kicks are disabled
        while there is work and re-enabled and re-checked before sleeping
        (§2.7.10). Returns the requests completed in this call. One thread
        at a time. ArgumentError after :meth:`close`."""
        return check(lib.vqd_blk_run(self._live(), wake_fd, timeout_ms), "blk run", self.broken)

    def _live(self):
        if self._q is None:
            raise ArgumentError("blk queue: used after close()")
        return self._q

    def set_hold(self, hold: bool) -> None:
        """The "hold-io" fault: while on, popped requests are kept (in flight)
        and not submitted; off submits them in pop order. Any thread."""
        rc = lib.vqd_blk_set_hold(self._live(), 1 if hold else 0)
        if rc < 0:
            raise OSError(-rc, f"blk set_hold: {os.strerror(-rc)}")

    def close(self, *, complete: bool = True) -> int:
        """After :meth:`run` returned: end every request still in flight.
        ``complete`` (and the ring not broken): held ones are submitted, all
        I/O is waited for and each request completed on the ring; else I/O is
        waited for and nothing is written to the ring (the requests stay in
        flight in the inflight area, if any, for the next back-end). Returns
        the requests completed. Idempotent."""
        if self._q is None:
            return 0
        n = lib.vqd_blk_drain(self._q, 1 if complete else 0)
        self._final = self.counters()
        ffi.release(self._q)
        self._q = None
        return n

    def __enter__(self) -> BlkQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
