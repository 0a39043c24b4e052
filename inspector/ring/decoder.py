"""The C ring snapshot decoders: split (csrc/vqd_decode.c, VIRTIO 1.2 §2.7)
and packed (csrc/vqd_decode_packed.c, §2.8).

:func:`snapshot_split` is the C-backed twin of
:func:`inspector.ring.reference.snapshot_split` (same arguments, equal
:class:`~inspector.ring.snapshot.RingSnapshot`; see that module's docstring
for the semantics; tests/unit/test_decoder_diff.py holds them equal), and
:func:`snapshot_packed` that of
:func:`inspector.ring.reference_packed.snapshot_packed` (equal
:class:`~inspector.ring.packed.PackedRingSnapshot`;
tests/unit/test_packed_decoder_diff.py). Their output arrays become the
snapshot's columns with one copy each; nothing per chain or descriptor is
built here.
"""

from __future__ import annotations

import threading
from array import array

from .._cffi import ffi, lib, snapshot_error
from ..memory import GuestMemory
from .anomalies import DECODER_KINDS, NO_HEAD, Anomaly, AnomalyKind
from .checks import (DEFAULT_MAX_DESCS, PACKED_AREAS, area_error, area_sizes, check_args,
                     check_packed_args, packed_area_sizes, region_table, valid_table)
from .packed import POSITIONS, PackedRingSnapshot
from .reference_packed import event_fields
from .snapshot import U16, U32, U64, RingSnapshot

__all__ = ["snapshot_split", "snapshot_split_pass", "snapshot_packed", "snapshot_packed_pass",
           "RingSnapshot", "PackedRingSnapshot", "DEFAULT_MAX_DESCS"]


def _check_kind_codes() -> None:
    """Every ``VQD_A_*`` code of the C decoder is the position of the
    AnomalyKind member of the same name, and the codes are exactly the
    decoder kinds: the C and the Python names of a kind cannot drift apart."""
    codes = {n[len("VQD_A_"):]: getattr(lib, n) for n in dir(lib) if n.startswith("VQD_A_")}
    for name, code in codes.items():
        if name not in AnomalyKind.__members__ or tuple(AnomalyKind).index(AnomalyKind[name]) != code:
            raise ImportError(f"VQD_A_{name} = {code} is not AnomalyKind.{name}'s position "
                              f"(inspector/ring/anomalies.py and csrc/vqd_decode.h disagree)")
    if sorted(codes.values()) != list(range(len(DECODER_KINDS))):
        raise ImportError(f"the C decoder's VQD_A_* codes {sorted(codes.values())} are not the "
                          f"{len(DECODER_KINDS)} decoder kinds of AnomalyKind")
    if lib.VQD_NO_HEAD != NO_HEAD:
        raise ImportError(f"VQD_NO_HEAD is {lib.VQD_NO_HEAD}, inspector/ring/anomalies.py says {NO_HEAD}")
    if [lib.VQD_POS_DEVICE, lib.VQD_POS_DERIVED, lib.VQD_POS_FLAGS] != [POSITIONS.index(p) for p in
                                                                          ("device", "derived", "flags")]:
        raise ImportError("the C VQD_POS_* codes are not the order of inspector/ring/packed.py POSITIONS")


_check_kind_codes()

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
    (size, max_descs); ``acap`` the anomaly capacity the decoder asks for."""

    def __init__(self, size: int, max_descs: int, acap: int):
        self.key = (size, max_descs)
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


class _PackedOut(_Out):
    """A :class:`_Out` (chains, descriptors, anomalies, unread tables) and
    the ``struct vqd_packed_out`` of the packed decoder (header, every
    slot's flags and id, each chain's first slot)."""

    def __init__(self, size: int, max_descs: int):
        super().__init__(size, max_descs, lib.vqd_snapshot_packed_anomaly_cap(size, max_descs))
        p = self.pout = ffi.new("struct vqd_packed_out *")
        self.pbufs = []  # ring_flags, ring_id, chain_slot
        for name, ctype in (("ring_flags", "uint16_t[]"), ("ring_id", "uint16_t[]"),
                            ("chain_slot", "uint32_t[]")):
            a = _alloc(ctype, size)
            setattr(p, name, a)
            self.keep.append(a)
            self.pbufs.append(ffi.buffer(a))


def _outputs(size: int, max_descs: int) -> _Out:
    o = getattr(_tls, "out", None)
    if o is None or o.key != (size, max_descs):
        o = _tls.out = _Out(size, max_descs, lib.vqd_snapshot_anomaly_cap(size, max_descs))
    return o


def _packed_outputs(size: int, max_descs: int) -> _PackedOut:
    o = getattr(_tls, "pout", None)
    if o is None or o.key != (size, max_descs):
        o = _tls.pout = _PackedOut(size, max_descs)
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
    reused) output arrays. make bench-decoder times this alone."""
    check_args(size, desc, avail, used, last_avail_idx, max_descs)
    regions, nr, valid, nvalid, keep = _regions(mem)
    o = _outputs(size, max_descs)
    # Guarded: a SIGBUS from memory the front-end truncated becomes VQD_SNAP_E_FAULT
    # (the SIGBUS guard, inspector/_cffi.py), not the end of the process.
    rc = lib.vqd_snapshot_guarded(regions, nr, valid, nvalid, desc, avail, used, size,
                                  -1 if last_avail_idx is None else last_avail_idx, max_descs, o.out)
    del keep  # the from_buffer objects were needed only during the call
    if rc != lib.VQD_SNAP_OK:
        i = _AREA_STATUS.get(rc)
        if i is not None:
            raise area_error(i, (desc, avail, used)[i], area_sizes(size)[i])
        raise snapshot_error(rc, mem, size, last_avail_idx, max_descs)
    return o


