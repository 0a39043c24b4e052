"""The one Python wrapper of the private C module ``inspector._vqd``.

It turns the C functions' status codes into exceptions and their output
arrays into Python objects. Nothing else imports ``inspector._vqd``.

Decoder: :func:`snapshot_split` is the C-backed twin of
:func:`inspector.ringref.snapshot_split` (same arguments, equal
:class:`~inspector.ringsnap.RingSnapshot`; see that module's docstring for the
semantics and tests/test_decoder_diff.py).
"""

from __future__ import annotations

import threading
from array import array

from ._vqd import ffi, lib
from .errors import InspectorError, LayoutError
from .memory import GuestMemory
from .ringref import (ANOMALY_KINDS, DEFAULT_MAX_DESCS, area_error, area_sizes, check_args,
                      region_table, valid_table)
from .ringsnap import U16, U32, U64, RingSnapshot

__all__ = ["snapshot_split", "snapshot_split_pass", "RingSnapshot", "DEFAULT_MAX_DESCS",
           "ANOMALY_KINDS"]

# Output arrays are large (max_descs entries) but only their used prefix is
# touched: allocate them uncleared, and keep the last set per thread. A
# snapshot never points into them: its columns are bytes copies.
_alloc = ffi.new_allocator(should_clear_after_alloc=False)
if (ffi.sizeof("struct vqd_region"), ffi.offsetof("struct vqd_region", "size"),
        ffi.offsetof("struct vqd_region", "host"), array("Q").itemsize) != (24, 8, 16, 8):
    raise ImportError("struct vqd_region is not {u64 gpa; u64 size; u8 *host} on this platform")
_tls = threading.local()

# (field of struct vqd_snap_out, C type, column format); the order of _Out.bufs
_ARRAYS = (
    ("avail_ring", "uint16_t[]", U16),
    ("used_ring", "uint32_t[]", U32),
    ("chain_head", "uint32_t[]", U32),
    ("chain_first", "uint32_t[]", U32),
    ("chain_ndescs", "uint32_t[]", U32),
    ("chain_out_bytes", "uint64_t[]", U64),
    ("chain_in_bytes", "uint64_t[]", U64),
    ("desc_addr", "uint64_t[]", U64),
    ("desc_len", "uint32_t[]", U32),
    ("desc_flags", "uint16_t[]", U16),
    ("desc_next", "uint16_t[]", U16),
)


class _Out:
    """A ``struct vqd_snap_out`` and the arrays it points to, for one
    (size, max_descs)."""

    def __init__(self, size: int, max_descs: int):
        self.key = (size, max_descs)
        acap = lib.vqd_snapshot_anomaly_cap(size, max_descs)
        o = self.out = ffi.new("struct vqd_snap_out *")
        nd = max(max_descs, 1)
        counts = {"avail_ring": size, "used_ring": 2 * size}
        self.keep = []
        self.bufs = []  # ffi.buffer over each whole array, in _ARRAYS order
        for name, ctype, _fmt in _ARRAYS:
            a = _alloc(ctype, counts.get(name, size if name.startswith("chain_") else nd))
            setattr(o, name, a)
            self.keep.append(a)
            self.bufs.append(ffi.buffer(a))
        self.anomalies = _alloc("struct vqd_anomaly[]", acap)
        o.anomalies = self.anomalies
        o.desc_cap = max_descs
        o.anomaly_cap = acap
        self.want_addr = _alloc("uint64_t[]", size)
        self.want_len = _alloc("uint32_t[]", size)
        o.want_addr = self.want_addr
        o.want_len = self.want_len
        o.want_cap = size


def _outputs(size: int, max_descs: int) -> _Out:
    o = getattr(_tls, "out", None)
    if o is None or o.key != (size, max_descs):
        o = _tls.out = _Out(size, max_descs)
    return o


