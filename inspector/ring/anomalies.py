"""Anomalies: what a decoder or a source found wrong with a queue, each
kind with the spec rule it breaks.

:class:`AnomalyKind` names every kind vqscope reports. Its first
:data:`N_DECODER_KINDS` members are the ring decoders' kinds (split and
packed), in the order of the C decoders' ``VQD_A_*`` codes
(csrc/vqd_decode.h, csrc/vqd_decode_packed.h):
``AnomalyKind.by_code(code)`` is the kind of a code, and
:mod:`inspector.ring.decoder` checks at import that every ``VQD_A_*`` equals
its member's position. The others are reported by the sources and the
back-end (a ring that cannot be read, a device marked broken ...).

:class:`Anomaly` is one finding: its kind, a human-readable ``detail``, and
the ``head`` of the descriptor chain it was found in (None when it is not
about one chain). Code compares ``kind`` with members, never with strings;
the string values appear only in the Snapshot JSON (inspector.snapshot.codec).
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class AnomalyKind(StrEnum):
    """Every anomaly kind; the value is the ``kind`` of the Snapshot JSON
    (README.md, "Snapshot JSON"). Members up to ``USED_NOT_AVAILABLE`` are the
    decoders' (same order as the C ``VQD_A_*`` codes of csrc/vqd_decode.h and
    csrc/vqd_decode_packed.h); do not reorder them."""

    # --- the split-ring decoders (csrc/vqd_decode.c, ring/reference.py)
    AVAIL_IDX_JUMP = "avail_idx_jump"            # avail->idx more than size ahead (§2.7.6, §2.7.13.3)
    HEAD_OUT_OF_RANGE = "head_out_of_range"      # avail->ring[] head >= size (§2.7.6)
    NEXT_OUT_OF_RANGE = "next_out_of_range"      # next >= size, or >= entries of the indirect table (§2.7.5, §2.7.5.3)
    LOOP = "loop"                                # chain longer than its table (§2.7.5.2)
    INDIRECT_LEN = "indirect_len"                # indirect len 0, not a multiple of 16, or > 16·32768 (§2.7.5.3)
    NESTED_INDIRECT = "nested_indirect"          # INDIRECT inside an indirect table (§2.7.5.3.1)
    INDIRECT_WITH_NEXT = "indirect_with_next"    # INDIRECT and NEXT together (§2.7.5.3.1)
    ZERO_LEN = "zero_len"                        # descriptor of length 0 (§2.7.5; flagged, not forbidden)
    ADDR_OUT_OF_RANGE = "addr_out_of_range"      # buffer not inside one region (§2.7.5)
    INDIRECT_OUT_OF_RANGE = "indirect_out_of_range"  # indirect table not inside one region (§2.7.5.3)
    TRUNCATED = "truncated"                      # snapshot descriptor budget max_descs exhausted
    INDIRECT_NOT_READ = "indirect_not_read"      # indirect table in validate-only memory (a remote read
                                                 # could not, or would not, read it: ring/remote.py)
    # --- the packed-ring decoders only (csrc/vqd_decode_packed.c, ring/reference_packed.py);
    # they also report the kinds above whose rule is the same in §2.8 (indirect_len,
    # nested_indirect, indirect_with_next, zero_len, addr_out_of_range,
    # indirect_out_of_range, truncated, indirect_not_read)
    ID_OUT_OF_RANGE = "id_out_of_range"          # buffer id >= size (§2.8.6: ids identify descriptors of the ring)
    CHAIN_TOO_LONG = "chain_too_long"            # NEXT chains past the descriptors the ring can hold (§2.8.6, §2.8.17)
    AVAIL_USED_PATTERN = "avail_used_pattern"    # AVAIL/USED flags impossible for the wrap state (§2.8.1, §2.8.6)
    USED_NOT_AVAILABLE = "used_not_available"    # a used descriptor where the driver's available one is
                                                 # outstanding: an id never made available there (§2.8.6, §2.8.9)
    # --- the sources and the back-end
    RING_UNMAPPED = "ring_unmapped"              # the ring areas are not in the memory known (all sources)
    QUEUE_BROKEN = "queue_broken"                # the back-end's data path broke the queue (its reason)
    DEVICE_BROKEN = "device_broken"              # QEMU marked the device broken (x-query-virtio-status)
    LAYOUT_UNSUPPORTED = "layout_unsupported"    # VIRTIO_F_RING_PACKED negotiated: not decoded
    ADDRESS_MISMATCH = "address_mismatch"        # vhost's QEMU address disagrees with the RAM map
    MEM_TABLE_UNKNOWN = "mem_table_unknown"      # vhost-net memory table set before the probes attached
    IOVA_UNTRANSLATED = "iova_untranslated"      # VIRTIO_F_ACCESS_PLATFORM behind a vIOMMU: the ring
                                                 # addresses are IOVAs the source cannot translate
    IOTLB_MISS_UNANSWERED = "iotlb_miss_unanswered"  # vqscope's back-end asked the front-end for an IOVA's
                                                 # translation (IOTLB miss) over a second ago: the queue waits

    @classmethod
    def by_code(cls, code: int) -> AnomalyKind:
        """The kind of the C decoder's ``VQD_A_*`` ``code`` (IndexError for
        a code no decoder kind has)."""
        if not 0 <= code < N_DECODER_KINDS:
            raise IndexError(f"no decoder anomaly kind has code {code}")
        return _MEMBERS[code]


_MEMBERS = tuple(AnomalyKind)

#: Number of decoder kinds: the members before RING_UNMAPPED, codes 0 .. N-1.
N_DECODER_KINDS = _MEMBERS.index(AnomalyKind.RING_UNMAPPED)

#: The decoders' kinds, indexed by their C code.
DECODER_KINDS: tuple[AnomalyKind, ...] = _MEMBERS[:N_DECODER_KINDS]


class Anomaly(NamedTuple):
    """One anomaly of a queue.

    ``kind``: an :class:`AnomalyKind`; ``detail``: what and where, for
    people (at most :data:`DETAIL_MAX` characters from a decoder);
    ``head``: the head (descriptor index) of the chain whose walk found it,
    or None when it is not inside a chain's walk: ``avail_idx_jump`` (the
    ring), ``head_out_of_range`` (the slot holds no valid head),
    ``truncated`` (the snapshot's descriptor budget), and every kind the
    sources report. :func:`inspector.ring.remote.forget_returned` drops by
    ``head``. For a packed ring ``head`` is the slot of the chain's first
    descriptor (the buffer id is known only at its last), None for
    ``avail_used_pattern`` and ``used_not_available`` found outside a
    chain's walk. The Snapshot JSON carries ``kind`` and ``detail`` only.
    """

    kind: AnomalyKind
    detail: str
    head: int | None = None


#: Longest detail string (the C decoder's buffer is VQD_SNAP_DETAIL_LEN = 160 with NUL).
DETAIL_MAX = 159

#: The C decoder's "no head" (struct vqd_anomaly.head).
NO_HEAD = -1

__all__ = ["Anomaly", "AnomalyKind", "DECODER_KINDS", "DETAIL_MAX", "N_DECODER_KINDS", "NO_HEAD"]
