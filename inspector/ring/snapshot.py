"""The result of both split-ring snapshot decoders (VIRTIO 1.2 §2.7).

:func:`inspector.ring.decoder.snapshot_split` (C) and
:func:`inspector.ring.reference.snapshot_split` (pure Python) return a
:class:`RingSnapshot`: header fields as ints, rings, descriptors and chains as
columns of fixed-width integers, anomalies as
:class:`~inspector.ring.anomalies.Anomaly` tuples. Nothing per descriptor or
per chain is a Python object until asked for: :class:`Chain` and
:class:`Descriptor` tuples are built by :attr:`RingSnapshot.chains` and
:meth:`RingSnapshot.chain`; :meth:`RingSnapshot.chain_dicts` turns the columns
straight into the chain dicts of the Snapshot JSON for
:mod:`inspector.snapshot.codec` (README.md, "Snapshot JSON"), without them.

A column is any sequence of ints with ``tolist()`` whose items have the
column's width: the C decoder gives ``memoryview`` casts of ``bytes`` copied
out of its buffers, the reference gives ``array.array``. Both are read-only
in spirit: do not modify a snapshot's columns.
"""

from __future__ import annotations

import gc
from array import array
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from .anomalies import Anomaly

if TYPE_CHECKING:
    from .blk_request import BlkRequest

#: ``array``/``memoryview`` format of the unsigned 16, 32 and 64-bit columns.
U16, U32, U64 = "H", "I", "Q"
for _code, _width in ((U16, 2), (U32, 4), (U64, 8)):
    if array(_code).itemsize != _width:  # pragma: no cover - exotic ABIs only
        raise ImportError(f"array typecode {_code!r} is not {_width} bytes on this platform")

#: Header fields (ints; ``last_avail_idx`` may be None).
HEADER = ("size", "avail_flags", "avail_idx", "used_event", "used_flags", "used_idx",
          "avail_event", "last_avail_idx", "inflight")
#: Columns and their item formats.
COLUMNS = {
    "avail_ring": U16,       # [size] avail->ring[]
    "used_ring": U32,        # [2 * size] used->ring[] flattened: id0, len0, id1, len1, ...
    "desc_addr": U64,        # [n_descs] listed descriptors, chain after chain
    "desc_len": U32,
    "desc_flags": U16,
    "desc_next": U16,
    "chain_head": U32,       # [n_chains] one per walked avail slot
    "chain_first": U32,      # index of the chain's first descriptor in desc_*
    "chain_ndescs": U32,     # its number of descriptors
    "chain_out_bytes": U64,  # sum of len of device-readable descriptors
    "chain_in_bytes": U64,   # sum of len of device-writable descriptors
}


@contextmanager
def _gc_paused():
    """Pause the cyclic GC while thousands of small objects are built from
    the columns: it would otherwise scan the young ones several times over.
    (Columns become lists in one call each, and dicts come from dict
    displays, CPython's fastest way to build them.)"""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Descriptor(NamedTuple):
    """One listed descriptor, as the driver wrote it (``struct virtq_desc``,
    VIRTIO 1.2 §2.7.5): guest-physical ``addr``, ``len`` bytes,
    ``flags`` (VRING_DESC_F_* masks), ``next`` (a descriptor index)."""

    addr: int
    len: int
    flags: int
    next: int


class Chain(NamedTuple):
    """One in-flight descriptor chain: its ``head`` (the avail->ring entry,
    §2.7.6), its listed descriptors (those of an indirect table instead of
    the indirect descriptor, §2.7.5.3), and the bytes of its
    device-readable (``out_bytes``) and device-writable (``in_bytes``)
    buffers. In a packed ring (§2.8) ``head`` is the buffer id (§2.8.6: the
    chain's last descriptor carries it), ``slot`` the ring slot of its
    first descriptor, and each Descriptor's ``next`` holds its ``id``
    field; ``slot`` is None for a split ring. ``request``: the chain's
    virtio-blk request (:class:`inspector.ring.blk_request.BlkRequest`) on a
    block device's queue whose requests were decoded, else None."""

    head: int
    descs: tuple[Descriptor, ...]
    out_bytes: int
    in_bytes: int
    slot: int | None = None
    request: BlkRequest | None = None