_AREA_STATUS = {lib.VQD_SNAP_E_DESC_AREA: 0, lib.VQD_SNAP_E_AVAIL_AREA: 1, lib.VQD_SNAP_E_USED_AREA: 2}


def snapshot_split(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                   last_avail_idx: int | None, *,
                   max_descs: int = DEFAULT_MAX_DESCS) -> RingSnapshot:
    """Snapshot a split ring with the C decoder; same contract as
    :func:`inspector.ring.reference.snapshot_split`."""
    o = _walk(mem, size, desc, avail, used, last_avail_idx, max_descs)
    return _result(o, size, last_avail_idx)


def snapshot_split_pass(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                        last_avail_idx: int | None, *, max_descs: int = DEFAULT_MAX_DESCS,
                        skip_if_unread: bool = False,
                        ) -> tuple[RingSnapshot | None, list[tuple[int, int]]]:
    """:func:`snapshot_split` and the indirect tables it could not read
    (validate-only memory); same contract as
    :func:`inspector.ring.reference.snapshot_split_pass`."""
    o = _walk(mem, size, desc, avail, used, last_avail_idx, max_descs)
    unread = _unread(o)
    if not unread:
        return _result(o, size, last_avail_idx), []
    return (None if skip_if_unread else _result(o, size, last_avail_idx)), unread


def _unread(o: _Out) -> list[tuple[int, int]]:
    """The indirect tables (gpa, len) the last walk could not read."""
    n = o.out.n_want
    if not n:
        return []
    addrs, lens = array(U64), array(U32)
    addrs.frombytes(ffi.buffer(o.want_addr, 8 * n))
    lens.frombytes(ffi.buffer(o.want_len, 4 * n))
    return list(zip(addrs.tolist(), lens.tolist()))


def _anomalies(o: _Out) -> list[Anomaly]:
    """The anomalies of the last walk, as Anomaly tuples."""
    out = o.out
    anomalies = []
    if out.n_anomalies:
        kinds = DECODER_KINDS
        string = ffi.string
        for a in o.anomalies[0:out.n_anomalies]:
            anomalies.append(Anomaly(kinds[a.kind], string(a.detail).decode("ascii"),
                                     None if a.head == NO_HEAD else a.head))
    return anomalies


def _result(o: _Out, size: int, last_avail_idx: int | None) -> RingSnapshot:
    """Copy the used prefix of each output array into bytes (one memcpy
    each: a few KB for a full 1024 ring) and view it as a typed column;
    nothing per chain or descriptor is built here."""
    out = o.out
    nc, nd = out.n_chains, out.n_descs
    (avail_ring, used_ring, chain_head, chain_first, chain_ndescs, chain_out, chain_in,
     desc_addr, desc_len, desc_flags, desc_next) = o.bufs
    anomalies = _anomalies(o)
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


# --- packed ---------------------------------------------------------------------

