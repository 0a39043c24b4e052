/* Packed-ring snapshot decoder; see vqd_decode_packed.h. The walk below is
 * mirrored step by step by inspector/ring/reference_packed.py (whose module
 * docstring states the semantics): change both together (the differential
 * test tests/unit/test_packed_decoder_diff.py holds them equal). */
#include <stdio.h>
#include <string.h>

#include "vqd_decode_packed.h"
#include "vqd_decode_walk.h"
#include "vqd_guard.h"

/* A packed walk: the shared walk and the flags/ids copied once. */
struct pwalk {
    struct vqd_walk w;
    const uint16_t *flags;
    uint32_t size;
};

/* Counters (inspector/ring/packed.py): c = slot + size * (1 - wrap), mod 2 * size. */
static uint32_t counter(uint32_t size, uint32_t slot, uint32_t wrap)
{
    return slot + (wrap ? 0 : size);
}

static uint32_t cnorm(uint32_t size, int64_t c)
{
    int64_t m = 2 * (int64_t)size;
    c %= m;
    return (uint32_t)(c < 0 ? c + m : c);
}

static uint32_t cslot(uint32_t size, uint32_t c)
{
    return c % size;
}

static uint32_t cwrap(uint32_t size, uint32_t c)
{
    return c < size;
}

static uint32_t dist(uint32_t size, uint32_t from, uint32_t to)
{
    return cnorm(size, (int64_t)to - from);
}

static uint32_t bit_avail(uint16_t f)
{
    return (f & VIRTQ_DESC_F_AVAIL) != 0;
}

static uint32_t bit_used(uint16_t f)
{
    return (f & VIRTQ_DESC_F_USED) != 0;
}

/* §2.8.1: the descriptor at counter c is available for its wrap counter w
 * when AVAIL == w and USED != w, ... */
static int avail_at(const struct pwalk *p, uint32_t c)
{
    uint16_t f = p->flags[cslot(p->size, c)];
    uint32_t w = cwrap(p->size, c);
    return bit_avail(f) == w && bit_used(f) != w;
}

/* ... and used (§2.8.9) when AVAIL == USED == w. */
static int used_at(const struct pwalk *p, uint32_t c)
{
    uint16_t f = p->flags[cslot(p->size, c)];
    uint32_t w = cwrap(p->size, c);
    return bit_avail(f) == w && bit_used(f) == w;
}

/* The wrap counter of a bare slot, from the AVAIL bit of the slot before it
 * (reference_packed.py's docstring says why). */
static uint32_t derive(const struct pwalk *p, uint32_t slot)
{
    if (slot > 0)
        return bit_avail(p->flags[slot - 1]);
    return !bit_avail(p->flags[p->size - 1]);
}

uint32_t vqd_snapshot_packed_anomaly_cap(uint32_t size, uint32_t max_descs)
{
    /* zero_len / addr_out_of_range: one per listed descriptor; per chain at
     * most indirect_with_next, one that ends it and id_out_of_range;
     * used_not_available once per slot; avail_used_pattern and truncated once. */
    return max_descs + 4 * size + 2;
}

/* §2.8.7: the indirect table of desc[di] is an array of len / 16
 * descriptors used in order (no next; NEXT and id in it are reserved). */
static void walk_indirect(struct vqd_walk *w, uint32_t di, const struct vqd_desc *d)
{
    const uint8_t *table = vqd_w_indirect_table(w, di, d);
    if (!table)
        return;
    uint32_t n = d->len / 16;
    for (uint32_t j = 0; j < n; j++) {
        if (!vqd_w_budget_ok(w))
            return;
        struct vqd_desc e;
        memcpy(&e.addr, table + 16 * (size_t)j, 8);
        memcpy(&e.len, table + 16 * (size_t)j + 8, 4);
        memcpy(&e.next, table + 16 * (size_t)j + 12, 2);   /* id */
        memcpy(&e.flags, table + 16 * (size_t)j + 14, 2);
        if (e.flags & VRING_DESC_F_INDIRECT) {
            /* §2.8.7: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
             * within an indirect descriptor". Not followed, not listed. */
            vqd_w_anomaly(w, VQD_A_NESTED_INDIRECT, (int32_t)w->head,
                          "desc[%u]->indirect[%u].flags = 0x%x sets VRING_DESC_F_INDIRECT "
                          "(chain at slot %u)", di, j, (unsigned)e.flags, w->head);
            return;
        }
        vqd_w_emit(w, &e, di, j);
    }
}