def _regions(mem: GuestMemory):
    """``struct vqd_region[]`` of the readable and of the validate-only
    regions of ``mem``, their counts, and the from_buffer objects that must
    stay alive while C reads through them."""
    table = region_table(mem)
    keep = []
    # The struct array is filled as flat u64s (gpa, size, host) and viewed
    # as struct vqd_region[]: remote reads give a region per indirect table,
    # and per-field cffi stores would cost more than the walk.
    base: dict[int, int] = {}  # id(buf) -> address (regions often share a buffer)
    flat = array("Q")
    for gpa, size, buf, off in table:
        b = base.get(id(buf))
        if b is None:
            fb = ffi.from_buffer(buf)
            keep.append(fb)
            b = base[id(buf)] = int(ffi.cast("uintptr_t", fb))
        flat.extend((gpa, size, b + off))
    if flat:
        regions = ffi.from_buffer("struct vqd_region[]", flat)
        keep.append(flat)
    else:
        regions = ffi.new("struct vqd_region[]", 1)
    vtable = valid_table(mem)
    if vtable:
        valid = ffi.new("struct vqd_region[]", vtable)  # (gpa, size); host stays NULL
    else:
        valid = ffi.NULL
    return regions, len(table), valid, len(vtable), keep


def _walk(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
          last_avail_idx: int | None, max_descs: int) -> _Out:
    """Run vqd_snapshot; its results are in the returned (per-thread,
    reused) output arrays. tests/bench/bench_decoder.py times this alone."""
    check_args(size, desc, avail, used, last_avail_idx, max_descs)
    regions, nr, valid, nvalid, keep = _regions(mem)
    o = _outputs(size, max_descs)
    # Guarded: a SIGBUS from memory the front-end truncated becomes VQD_E_FAULT
    # (vqd_datapath.c, "SIGBUS guard"), not the end of the process.
    rc = lib.vqd_snapshot_guarded(regions, nr, valid, nvalid, desc, avail, used, size,
                                  -1 if last_avail_idx is None else last_avail_idx, max_descs, o.out)
    del keep  # the from_buffer objects were needed only during the call
    if rc != lib.VQD_SNAP_OK:
        if rc == lib.VQD_E_FAULT:
            raise memory_fault_error("decoding the ring", mem, lib.vqd_guard_fault_addr())
        if rc in _AREA_STATUS:
            i = _AREA_STATUS[rc]
            raise area_error(i, (desc, avail, used)[i], area_sizes(size)[i])
        if rc == lib.VQD_SNAP_E_SIZE:
            raise LayoutError(f"queue size {size} is invalid (VIRTIO 1.2 §2.7)")
        raise InspectorError(f"vqd_snapshot failed with status {rc} (size {size}, "
                             f"last_avail_idx {last_avail_idx}, max_descs {max_descs})")
    return o


_AREA_STATUS = {lib.VQD_SNAP_E_DESC_AREA: 0, lib.VQD_SNAP_E_AVAIL_AREA: 1, lib.VQD_SNAP_E_USED_AREA: 2}


def snapshot_split(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                   last_avail_idx: int | None, *,
                   max_descs: int = DEFAULT_MAX_DESCS) -> RingSnapshot:
    """Snapshot a split ring with the C decoder; same contract as
    :func:`inspector.ringref.snapshot_split`."""
    o = _walk(mem, size, desc, avail, used, last_avail_idx, max_descs)
    return _result(o, size, last_avail_idx)


def snapshot_split_pass(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                        last_avail_idx: int | None, *, max_descs: int = DEFAULT_MAX_DESCS,
                        skip_if_unread: bool = False,
                        ) -> tuple[RingSnapshot | None, list[tuple[int, int]]]:
    """:func:`snapshot_split` and the indirect tables it could not read
    (validate-only memory); same contract as
    :func:`inspector.ringref.snapshot_split_pass`."""
    o = _walk(mem, size, desc, avail, used, last_avail_idx, max_descs)
    n = o.out.n_want
    if not n:
        return _result(o, size, last_avail_idx), []
    addrs, lens = array(U64), array(U32)
    addrs.frombytes(ffi.buffer(o.want_addr, 8 * n))
    lens.frombytes(ffi.buffer(o.want_len, 4 * n))
    unread = list(zip(addrs.tolist(), lens.tolist()))
    return (None if skip_if_unread else _result(o, size, last_avail_idx)), unread