def _walk_packed(mem: GuestMemory, size: int, desc: int, driver_event: int, device_event: int,
                 next_used, used_wrap_counter, last_avail_idx, last_avail_wrap_counter,
                 max_descs: int) -> _PackedOut:
    """Run vqd_snapshot_packed_guarded; its results are in the returned
    (per-thread, reused) output arrays."""
    check_packed_args(size, desc, driver_event, device_event, next_used, used_wrap_counter,
                      last_avail_idx, last_avail_wrap_counter, max_descs)
    regions, nr, valid, nvalid, keep = _regions(mem)
    o = _packed_outputs(size, max_descs)

    def arg(v):
        return -1 if v is None else v
    rc = lib.vqd_snapshot_packed_guarded(
        regions, nr, valid, nvalid, desc, driver_event, device_event, size, arg(next_used),
        arg(used_wrap_counter), arg(last_avail_idx), arg(last_avail_wrap_counter), max_descs,
        o.out, o.pout)
    del keep
    if rc != lib.VQD_SNAP_OK:
        i = _AREA_STATUS.get(rc)
        if i is not None:
            raise area_error(i, (desc, driver_event, device_event)[i], packed_area_sizes(size)[i],
                             PACKED_AREAS)
        raise snapshot_error(rc, mem, size, last_avail_idx, max_descs)
    return o


def snapshot_packed(mem: GuestMemory, size: int, desc: int, driver_event: int, device_event: int,
                    *, next_used: int | None = None, used_wrap_counter: int | None = None,
                    last_avail_idx: int | None = None, last_avail_wrap_counter: int | None = None,
                    max_descs: int = DEFAULT_MAX_DESCS) -> PackedRingSnapshot:
    """Snapshot a packed ring with the C decoder; same contract as
    :func:`inspector.ring.reference_packed.snapshot_packed`."""
    return snapshot_packed_pass(mem, size, desc, driver_event, device_event, next_used=next_used,
                                used_wrap_counter=used_wrap_counter, last_avail_idx=last_avail_idx,
                                last_avail_wrap_counter=last_avail_wrap_counter,
                                max_descs=max_descs)[0]


def snapshot_packed_pass(mem: GuestMemory, size: int, desc: int, driver_event: int,
                         device_event: int, *, next_used: int | None = None,
                         used_wrap_counter: int | None = None, last_avail_idx: int | None = None,
                         last_avail_wrap_counter: int | None = None,
                         max_descs: int = DEFAULT_MAX_DESCS, skip_if_unread: bool = False,
                         ) -> tuple[PackedRingSnapshot | None, list[tuple[int, int]]]:
    """:func:`snapshot_packed` and the indirect tables it could not read;
    same contract as :func:`inspector.ring.reference_packed.snapshot_packed_pass`."""
    o = _walk_packed(mem, size, desc, driver_event, device_event, next_used, used_wrap_counter,
                     last_avail_idx, last_avail_wrap_counter, max_descs)
    unread = _unread(o)
    if unread and skip_if_unread:
        return None, unread
    return _packed_result(o, size), unread


def _packed_result(o: _PackedOut, size: int) -> PackedRingSnapshot:
    """Columns from the used prefixes of the output arrays (one copy each)."""
    out, p = o.out, o.pout
    nc, nd = out.n_chains, out.n_descs
    (_avail_ring, _used_ring, chain_head, chain_first, chain_ndescs, chain_out, chain_in,
     desc_addr, desc_len, desc_flags, desc_next) = o.bufs
    ring_flags, ring_id, chain_slot = o.pbufs
    return PackedRingSnapshot(
        size=size, next_avail=p.next_avail, avail_wrap_counter=p.avail_wrap_counter,
        next_used=p.next_used, used_wrap_counter=p.used_wrap_counter,
        last_avail_idx=None if p.last_avail_idx < 0 else p.last_avail_idx,
        last_avail_wrap_counter=None if p.last_avail_wrap_counter < 0 else p.last_avail_wrap_counter,
        **event_fields(p.driver_event_desc, p.driver_event_flags, p.device_event_desc,
                       p.device_event_flags),
        positions=POSITIONS[p.positions],
        ring_flags=memoryview(ring_flags[:2 * size]).cast(U16),
        ring_id=memoryview(ring_id[:2 * size]).cast(U16),
        desc_addr=memoryview(desc_addr[:8 * nd]).cast(U64),
        desc_len=memoryview(desc_len[:4 * nd]).cast(U32),
        desc_flags=memoryview(desc_flags[:2 * nd]).cast(U16),
        desc_next=memoryview(desc_next[:2 * nd]).cast(U16),
        chain_head=memoryview(chain_head[:4 * nc]).cast(U32),
        chain_slot=memoryview(chain_slot[:4 * nc]).cast(U32),
        chain_first=memoryview(chain_first[:4 * nc]).cast(U32),
        chain_ndescs=memoryview(chain_ndescs[:4 * nc]).cast(U32),
        chain_out_bytes=memoryview(chain_out[:8 * nc]).cast(U64),
        chain_in_bytes=memoryview(chain_in[:8 * nc]).cast(U64),
        anomalies=_anomalies(o))