int vqd_snapshot_packed(const struct vqd_region *regions, int nr_regions,
                        const struct vqd_region *valid, int nr_valid,
                        uint64_t desc, uint64_t driver_event, uint64_t device_event,
                        uint32_t size, int32_t next_used, int32_t used_wrap_counter,
                        int32_t last_avail_idx, int32_t last_avail_wrap_counter,
                        uint32_t max_descs, struct vqd_snap_out *out,
                        struct vqd_packed_out *pout)
{
    /* §2.8: Queue Size 1..32768, any integer. */
    if (size == 0 || size > VQD_MAX_QUEUE_SIZE)
        return VQD_SNAP_E_SIZE;
    int32_t nu = next_used, uw = used_wrap_counter, la = last_avail_idx, law = last_avail_wrap_counter;
    if (nu < -1 || nu >= (int32_t)size || la < -1 || la >= (int32_t)size || uw < -1 || uw > 1
        || law < -1 || law > 1 || (uw >= 0 && nu < 0) || (la >= 0 && nu < 0)
        || (law >= 0 && (la < 0 || uw < 0)) || (uw >= 0 && la >= 0 && law < 0))
        return VQD_SNAP_E_ARG;
    if (out->desc_cap < max_descs
        || out->anomaly_cap < vqd_snapshot_packed_anomaly_cap(size, max_descs)
        || out->want_cap < size)
        return VQD_SNAP_E_NOSPACE;
    struct pwalk p = {
        .w = { .regions = regions, .nr_regions = nr_regions, .valid = valid, .nr_valid = nr_valid,
               .size = size, .max_descs = max_descs, .budget = max_descs, .truncated = 0,
               .packed = 1, .out = out },
        .flags = pout->ring_flags, .size = size,
    };
    struct vqd_walk *w = &p.w;
    /* §2.8.10, §2.8.13: descriptor ring 16 * size, event suppression areas
     * 4 bytes each; each must lie inside one readable region. */
    const uint8_t *dt = vqd_w_readable(w, desc, 16 * (uint64_t)size);
    if (!dt)
        return VQD_SNAP_E_DESC_AREA;
    const uint8_t *drv = vqd_w_readable(w, driver_event, 4);
    if (!drv)
        return VQD_SNAP_E_AVAIL_AREA;
    const uint8_t *dev = vqd_w_readable(w, device_event, 4);
    if (!dev)
        return VQD_SNAP_E_USED_AREA;
    w->desc = dt;
    /* Every slot's flags and id are read once (the driver may be writing
     * concurrently); positions and chains are found from this copy. */
    for (uint32_t i = 0; i < size; i++) {
        memcpy(&pout->ring_id[i], dt + 16 * (size_t)i + 12, 2);
        memcpy(&pout->ring_flags[i], dt + 16 * (size_t)i + 14, 2);
    }
    memcpy(&pout->driver_event_desc, drv, 2);
    memcpy(&pout->driver_event_flags, drv + 2, 2);
    memcpy(&pout->device_event_desc, dev, 2);
    memcpy(&pout->device_event_flags, dev + 2, 2);
    out->n_chains = out->n_descs = out->n_anomalies = out->n_want = 0;