class ChainColumns:
    """The lazy chain views both ring snapshots share (split
    :class:`RingSnapshot`, packed :class:`inspector.ring.packed.PackedRingSnapshot`):
    chain ``k`` lists descriptors ``chain_first[k] .. chain_first[k] +
    chain_ndescs[k] - 1`` of the ``desc_*`` columns. A subclass has the
    ``desc_*`` and ``chain_*`` columns and ``_chains`` (None until built);
    ``_DESC_KEY`` names the descriptor's 4th field in the JSON (split
    ``next``, packed ``id``) and ``_SLOT_COLUMN`` the column of each chain's
    ring slot (packed ``chain_slot``; None: no slot).

    ``requests``: None, or one virtio-blk request per chain
    (:func:`inspector.ring.blk_request.attach_requests`, a block device's
    queues only), which the chains carry (``Chain.request``, the chain
    dict's ``request``). Not compared by ``==``: the decoders do not read
    them."""

    __slots__ = ()
    _DESC_KEY = "next"
    _SLOT_COLUMN: str | None = None

    @property
    def n_chains(self) -> int:
        return len(self.chain_head)

    @property
    def n_descs(self) -> int:
        return len(self.desc_addr)

    @property
    def chains(self) -> list[Chain]:
        """Every chain as a :class:`Chain`, built on first access and cached
        (the list is shared: do not modify it)."""
        if self._chains is None:
            with _gc_paused():
                descs = list(map(Descriptor, self.desc_addr.tolist(), self.desc_len.tolist(),
                                 self.desc_flags.tolist(), self.desc_next.tolist()))
                self._chains = [Chain(h, tuple(descs[s:s + c]), ob, ib, sl)
                                for h, sl, s, c, ob, ib in self._chain_rows()]
                if self.requests is not None:
                    self._chains = [c._replace(request=r) for c, r in zip(self._chains, self.requests)]
        return self._chains

    def chain(self, k: int) -> Chain:
        """Chain ``k`` (negative ``k`` counts from the end), without building
        the others."""
        if self._chains is not None:
            return self._chains[k]
        k = range(self.n_chains)[k]  # IndexError like a list
        s, c = self.chain_first[k], self.chain_ndescs[k]
        descs = tuple(map(Descriptor, self.desc_addr[s:s + c], self.desc_len[s:s + c],
                          self.desc_flags[s:s + c], self.desc_next[s:s + c]))
        slot = getattr(self, self._SLOT_COLUMN)[k] if self._SLOT_COLUMN else None
        request = self.requests[k] if self.requests is not None else None
        return Chain(self.chain_head[k], descs, self.chain_out_bytes[k], self.chain_in_bytes[k], slot, request)

    def chain_dicts(self) -> list[dict[str, Any]]:
        """The chains as the chain dicts of the Snapshot JSON straight from
        the columns, with no :class:`Chain` built: ``head``, (packed:
        ``slot``), ``descs`` of ``{addr, len, flags, next}`` (packed: ``id``
        instead of ``next``), ``out_bytes``, ``in_bytes``, then ``request``
        (the virtio-blk request's dict) where :attr:`requests` has one; what
        :func:`inspector.snapshot.codec.to_json` emits for a queue decoded
        from this ring. New objects each call."""
        key = self._DESC_KEY
        with _gc_paused():
            descs = [{"addr": a, "len": ln, "flags": f, key: nx} for a, ln, f, nx in zip(
                self.desc_addr.tolist(), self.desc_len.tolist(), self.desc_flags.tolist(),
                self.desc_next.tolist())]
            if self._SLOT_COLUMN:
                out = [{"head": h, "slot": sl, "descs": descs[s:s + c], "out_bytes": ob, "in_bytes": ib}
                       for h, sl, s, c, ob, ib in self._chain_rows()]
            else:
                out = [{"head": h, "descs": descs[s:s + c], "out_bytes": ob, "in_bytes": ib}
                       for h, _sl, s, c, ob, ib in self._chain_rows()]
            if self.requests is not None:
                for d, r in zip(out, self.requests):
                    if r is not None:
                        d["request"] = r.as_dict()
            return out

    def _chain_rows(self):
        """``(head, slot, first, ndescs, out_bytes, in_bytes)`` per chain,
        from the columns as lists (one call each); slot None without a slot
        column."""
        n = len(self.chain_head)
        slots = getattr(self, self._SLOT_COLUMN).tolist() if self._SLOT_COLUMN else [None] * n
        return zip(self.chain_head.tolist(), slots, self.chain_first.tolist(), self.chain_ndescs.tolist(),
                   self.chain_out_bytes.tolist(), self.chain_in_bytes.tolist())


