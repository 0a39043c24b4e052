"""Anomalies: what a decoder or a source found wrong with a queue, each
kind with the spec rule it breaks.

:data:`ANOMALY_KINDS` are the decoders' kinds, indexed by the C decoder's
``VQD_A_*`` codes (csrc/vqd_decode.h, same order).
"""

from __future__ import annotations

#: Anomaly kinds, indexed by the C decoder's VQD_A_* codes (same order).
ANOMALY_KINDS = (
    "avail_idx_jump",       # avail->idx more than size ahead (§2.7.6, §2.7.13.3)
    "head_out_of_range",    # avail->ring[] head >= size (§2.7.6)
    "next_out_of_range",    # next >= size, or >= entries of the indirect table (§2.7.5, §2.7.5.3)
    "loop",                 # chain longer than its table (§2.7.5.2)
    "indirect_len",         # indirect len 0, not a multiple of 16, or > 16·32768 (§2.7.5.3)
    "nested_indirect",      # INDIRECT inside an indirect table (§2.7.5.3.1)
    "indirect_with_next",   # INDIRECT and NEXT together (§2.7.5.3.1)
    "zero_len",             # descriptor of length 0 (§2.7.5; flagged, not forbidden)
    "addr_out_of_range",    # buffer not inside one region (§2.7.5)
    "indirect_out_of_range",  # indirect table not inside one region (§2.7.5.3)
    "truncated",            # snapshot descriptor budget max_descs exhausted
    "indirect_not_read",    # indirect table in validate-only memory (first pass of a remote read)
)

#: Longest detail string (the C decoder's buffer is VQD_SNAP_DETAIL_LEN = 160 with NUL).
DETAIL_MAX = 159
