/* Split-ring snapshot decoder (VIRTIO 1.2 §2.7): reads one queue from guest
 * memory through a region table and walks its in-flight chains.
 *
 * Two region tables: `regions` are readable (host points at a local copy or
 * mapping), `valid` are validate-only (guest memory that exists but was not
 * read here: only gpa and size are used, host is ignored). A range is
 * readable when one readable region holds all of it (the first such region
 * in table order); it is valid guest memory when it is readable or one
 * validate-only region holds all of it. So readable regions take precedence
 * wherever the two overlap, and regions may overlap freely. A buffer must be
 * valid (else addr_out_of_range); an indirect table must be readable: one
 * that is only valid is listed in want_addr/want_len and reported as
 * indirect_not_read, so that the caller can read it and decode again
 * (inspector/ring/remote.py).
 *
 * Guest memory is hostile. Every read goes through vqd_gpa_to_host (whole
 * range inside one region, overflow-checked), every walk is bounded, and every
 * violation becomes an anomaly record, never a crash or a hang. No malloc: the
 * caller (inspector/ring/decoder.py) allocates every output array.
 *
 * The pure-Python reference inspector/ring/reference.py implements exactly
 * the same walk, in the same order, with the same detail strings and heads;
 * tests/unit/test_decoder_diff.py holds the two equal.
 */
#ifndef VQD_DECODE_H
#define VQD_DECODE_H

#include "vqd_ring.h"

/* CDEF BEGIN */
/* Status codes of vqd_snapshot. */
#define VQD_SNAP_OK 0
#define VQD_SNAP_E_SIZE 1        /* size not a power of two in 1..32768 (§2.7) */
#define VQD_SNAP_E_DESC_AREA 2   /* descriptor table not inside one region */
#define VQD_SNAP_E_AVAIL_AREA 3  /* driver area (avail ring) not inside one region */
#define VQD_SNAP_E_USED_AREA 4   /* device area (used ring) not inside one region */
#define VQD_SNAP_E_NOSPACE 5     /* output arrays smaller than vqd_snapshot_anomaly_cap() */
#define VQD_SNAP_E_ARG 6         /* last_avail_idx not -1 and not a 16-bit index */
#define VQD_SNAP_E_FAULT 7       /* vqd_snapshot_guarded: the ring memory faulted (SIGBUS;
                                  * where: vqd_guard_fault_addr()); never a data-path VQD_E_* */

/* Anomaly kinds; names in inspector/ring/anomalies.py AnomalyKind (same
 * order: inspector/ring/decoder.py checks it at import). */
#define VQD_A_AVAIL_IDX_JUMP 0
#define VQD_A_HEAD_OUT_OF_RANGE 1
#define VQD_A_NEXT_OUT_OF_RANGE 2
#define VQD_A_LOOP 3
#define VQD_A_INDIRECT_LEN 4
#define VQD_A_NESTED_INDIRECT 5
#define VQD_A_INDIRECT_WITH_NEXT 6
#define VQD_A_ZERO_LEN 7
#define VQD_A_ADDR_OUT_OF_RANGE 8
#define VQD_A_INDIRECT_OUT_OF_RANGE 9
#define VQD_A_TRUNCATED 10
#define VQD_A_INDIRECT_NOT_READ 11

#define VQD_SNAP_DETAIL_LEN 160
#define VQD_SNAP_MAX_INDIRECT_LEN 524288 /* 16 * 32768 bytes */

#define VQD_NO_HEAD -1

struct vqd_anomaly {
    uint32_t kind;
    /* the head of the chain whose walk found it, or VQD_NO_HEAD when it is
     * not inside a chain's walk (avail_idx_jump, head_out_of_range,
     * truncated) */
    int32_t head;
    char detail[VQD_SNAP_DETAIL_LEN]; /* NUL-terminated ASCII */
};

/* Output of one snapshot. The caller fills the array pointers and capacities
 * (vqd_snapshot_anomaly_cap); vqd_snapshot fills the rest. Chains and descriptors
 * are structures of arrays: the wrapper copies the used prefix of each array
 * (one memcpy) into a column of inspector.ring.snapshot.RingSnapshot, the layout the
 * Python reference fills too. Only those prefixes are written, so the arrays
 * may be allocated uncleared and reused.
 * Chain k lists descriptors [chain_first[k], chain_first[k] + chain_ndescs[k]). */
struct vqd_snap_out {
    /* header, read once each */
    uint16_t avail_flags;
    uint16_t avail_idx;
    uint16_t used_event;
    uint16_t used_flags;
    uint16_t used_idx;
    uint16_t avail_event;
    uint32_t n_chains;
    uint32_t n_descs;
    uint32_t n_anomalies;
    /* [size] copies of the rings: the chains are walked from this copy */
    uint16_t *avail_ring;
    uint32_t *used_ring;        /* [2 * size]: id, len */
    /* [size] per chain */
    uint32_t *chain_head;
    uint32_t *chain_first;
    uint32_t *chain_ndescs;
    uint64_t *chain_out_bytes;
    uint64_t *chain_in_bytes;
    /* [desc_cap] listed descriptors */
    uint32_t desc_cap;
    uint64_t *desc_addr;
    uint32_t *desc_len;
    uint16_t *desc_flags;
    uint16_t *desc_next;
    /* [anomaly_cap] */
    uint32_t anomaly_cap;
    struct vqd_anomaly *anomalies;
    /* [want_cap >= size] indirect tables in validate-only memory (at most one
     * per walked chain), sorted by (addr, len), without duplicates */
    uint32_t want_cap;
    uint32_t n_want;
    uint64_t *want_addr;
    uint32_t *want_len;
};

/* Capacities vqd_snapshot needs for a queue of `size` listing at most
 * `max_descs` descriptors: desc_cap >= max_descs,
 * anomaly_cap >= max_descs + 2 * size + 2 and want_cap >= size. */
uint32_t vqd_snapshot_anomaly_cap(uint32_t size, uint32_t max_descs);

/* Snapshot the split ring of `size` entries whose descriptor table, driver
 * area and device area are at guest-physical desc, avail, used (each must be
 * readable). Chains are
 * walked from last_avail_idx (-1: unknown, use used->idx) up to avail->idx,
 * listing at most max_descs descriptors in total. Returns VQD_SNAP_OK or a
 * VQD_SNAP_E_* status. */
int vqd_snapshot(const struct vqd_region *regions, int nr_regions,
                 const struct vqd_region *valid, int nr_valid,
                 uint64_t desc, uint64_t avail, uint64_t used,
                 uint32_t size, int32_t last_avail_idx, uint32_t max_descs,
                 struct vqd_snap_out *out);
/* CDEF END */

#endif