def _result(o: _Out, size: int, last_avail_idx: int | None) -> RingSnapshot:
    """Copy the used prefix of each output array into bytes (one memcpy
    each: a few KB for a full 1024 ring) and view it as a typed column;
    nothing per chain or descriptor is built here."""
    out = o.out
    nc, nd = out.n_chains, out.n_descs
    (avail_ring, used_ring, chain_head, chain_first, chain_ndescs, chain_out, chain_in,
     desc_addr, desc_len, desc_flags, desc_next) = o.bufs
    anomalies = []
    if out.n_anomalies:
        kinds = ANOMALY_KINDS
        string = ffi.string
        for a in o.anomalies[0:out.n_anomalies]:
            anomalies.append((kinds[a.kind], string(a.detail).decode("ascii")))
    return RingSnapshot(
        size=size, avail_flags=out.avail_flags, avail_idx=out.avail_idx,
        used_event=out.used_event, used_flags=out.used_flags, used_idx=out.used_idx,
        avail_event=out.avail_event, last_avail_idx=last_avail_idx,
        avail_ring=memoryview(avail_ring[:2 * size]).cast(U16),
        used_ring=memoryview(used_ring[:8 * size]).cast(U32),
        desc_addr=memoryview(desc_addr[:8 * nd]).cast(U64),
        desc_len=memoryview(desc_len[:4 * nd]).cast(U32),
        desc_flags=memoryview(desc_flags[:2 * nd]).cast(U16),
        desc_next=memoryview(desc_next[:2 * nd]).cast(U16),
        chain_head=memoryview(chain_head[:4 * nc]).cast(U32),
        chain_first=memoryview(chain_first[:4 * nc]).cast(U32),
        chain_ndescs=memoryview(chain_ndescs[:4 * nc]).cast(U32),
        chain_out_bytes=memoryview(chain_out[:8 * nc]).cast(U64),
        chain_in_bytes=memoryview(chain_in[:8 * nc]).cast(U64),
        anomalies=anomalies)


# --- data path (vqd_datapath.c) ---
# The device side of a split ring (VIRTIO 1.2 §2.7) and the virtio-net fast
# paths, driven by inspector/devices/net.py. C returns counts or negative
# VQD_E_* statuses; here they become exceptions: a broken queue is a
# RingError carrying C's reason, a bad argument a ValueError, a tap failure
# an OSError. Objects here hold raw pointers into guest memory: keep the
# GuestMemory buffers alive (they do) and call release() before unmapping.
#
# SIGBUS: every C entry point that touches guest memory (and the decoder, via
# vqd_snapshot_guarded) runs under a sigsetjmp guard, so memory a front-end
# truncates after SET_MEM_TABLE breaks the queue (its reason names the
# guest-physical address) instead of killing the process. The handler is
# installed when this module is imported and re-checked whenever a
# DeviceQueue starts (a handler installed later, e.g. by faulthandler, is
# chained to for faults outside the guarded sections).

import struct as _dp_struct
from dataclasses import dataclass as _dp_dataclass

from ._vqd import ffi as _dp_ffi, lib as _dp_lib  # noqa: E402
from .errors import MemoryAccessError as _DpMemoryAccessError, RingError as _DpRingError  # noqa: E402

VQD_NET_IOV = _dp_lib.VQD_NET_IOV


def install_sigbus_guard() -> None:
    """Install (or put back on top) the process-wide SIGBUS handler of the
    guarded C sections; idempotent. Raises OSError if sigaction fails."""
    rc = _dp_lib.vqd_guard_install()
    if rc < 0:
        import os as _os
        raise OSError(-rc, f"cannot install the SIGBUS guard: {_os.strerror(-rc)}")


install_sigbus_guard()


