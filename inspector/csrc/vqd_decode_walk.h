/* What the split (vqd_decode.c) and packed (vqd_decode_packed.c) snapshot
 * decoders share: the region lookups, the anomaly and descriptor records of
 * struct vqd_snap_out, the descriptor budget, the buffer checks and the
 * checks of an indirect table before its walk (VIRTIO 1.2 §2.7.5.3,
 * §2.8.7). Internal: no CDEF block, nothing exported.
 *
 * The pure-Python references mirror these in inspector/ring/reference.py
 * (_Mem, _Walk), which inspector/ring/reference_packed.py reuses.
 */
#ifndef VQD_DECODE_WALK_H
#define VQD_DECODE_WALK_H

#include "vqd_decode.h"

struct vqd_walk {
    const struct vqd_region *regions;
    int nr_regions;
    const struct vqd_region *valid;
    int nr_valid;
    const uint8_t *desc;        /* host view of the whole descriptor table / ring */
    uint32_t size;
    uint32_t max_descs;
    uint32_t budget;            /* descriptors that may still be listed */
    int truncated;
    int packed;                 /* 0: split details, 1: packed details */
    struct vqd_snap_out *out;
    /* current chain: split: avail slot and head; packed: first slot (head =
     * the same slot, the buffer id is known only at the chain's end) */
    uint32_t slot;
    uint32_t head;
    uint32_t k;                 /* chain index */
};

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
/* Record an anomaly of `kind` found in the walk of the chain of `head`
 * (VQD_NO_HEAD: not inside a chain's walk). */
VQD_INTERNAL void vqd_w_anomaly(struct vqd_walk *w, uint32_t kind, int32_t head, const char *fmt, ...);

/* The first region of r[0..nr) holding all of [gpa, gpa + len), or -1. */
VQD_INTERNAL int vqd_find_region(const struct vqd_region *r, int nr, uint64_t gpa, uint64_t len);

/* Host view of a readable range, or NULL. */
VQD_INTERNAL const uint8_t *vqd_w_readable(const struct vqd_walk *w, uint64_t gpa, uint64_t len);

/* May one more descriptor be read and listed? (else one truncated anomaly) */
VQD_INTERNAL int vqd_w_budget_ok(struct vqd_walk *w);

/* List one (non-indirect) descriptor in chain w->k and check its buffer;
 * "desc[i]" or, for j >= 0, "desc[i]->indirect[j]" in details. */
VQD_INTERNAL void vqd_w_emit(struct vqd_walk *w, const struct vqd_desc *d, uint32_t i, int64_t j);

/* The host view of the indirect table described by desc[di] (*d), or NULL
 * after recording why not (indirect_len, indirect_not_read with the table
 * in want_addr/want_len, indirect_out_of_range). */
VQD_INTERNAL const uint8_t *vqd_w_indirect_table(struct vqd_walk *w, uint32_t di, const struct vqd_desc *d);

/* The word before a chain's number in details: "head" (split), "chain at
 * slot" (packed). */
static inline const char *vqd_w_chain_word(const struct vqd_walk *w)
{
    return w->packed ? "chain at slot" : "head";
}

#endif
