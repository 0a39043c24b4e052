/* Split-ring snapshot decoder; see vqd_decode.h. The walk below is mirrored
 * step by step by inspector/ring/reference.py: change both together (the
 * differential test tests/unit/test_decoder_diff.py holds them equal). */
#include <stdio.h>
#include <string.h>

#include "vqd_decode_walk.h"

uint32_t vqd_snapshot_anomaly_cap(uint32_t size, uint32_t max_descs)
{
    /* At most one of zero_len / addr_out_of_range per listed descriptor, at
     * most two per chain otherwise (indirect_with_next + one that ends the
     * walk), plus avail_idx_jump and truncated once per snapshot. */
    return max_descs + 2 * size + 2;
}

/* Walk the indirect table described by descriptor `di` (already read into
 * *d). §2.7.5.3: the table holds len / 16 descriptors, the chain starts at
 * entry 0 and follows next inside the table. */
static void walk_indirect(struct vqd_walk *w, uint32_t di, const struct vqd_desc *d)
{
    /* §2.7.5.3: len / 16 entries, checked by vqd_w_indirect_table. */
    const uint8_t *table = vqd_w_indirect_table(w, di, d);
    if (!table)
        return;
    uint32_t n = d->len / 16, j = 0, count = 0;
    for (;;) {
        /* §2.7.5.2: no loops ("this implies that loops in the descriptor
         * chain are forbidden"); a walk longer than the table revisits. */
        if (count >= n) {
            vqd_w_anomaly(w, VQD_A_LOOP, (int32_t)w->head,
                    "desc[%u]->indirect chain is longer than its table of %u "
                    "entries: loop (head %u)", di, n, w->head);
            return;
        }
        if (!vqd_w_budget_ok(w))
            return;
        struct vqd_desc e;
        memcpy(&e, table + 16 * (size_t)j, sizeof e);
        count++;
        if (e.flags & VRING_DESC_F_INDIRECT) {
            /* §2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT
             * flag within an indirect descriptor (ie. only one table per
             * descriptor)." Not followed, not listed. */
            vqd_w_anomaly(w, VQD_A_NESTED_INDIRECT, (int32_t)w->head,
                    "desc[%u]->indirect[%u].flags = 0x%x sets VRING_DESC_F_INDIRECT "
                    "(head %u)", di, j, (unsigned)e.flags, w->head);
            return;
        }
        vqd_w_emit(w, &e, di, j);
        if (!(e.flags & VRING_DESC_F_NEXT))
            return;
        /* §2.7.5.3: next indexes the indirect table. */
        if (e.next >= n) {
            vqd_w_anomaly(w, VQD_A_NEXT_OUT_OF_RANGE, (int32_t)w->head,
                    "desc[%u]->indirect[%u].next = %u >= table entries %u (head %u)",
                    di, j, (unsigned)e.next, n, w->head);
            return;
        }
        j = e.next;
    }
}

/* Walk the chain of avail->ring[slot]. */
static void walk_chain(struct vqd_walk *w, uint32_t head)
{
    uint32_t size = w->size, i = head, count = 0;

    /* §2.7.6: avail->ring[] holds heads of descriptor chains, i.e. indices
     * into the descriptor table of Queue Size entries. */
    if (head >= size) {
        vqd_w_anomaly(w, VQD_A_HEAD_OUT_OF_RANGE, VQD_NO_HEAD, "avail->ring[%u] = head %u >= size %u",
                w->slot, head, size);
        return;
    }
    for (;;) {
        /* §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32
         * bytes in total; this implies that loops in the descriptor chain are
         * forbidden!" A chain longer than the table revisits a descriptor. */
        if (count >= size) {
            vqd_w_anomaly(w, VQD_A_LOOP, (int32_t)head,
                    "chain from head %u is longer than the descriptor table "
                    "(size %u): loop", head, size);
            return;
        }
        if (!vqd_w_budget_ok(w))
            return;
        struct vqd_desc d;
        memcpy(&d, w->desc + 16 * (size_t)i, sizeof d);
        count++;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* §2.7.5.3.1: "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT
             * and VIRTQ_DESC_F_NEXT in flags." §2.7.5.3.2: the device handles
             * "zero or more normal chained descriptors followed by a single
             * descriptor with flags&VIRTQ_DESC_F_INDIRECT", so the indirect
             * descriptor ends the chain: its next is not followed. The
             * indirect descriptor itself is not listed (its WRITE flag is
             * ignored, §2.7.5.3.2); the table's descriptors are. */
            if (d.flags & VRING_DESC_F_NEXT)
                vqd_w_anomaly(w, VQD_A_INDIRECT_WITH_NEXT, (int32_t)head,
                        "desc[%u].flags = 0x%x sets both VRING_DESC_F_INDIRECT and "
                        "VRING_DESC_F_NEXT (head %u)", i, (unsigned)d.flags, head);
            walk_indirect(w, i, &d);
            return;
        }
        vqd_w_emit(w, &d, i, -1);
        if (!(d.flags & VRING_DESC_F_NEXT))
            return;
        /* §2.7.5: next indexes the descriptor table of Queue Size entries. */
        if (d.next >= size) {
            vqd_w_anomaly(w, VQD_A_NEXT_OUT_OF_RANGE, (int32_t)head, "desc[%u].next = %u >= size %u (head %u)",
                    i, (unsigned)d.next, size, head);
            return;
        }
        i = d.next;
    }
}