class RingSnapshot(ChainColumns):
    """One split ring as read by a decoder; see the module docstring.

    Chain ``k`` lists descriptors ``chain_first[k] .. chain_first[k] +
    chain_ndescs[k] - 1`` of the ``desc_*`` columns. Equality compares the
    header, every column's values and the anomalies, whatever the column
    types.
    """

    __slots__ = HEADER + tuple(COLUMNS) + ("anomalies", "_chains", "requests")

    def __init__(self, *, size: int, avail_flags: int, avail_idx: int, used_event: int,
                 used_flags: int, used_idx: int, avail_event: int, last_avail_idx: int | None,
                 avail_ring, used_ring, desc_addr, desc_len, desc_flags, desc_next,
                 chain_head, chain_first, chain_ndescs, chain_out_bytes, chain_in_bytes,
                 anomalies: list[Anomaly]):
        self.size = size
        self.avail_flags = avail_flags
        self.avail_idx = avail_idx
        self.used_event = used_event
        self.used_flags = used_flags
        self.used_idx = used_idx
        self.avail_event = avail_event
        self.last_avail_idx = last_avail_idx
        # README "Snapshot JSON": (avail_idx − used_idx) mod 2^16
        self.inflight = (avail_idx - used_idx) & 0xFFFF
        self.avail_ring = avail_ring
        self.used_ring = used_ring
        self.desc_addr = desc_addr
        self.desc_len = desc_len
        self.desc_flags = desc_flags
        self.desc_next = desc_next
        self.chain_head = chain_head
        self.chain_first = chain_first
        self.chain_ndescs = chain_ndescs
        self.chain_out_bytes = chain_out_bytes
        self.chain_in_bytes = chain_in_bytes
        self.anomalies = anomalies
        self._chains: list[Chain] | None = None
        self.requests: list[BlkRequest] | None = None

    def used_elem(self, i: int) -> tuple[int, int]:
        """``(id, len)`` of ``used->ring[i]``."""
        return self.used_ring[2 * i], self.used_ring[2 * i + 1]

    def as_dict(self) -> dict[str, Any]:
        """A plain-data view of everything the decoder read, for tests and
        the fuzz harness (not the Snapshot JSON, which
        :mod:`inspector.snapshot.codec` makes): header fields, ``avail_ring``
        (list of ints), ``used_ring`` (list of ``[id, len]``), ``chains`` (as
        :meth:`chain_dicts`) and ``anomalies`` (``{"kind", "detail",
        "head"}``). New objects each call, sharing nothing with this
        snapshot."""
        it = iter(self.used_ring.tolist())
        return {
            "avail_flags": self.avail_flags,
            "avail_idx": self.avail_idx,
            "avail_ring": self.avail_ring.tolist(),
            "used_event": self.used_event,
            "used_flags": self.used_flags,
            "used_idx": self.used_idx,
            "used_ring": list(map(list, zip(it, it))),
            "avail_event": self.avail_event,
            "last_avail_idx": self.last_avail_idx,
            "inflight": self.inflight,
            "chains": self.chain_dicts(),
            "anomalies": [{"kind": a.kind.value, "detail": a.detail, "head": a.head}
                          for a in self.anomalies],
        }

    # --- comparison -----------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RingSnapshot):
            return NotImplemented
        return (all(getattr(self, f) == getattr(other, f) for f in HEADER)
                and all(getattr(self, c).tolist() == getattr(other, c).tolist() for c in COLUMNS)
                and list(self.anomalies) == list(other.anomalies))

    __hash__ = None  # type: ignore[assignment]  # mutable-ish, compared by value

    def __repr__(self) -> str:
        return (f"<RingSnapshot size={self.size} avail_idx={self.avail_idx} "
                f"used_idx={self.used_idx} chains={self.n_chains} descs={self.n_descs} "
                f"anomalies={len(self.anomalies)}>")


__all__ = ["Chain", "Descriptor", "RingSnapshot", "HEADER", "COLUMNS", "U16", "U32", "U64"]