    /* --- the device's positions, as counters */
    uint32_t cu;
    int64_t ca = -1;
    if (uw >= 0) {
        pout->positions = VQD_POS_DEVICE;
        cu = counter(size, (uint32_t)nu, (uint32_t)uw);
        if (la >= 0)
            ca = counter(size, (uint32_t)la, (uint32_t)law);
    } else if (nu >= 0) {
        pout->positions = VQD_POS_DERIVED;
        uint32_t dw = derive(&p, (uint32_t)nu);
        /* Every descriptor outstanding: the slot before next_used is the
         * driver's, of the next round; then the walk from next_used with
         * the other counter covers the whole ring. */
        uint32_t cf = counter(size, (uint32_t)nu, !dw), m;
        for (m = 0; m < size && avail_at(&p, cnorm(size, (int64_t)cf + m)); m++)
            ;
        int full = m == size;
        if (full)
            dw = !dw;
        cu = counter(size, (uint32_t)nu, dw);
        if (la >= 0) {
            uint32_t lw = derive(&p, (uint32_t)la);
            if (full && la == nu)
                lw = dw;  /* nothing taken: see the reference's docstring */
            ca = counter(size, (uint32_t)la, lw);
        }
    } else {
        pout->positions = VQD_POS_FLAGS;
        /* The driver's position: the step in the AVAIL bits. */
        uint32_t a0 = bit_avail(p.flags[0]), k;
        for (k = 1; k < size && bit_avail(p.flags[k]) == a0; k++)
            ;
        uint32_t na0 = k == size ? counter(size, 0, !a0) : counter(size, k, a0);
        /* next_used: after the last used descriptor before it (none: every
         * slot in flight). */
        cu = cnorm(size, (int64_t)na0 - size);
        for (uint32_t j = 1; j <= size; j++) {
            uint32_t c = cnorm(size, (int64_t)na0 - j);
            if (used_at(&p, c)) {
                cu = cnorm(size, (int64_t)c + 1);
                break;
            }
        }
    }
    if (ca >= 0 && dist(size, cu, (uint32_t)ca) > size)
        ca = -1;  /* more than size ahead of next_used: not a position of this ring */

    /* --- used descriptors where the driver's available ones are outstanding:
     * [next_used, last_avail), and next_used itself */
    if (pout->positions != VQD_POS_FLAGS) {
        uint32_t n = ca >= 0 ? dist(size, cu, (uint32_t)ca) : 0;
        if (n == 0)
            n = 1;
        for (uint32_t m = 0; m < n; m++) {
            uint32_t c = cnorm(size, (int64_t)cu + m), s = cslot(size, c);
            if (used_at(&p, c))
                /* §2.8.9: the device writes a used descriptor at next_used
                 * only; §2.8.6: for a buffer the driver made available. */
                vqd_w_anomaly(w, VQD_A_USED_NOT_AVAILABLE, VQD_NO_HEAD,
                              "desc[%u] is a used descriptor (id %u, flags 0x%x) at or after "
                              "next_used (slot %u, wrap %u) where the driver's buffer is "
                              "outstanding", s, (unsigned)pout->ring_id[s], (unsigned)p.flags[s],
                              cslot(size, cu), cwrap(size, cu));
        }
    }

    /* --- the walk: chains available from last_avail (else next_used) */
    uint32_t start = ca >= 0 ? (uint32_t)ca : cu;
    uint32_t limit = size - dist(size, cu, start), walked = 0, k = 0;
    int stop = 0;
    while (!stop && walked < limit && avail_at(&p, cnorm(size, (int64_t)start + walked))) {
        uint32_t c = cnorm(size, (int64_t)start + walked), slot0 = cslot(size, c);
        uint16_t last_id = 0;
        uint32_t clen = 0;  /* slots of this chain */
        w->slot = w->head = slot0;
        w->k = k;
        out->chain_first[k] = out->n_descs;
        out->chain_ndescs[k] = 0;
        out->chain_out_bytes[k] = 0;
        out->chain_in_bytes[k] = 0;
        pout->chain_slot[k] = slot0;
        for (;;) {
            uint32_t s = cslot(size, c);
            struct vqd_desc d;
            memcpy(&d.addr, dt + 16 * (size_t)s, 8);
            memcpy(&d.len, dt + 16 * (size_t)s + 8, 4);
            d.flags = p.flags[s];
            d.next = pout->ring_id[s];
            walked++;
            clen++;
            last_id = d.next;
            if (d.flags & VRING_DESC_F_INDIRECT) {
                /* §2.8.7: "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT
                 * and VIRTQ_DESC_F_NEXT in flags"; the indirect descriptor
                 * is the chain's only one and is not listed, its table is. */
                if (d.flags & VRING_DESC_F_NEXT)
                    vqd_w_anomaly(w, VQD_A_INDIRECT_WITH_NEXT, (int32_t)slot0,
                                  "desc[%u].flags = 0x%x sets both VRING_DESC_F_INDIRECT and "
                                  "VRING_DESC_F_NEXT (chain at slot %u)", s, (unsigned)d.flags, slot0);
                walk_indirect(w, s, &d);
                break;
            }
            if (vqd_w_budget_ok(w))
                vqd_w_emit(w, &d, s, -1);
            if (!(d.flags & VRING_DESC_F_NEXT))
                break;
            if (walked >= limit) {
                /* §2.8.6: a chain's descriptors are slots of the ring made
                 * available together: never more than the ring holds. */
                vqd_w_anomaly(w, VQD_A_CHAIN_TOO_LONG, (int32_t)slot0,
                              "chain at slot %u has VRING_DESC_F_NEXT on %u descriptors: longer "
                              "than the %u slots the ring holds from next_used (size %u)",
                              slot0, clen, limit, size);
                break;
            }
            c = cnorm(size, (int64_t)c + 1);
            if (!avail_at(&p, c)) {
                /* §2.8.6: the driver makes every descriptor of a chain
                 * available (AVAIL = its wrap counter, USED the inverse). */
                uint32_t ns = cslot(size, c);
                vqd_w_anomaly(w, VQD_A_AVAIL_USED_PATTERN, (int32_t)slot0,
                              "desc[%u] sets VRING_DESC_F_NEXT but desc[%u] (flags 0x%x) is not "
                              "available for wrap %u (chain at slot %u)", s, ns,
                              (unsigned)p.flags[ns], cwrap(size, c), slot0);
                stop = 1;
                break;
            }
        }
        out->chain_head[k] = last_id;
        if (last_id >= size)
            /* §2.8.6: the buffer id (in the chain's last descriptor) names
             * one of the ring's size buffers. */
            vqd_w_anomaly(w, VQD_A_ID_OUT_OF_RANGE, (int32_t)slot0,
                          "buffer id %u of the chain at slot %u is >= size %u",
                          (unsigned)last_id, slot0, size);
        k++;
    }
    out->n_chains = k;
    uint32_t cna = cnorm(size, (int64_t)start + walked);