def memory_fault_error(what: str, mem, host_addr: int) -> _DpMemoryAccessError:
    """The error for a SIGBUS at ``host_addr`` while ``what`` (a guarded C
    call over ``mem``), naming the guest-physical address and its region."""
    where = f"host address {host_addr:#x}"
    for r in mem:
        if r.buf is None:
            continue
        try:
            fb = _dp_ffi.from_buffer(r.buf)
        except TypeError:
            continue
        base = int(_dp_ffi.cast("uintptr_t", fb)) + r.buf_offset
        _dp_ffi.release(fb)
        if base <= host_addr < base + r.size:
            where = f"guest-physical {r.gpa + host_addr - base:#x} (region {r.gpa:#x}+{r.size:#x})"
            break
    return _DpMemoryAccessError(
        f"SIGBUS {what} at {where}: the front-end shrank the memory behind the region after "
        f"SET_MEM_TABLE (ftruncate of its memfd?); nothing there can be read until it sends a "
        f"new memory table")

EVENT_LOG_DEFAULT = _dp_lib.VQD_EVLOG_DEFAULT
#: Event kind codes of the records (VQD_EV_*) -> inspector.events.KINDS names.
EVENT_KIND_NAMES = {_dp_lib.VQD_EV_KICK: "kick", _dp_lib.VQD_EV_CALL: "call",
                    _dp_lib.VQD_EV_CALL_SUPPRESSED: "call_suppressed"}
EVENT_KIND_CODES = {name: code for code, name in EVENT_KIND_NAMES.items()}
#: One event record as drained (struct vqd_event, 16 bytes): time_ns (ns since
#: the epoch), kind code, value.
EVENT_RECORD = _dp_struct.Struct("<QII")


def decode_events(records) -> list[tuple[int, str, int]]:
    """Packed event records (a bytes-like of whole :data:`EVENT_RECORD` s)
    as ``(time_ns, kind, value)`` tuples; an unknown kind code reads
    "unknown"."""
    names = EVENT_KIND_NAMES
    return [(t, names.get(k, "unknown"), v) for t, k, v in EVENT_RECORD.iter_unpack(records)]


def encode_events(events) -> bytes:
    """``(time_ns, kind, value)`` tuples as packed records (for devices
    whose events do not come from a C log; kinds of EVENT_KIND_CODES)."""
    return b"".join(EVENT_RECORD.pack(t, EVENT_KIND_CODES[k], v) for t, k, v in events)