int vqd_snapshot(const struct vqd_region *regions, int nr_regions,
                 const struct vqd_region *valid, int nr_valid,
                 uint64_t desc, uint64_t avail, uint64_t used,
                 uint32_t size, int32_t last_avail_idx, uint32_t max_descs,
                 struct vqd_snap_out *out)
{
    /* §2.7: Queue Size is a power of 2, at most 32768. */
    if (size == 0 || size > VQD_MAX_QUEUE_SIZE || (size & (size - 1)))
        return VQD_SNAP_E_SIZE;
    if (last_avail_idx < -1 || last_avail_idx > 0xffff)
        return VQD_SNAP_E_ARG;
    if (out->desc_cap < max_descs || out->anomaly_cap < vqd_snapshot_anomaly_cap(size, max_descs)
        || out->want_cap < size)
        return VQD_SNAP_E_NOSPACE;
    struct vqd_walk w = {
        .regions = regions, .nr_regions = nr_regions, .valid = valid, .nr_valid = nr_valid,
        .size = size, .max_descs = max_descs, .budget = max_descs, .truncated = 0, .out = out,
    };
    /* §2.7: descriptor table 16 * size, driver area 6 + 2 * size (flags, idx,
     * ring, used_event), device area 6 + 8 * size (flags, idx, ring,
     * avail_event); each must lie inside one readable region. */
    const uint8_t *dt = vqd_w_readable(&w, desc, 16 * (uint64_t)size);
    if (!dt)
        return VQD_SNAP_E_DESC_AREA;
    const uint8_t *av = vqd_w_readable(&w, avail, 6 + 2 * (uint64_t)size);
    if (!av)
        return VQD_SNAP_E_AVAIL_AREA;
    const uint8_t *us = vqd_w_readable(&w, used, 6 + 8 * (uint64_t)size);
    if (!us)
        return VQD_SNAP_E_USED_AREA;

    /* Every field is read once into the output (the driver may be writing
     * concurrently); chains are walked from the copied avail ring. */
    memcpy(&out->avail_flags, av, 2);
    memcpy(&out->avail_idx, av + 2, 2);
    memcpy(out->avail_ring, av + 4, 2 * (size_t)size);
    memcpy(&out->used_event, av + 4 + 2 * (size_t)size, 2);
    memcpy(&out->used_flags, us, 2);
    memcpy(&out->used_idx, us + 2, 2);
    memcpy(out->used_ring, us + 4, 8 * (size_t)size);
    memcpy(&out->avail_event, us + 4 + 8 * (size_t)size, 2);
    out->n_chains = out->n_descs = out->n_anomalies = out->n_want = 0;
    w.desc = dt;
    int known = last_avail_idx >= 0;
    uint16_t start = known ? (uint16_t)last_avail_idx : out->used_idx;
    uint32_t pending = (uint16_t)(out->avail_idx - start), n = pending;
    /* §2.7.6 / §2.7.13.3: avail->idx counts heads the driver made available;
     * with `size` descriptors it cannot be more than size ahead of the
     * device's position. Walk only `size` heads. */
    if (pending > size) {
        vqd_w_anomaly(&w, VQD_A_AVAIL_IDX_JUMP, VQD_NO_HEAD,
                "avail->idx %u is %u ahead of %s %u, more than size %u: walked %u heads",
                (unsigned)out->avail_idx, pending, known ? "last_avail_idx" : "used->idx",
                (unsigned)start, size, size);
        n = size;
    }
    for (uint32_t k = 0; k < n; k++) {
        uint32_t slot = (uint16_t)(start + k) & (size - 1);
        uint32_t head = out->avail_ring[slot];
        w.slot = slot;
        w.head = head;
        w.k = k;
        out->chain_head[k] = head;
        out->chain_first[k] = out->n_descs;
        out->chain_ndescs[k] = 0;
        out->chain_out_bytes[k] = 0;
        out->chain_in_bytes[k] = 0;
        walk_chain(&w, head);
    }
    out->n_chains = n;
    return VQD_SNAP_OK;
}