    /* --- §2.8.1: every slot the driver wrote before next_avail carries the
     * AVAIL bit of the round it was written in (one step in the ring),
     * except a chain being written after next_avail (its head, at
     * next_avail, is made available last: §2.8.21.1). */
    uint32_t r = 0;
    while (r < size - 1 && avail_at(&p, cnorm(size, (int64_t)cna + 1 + r)))
        r++;
    for (uint32_t j = 1; j + r < size; j++) {
        uint32_t c = cnorm(size, (int64_t)cna - j), s = cslot(size, c);
        if (bit_avail(p.flags[s]) != cwrap(size, c)) {
            vqd_w_anomaly(w, VQD_A_AVAIL_USED_PATTERN, VQD_NO_HEAD,
                          "desc[%u].flags = 0x%x: VIRTQ_DESC_F_AVAIL is %u, not the wrap %u of the "
                          "round it was written in before next_avail (slot %u, wrap %u)",
                          s, (unsigned)p.flags[s], bit_avail(p.flags[s]), cwrap(size, c),
                          cslot(size, cna), cwrap(size, cna));
            break;
        }
    }
    pout->next_avail = (uint16_t)cslot(size, cna);
    pout->avail_wrap_counter = (uint8_t)cwrap(size, cna);
    pout->next_used = (uint16_t)cslot(size, cu);
    pout->used_wrap_counter = (uint8_t)cwrap(size, cu);
    pout->last_avail_idx = ca >= 0 ? (int32_t)cslot(size, (uint32_t)ca) : -1;
    pout->last_avail_wrap_counter = ca >= 0 ? (int32_t)cwrap(size, (uint32_t)ca) : -1;
    return VQD_SNAP_OK;
}

int vqd_snapshot_packed_guarded(const struct vqd_region *regions, int nr_regions,
                                const struct vqd_region *valid, int nr_valid,
                                uint64_t desc, uint64_t driver_event, uint64_t device_event,
                                uint32_t size, int32_t next_used, int32_t used_wrap_counter,
                                int32_t last_avail_idx, int32_t last_avail_wrap_counter,
                                uint32_t max_descs, struct vqd_snap_out *out,
                                struct vqd_packed_out *pout)
{
    int rc;
    vqd_guard_install();  /* as vqd_snapshot_guarded: ours on top first */
    VQD_GUARDED(rc, vqd_snapshot_packed(regions, nr_regions, valid, nr_valid, desc, driver_event,
                                        device_event, size, next_used, used_wrap_counter,
                                        last_avail_idx, last_avail_wrap_counter, max_descs, out,
                                        pout),
                rc = VQD_SNAP_E_FAULT);
    return rc;
}