NET_HDR_LEN_MRG = 12   # struct virtio_net_hdr with num_buffers (VERSION_1 or MRG_RXBUF)
NET_HDR_LEN_LEGACY = 10


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event`` (§2.7.10): true when ``event_idx`` lies in
    ``[old_idx, new_idx)`` modulo 2^16."""
    return bool(_dp_lib.vqd_need_event(event_idx & 0xFFFF, new_idx & 0xFFFF, old_idx & 0xFFFF))


class RegionTable:
    """``struct vqd_region[]`` over a GuestMemory's buffers (zero copy).

    Holds buffer exports (``ffi.from_buffer``) of every region: call
    :meth:`release` once no C code uses the pointers, or an ``mmap`` cannot be
    closed."""

    def __init__(self, mem):
        self.mem = mem
        regions = list(mem)
        self._bufs = []
        self.count = len(regions)
        self.array = _dp_ffi.new("struct vqd_region[]", max(1, self.count))
        for i, r in enumerate(regions):
            cbuf = _dp_ffi.from_buffer("uint8_t[]", r.buf, require_writable=True)
            self._bufs.append(cbuf)
            if r.buf_offset < 0 or r.buf_offset + r.size > len(cbuf):
                raise _DpMemoryAccessError(
                    f"region gpa {r.gpa:#x}+{r.size:#x} needs {r.buf_offset + r.size} bytes of "
                    f"its buffer, which has {len(cbuf)}")
            self.array[i].gpa = r.gpa
            self.array[i].size = r.size
            self.array[i].host = cbuf + r.buf_offset

    def host(self, gpa: int, size: int):
        """``uint8_t *`` for ``[gpa, gpa+size)``, which must lie in one region."""
        for i in range(self.count):
            r = self.array[i]
            if r.gpa <= gpa < r.gpa + r.size:
                if gpa + size > r.gpa + r.size:
                    raise _DpMemoryAccessError(
                        f"ring area {gpa:#x}+{size:#x} runs past the end of region "
                        f"{r.gpa:#x}+{r.size:#x}")
                return r.host + (gpa - r.gpa)
        raise _DpMemoryAccessError(f"ring area at guest-physical {gpa:#x} is outside every region")

    def release(self) -> None:
        for b in self._bufs:
            _dp_ffi.release(b)
        self._bufs = []
        self.count = 0


@_dp_dataclass
class Chain:
    """A popped chain: ``out`` device-readable and ``in_`` device-writable
    views into guest memory (one per region piece)."""

    head: int
    out: list
    in_: list
    out_len: int
    in_len: int


def _dp_check(vq_or_none, rc: int, what: str) -> int:
    if rc >= 0:
        return rc
    if rc == _dp_lib.VQD_E_BROKEN:
        reason = vq_or_none.broken if vq_or_none is not None else None
        raise _DpRingError(f"{what}: queue is broken: {reason or 'see the peer queue'}")
    if rc == _dp_lib.VQD_E_NOSPACE:
        raise ValueError(f"{what}: the iovec array is too small for the next chain")
    if rc == _dp_lib.VQD_E_INVAL:
        raise ValueError(f"{what}: invalid argument")
    raise _DpRingError(f"{what}: status {rc}")


class DeviceQueue:
    """One split ring serviced by the device (``struct vqd_vq``).

    Ring addresses are front-end virtual addresses (vhost-user
    SET_VRING_ADDR) unless ``gpa=True``; they are translated through ``mem``.
    Fds are borrowed: the caller keeps them open while the queue is used.

    ``event_capacity`` > 0 gives the queue an event log of that many entries
    (a power of two): every kick read, call written and call suppressed is
    recorded with its CLOCK_REALTIME time by the thread servicing the queue;
    :meth:`drain_events` (one thread at a time) takes them out. 0: no log.

    ``reject_zero_len``: a descriptor of length 0 breaks the queue (QEMU's
    virtqueue_map_desc refuses zero-sized buffers the same way; the spec does
    not forbid them, so the library default accepts them and maps nothing).

    Raises RingError when the ring cannot be used (its reason: size,
    alignment, or a SIGBUS reading used->idx), MemoryAccessError when an area
    is outside ``mem``."""

    def __init__(self, mem, num: int, desc: int, avail: int, used: int, *,
                 last_avail_idx: int = 0, event_idx: bool = False,
                 call_fd: int = -1, kick_fd: int = -1, gpa: bool = False,
                 regions: RegionTable | None = None, event_capacity: int = 0,
                 reject_zero_len: bool = False):
        from .layout import avail_ring_size, used_ring_size

        install_sigbus_guard()
        self.num = num
        self.regions = regions if regions is not None else RegionTable(mem)
        self._own_regions = regions is None
        try:
            if not gpa:
                desc = mem.uva_to_gpa(desc, 16 * num)
                avail = mem.uva_to_gpa(avail, avail_ring_size(num))
                used = mem.uva_to_gpa(used, used_ring_size(num))
            self.vq = _dp_ffi.new("struct vqd_vq *")
            rc = _dp_lib.vqd_vq_init(
                self.vq, num, self.regions.host(desc, 16 * num),
                self.regions.host(avail, avail_ring_size(num)),
                self.regions.host(used, used_ring_size(num)),
                self.regions.array, self.regions.count, last_avail_idx & 0xFFFF,
                1 if event_idx else 0, call_fd, kick_fd)
            _dp_check(self, rc, "vring init")
        except BaseException:
            self.release()  # the buffer exports would keep the mappings open
            raise
        self.vq.reject_zero_len = 1 if reject_zero_len else 0
        self._elems = None
        self._iov = None
        self.event_capacity = event_capacity
        if event_capacity:
            self._evlog = _dp_ffi.new("struct vqd_evlog *")
            self._evbuf = _dp_ffi.new("struct vqd_event[]", event_capacity)
            if _dp_lib.vqd_evlog_init(self._evlog, self._evbuf, event_capacity) < 0:
                raise ValueError(f"event_capacity {event_capacity} is invalid: give a power of two")
            self.vq.evlog = self._evlog

    # --- state --------------------------------------------------------------
    @property
    def broken(self) -> str | None:
        if not self.vq.broken:
            return None
        return _dp_ffi.string(self.vq.reason).decode(errors="replace")

    @property
    def last_avail_idx(self) -> int:
        return self.vq.last_avail_idx

    @property
    def used_idx(self) -> int:
        return self.vq.used_idx

    @property
    def counters(self) -> dict:
        v = self.vq
        return {"kicks": v.kicks, "calls": v.calls, "calls_suppressed": v.calls_suppressed,
                "packets": v.packets, "bytes": v.bytes, "drops": v.drops}

    # --- operations -----------------------------------------------------------
    def avail_count(self) -> int:
        return _dp_check(self, _dp_lib.vqd_vq_avail_count(self.vq), "avail")

    def pop(self, max_chains: int = 64, max_iov: int = 1024) -> list[Chain]:
        """Pop up to ``max_chains`` available chains (raises RingError when
        the queue is broken and nothing could be popped).

        The chains' views map guest memory directly: touching them from
        Python is not guarded against a front-end that truncates its memory
        after SET_MEM_TABLE (SIGBUS kills the process). Code serving a
        front-end it does not trust copies with :meth:`read` and
        :meth:`write`, which are."""
        if self._elems is None or len(self._elems) < max_chains or len(self._iov) < max_iov:
            self._elems = _dp_ffi.new("struct vqd_elem[]", max_chains)
            self._iov = _dp_ffi.new("struct vqd_iov[]", max_iov)
        n = _dp_check(self, _dp_lib.vqd_vq_pop(self.vq, self._elems, max_chains, self._iov, max_iov),
                      "pop")
        out = []
        for k in range(n):
            e = self._elems[k]
            views = [memoryview(_dp_ffi.buffer(self._iov[j].base, self._iov[j].len))
                     for j in range(e.iov_idx, e.iov_idx + e.out_num + e.in_num)]
            out.append(Chain(e.head, views[:e.out_num], views[e.out_num:], e.out_len, e.in_len))
        return out

    def _copy(self, views: list, buf, length: int, to_guest: bool) -> int:
        if not views:
            return 0
        iov = _dp_ffi.new("struct vqd_iov[]", len(views))
        keep = []
        for i, v in enumerate(views):
            p = _dp_ffi.from_buffer("uint8_t[]", v, require_writable=to_guest)
            keep.append(p)
            iov[i].base, iov[i].len = p, len(v)
        return _dp_check(self, _dp_lib.vqd_vq_copy_iov(self.vq, iov, len(views), buf, length,
                                                       1 if to_guest else 0), "copy")

    def read(self, chain: Chain, max_bytes: int | None = None) -> bytes:
        """The chain's device-readable bytes (its ``out`` buffers in order,
        at most ``max_bytes``), copied in C under the SIGBUS guard. Raises
        RingError, and the queue is broken naming the guest-physical address,
        when the front-end truncated the memory behind them."""
        n = chain.out_len if max_bytes is None else min(max_bytes, chain.out_len)
        buf = _dp_ffi.new("uint8_t[]", max(n, 1))
        got = self._copy(chain.out, buf, n, False)
        return bytes(_dp_ffi.buffer(buf, got))

    def write(self, chain: Chain, data: bytes) -> int:
        """Copy ``data`` into the chain's device-writable buffers (its
        ``in_`` views in order) under the SIGBUS guard; returns the bytes
        written (at most the chain's ``in_len``; the caller reports it in
        :meth:`push`). Errors as :meth:`read`."""
        src = _dp_ffi.from_buffer("uint8_t[]", data)
        return self._copy(chain.in_, src, min(len(data), chain.in_len), True)

    def rewind(self, n: int) -> None:
        _dp_lib.vqd_vq_rewind(self.vq, n)

    def push(self, used: list[tuple[int, int]]) -> int:
        """Return chains as used ``(head, len)`` and publish used->idx."""
        heads = _dp_ffi.new("uint32_t[]", [h for h, _ in used] or [0])
        lens = _dp_ffi.new("uint32_t[]", [n for _, n in used] or [0])
        return _dp_check(self, _dp_lib.vqd_vq_push(self.vq, heads, lens, len(used)), "push")

    def should_notify(self) -> bool:
        return bool(_dp_lib.vqd_vq_should_notify(self.vq))

    def notify(self) -> bool:
        """Write the call eventfd if the driver wants it; True if called."""
        return bool(_dp_check(self, _dp_lib.vqd_vq_notify(self.vq), "notify"))

    def set_notification(self, enable: bool) -> int:
        """Enable/disable kicks; after enabling returns entries already available."""
        return _dp_check(self, _dp_lib.vqd_vq_set_notification(self.vq, 1 if enable else 0),
                         "set_notification")

    def drain_kick(self) -> int:
        return _dp_lib.vqd_vq_drain_kick(self.vq)

    # --- event log ------------------------------------------------------------
    def drain_event_records(self) -> bytearray:
        """Take the logged events out, oldest first, as packed
        :data:`EVENT_RECORD` s (one copy, no per-event work: the server
        drains often and decodes only what a client asks for). Safe while
        the worker runs; one caller at a time."""
        n = _dp_lib.vqd_vq_events_pending(self.vq)
        out = bytearray(EVENT_RECORD.size * n)
        if n:
            got = _dp_lib.vqd_vq_drain_events(
                self.vq, _dp_ffi.from_buffer("struct vqd_event[]", out, require_writable=True), n)
            del out[EVENT_RECORD.size * got:]
        return out

    def drain_events(self) -> list[tuple[int, str, int]]:
        """Take the logged events out, oldest first: ``(time_ns, kind,
        value)`` with ``kind`` "kick" (value: kicks coalesced), "call" or
        "call_suppressed" (value: used_idx then); see inspector/events.py."""
        return decode_events(self.drain_event_records())

    @property
    def events_dropped(self) -> int:
        """Events lost because the log was full (cumulative)."""
        return _dp_lib.vqd_vq_events_dropped(self.vq)

    def release(self) -> None:
        """Drop the buffer exports (only when no thread is in C with this queue)."""
        if self._own_regions:
            self.regions.release()


class NetScratch:
    """Per-worker scratch of the net fast paths (iovecs and a frame buffer)."""

    def __init__(self):
        self.s = _dp_ffi.new("struct vqd_net_scratch *")

    @property
    def rx_starved(self) -> bool:
        return bool(self.s.rx_starved)

    @property
    def tx_blocked(self) -> bool:
        return bool(self.s.tx_blocked)


def _dp_net_check(rc: int, s, what: str, *queues) -> int:
    if rc >= 0:
        return rc
    if rc == _dp_lib.VQD_E_IO:
        import os as _os
        raise OSError(s.s.err, f"{what}: {_os.strerror(s.s.err)}")
    for q in queues:
        if q is not None and q.broken:
            raise _DpRingError(f"{what}: queue is broken: {q.broken}")
    return _dp_check(None, rc, what)


def net_loopback(tx: DeviceQueue, rx: DeviceQueue, scratch: NetScratch, hdr_len: int,
                 mrg_rxbuf: bool, budget: int = 256, spin: int = 0) -> int:
    """Move up to ``budget`` frames from ``tx`` to ``rx`` with MACs swapped."""
    rc = _dp_lib.vqd_net_loopback(tx.vq, rx.vq, hdr_len, 1 if mrg_rxbuf else 0, budget, spin,
                                  scratch.s)
    return _dp_net_check(rc, scratch, "net loopback", tx, rx)


def net_tap_tx(tx: DeviceQueue, tap_fd: int, scratch: NetScratch, hdr_len: int,
               budget: int = 256) -> int:
    rc = _dp_lib.vqd_net_tap_tx(tx.vq, tap_fd, hdr_len, budget, scratch.s)
    return _dp_net_check(rc, scratch, "tap transmit", tx)


def net_tap_rx(rx: DeviceQueue, tap_fd: int, scratch: NetScratch, hdr_len: int,
               mrg_rxbuf: bool, budget: int = 256) -> int:
    rc = _dp_lib.vqd_net_tap_rx(rx.vq, tap_fd, hdr_len, 1 if mrg_rxbuf else 0, budget, scratch.s)
    return _dp_net_check(rc, scratch, "tap receive", rx)
