/* Split-ring snapshot decoder; see vqd_decode.h. The walk below is mirrored
 * step by step by inspector/ring/reference.py: change both together (the
 * differential test tests/unit/test_decoder_diff.py holds them equal). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vqd_decode.h"

struct walk {
    const struct vqd_region *regions;
    int nr_regions;
    const struct vqd_region *valid;
    int nr_valid;
    const uint8_t *desc;        /* host view of the whole descriptor table */
    uint32_t size;
    uint32_t max_descs;
    uint32_t budget;            /* descriptors that may still be listed */
    int truncated;
    struct vqd_snap_out *out;
    /* current chain */
    uint32_t slot;
    uint32_t head;
    uint32_t k;                 /* chain index */
};

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
/* Record an anomaly of `kind` found in the walk of the chain of `head`
 * (VQD_NO_HEAD: not inside a chain's walk). */
static void anomaly(struct walk *w, uint32_t kind, int32_t head, const char *fmt, ...)
{
    struct vqd_snap_out *o = w->out;
    /* Cannot overflow: the caller sized anomaly_cap by vqd_snapshot_anomaly_cap
     * (checked on entry); kept as a guard. */
    if (o->n_anomalies >= o->anomaly_cap)
        return;
    struct vqd_anomaly *a = &o->anomalies[o->n_anomalies++];
    a->kind = kind;
    a->head = head;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->detail, sizeof a->detail, fmt, ap);
    va_end(ap);
}

/* The first region of r[0..nr) holding all of [gpa, gpa + len), len >= 1:
 * its index, or -1. Overflow-checked: never computes gpa + len. Unlike
 * vqd_gpa_to_host (first region holding gpa), a region that holds gpa but not
 * the whole range does not end the search: the decoder's tables may overlap
 * (a local copy of a ring area inside a copy of an indirect table, readable
 * copies inside validate-only RAM). */
static int find_region(const struct vqd_region *r, int nr, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < nr; i++) {
        if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size && len <= r[i].size - (gpa - r[i].gpa))
            return i;
    }
    return -1;
}

/* Host view of a readable range, or NULL. */
static const uint8_t *readable(const struct walk *w, uint64_t gpa, uint64_t len)
{
    int i = find_region(w->regions, w->nr_regions, gpa, len);
    return i < 0 ? NULL : w->regions[i].host + (gpa - w->regions[i].gpa);
}

/* Is the range valid guest memory (readable or validate-only)? An OR, so
 * the order does not matter: validate-only regions first, they are few (the
 * RAM ranges) and hold most buffers, while the readable ones of a remote
 * read are many small copies (ring areas, indirect tables). */
static int is_valid(const struct walk *w, uint64_t gpa, uint64_t len)
{
    return find_region(w->valid, w->nr_valid, gpa, len) >= 0
        || find_region(w->regions, w->nr_regions, gpa, len) >= 0;
}

uint32_t vqd_snapshot_anomaly_cap(uint32_t size, uint32_t max_descs)
{
    /* At most one of zero_len / addr_out_of_range per listed descriptor, at
     * most two per chain otherwise (indirect_with_next + one that ends the
     * walk), plus avail_idx_jump and truncated once per snapshot. */
    return max_descs + 2 * size + 2;
}

/* May one more descriptor be read and listed? The snapshot lists at most
 * max_descs descriptors in total, so a hostile ring (every slot naming a
 * chain of `size` descriptors, each ending in a 32768-entry indirect table)
 * cannot make the output grow as size * (size + 32768). */
static int budget_ok(struct walk *w)
{
    if (w->budget)
        return 1;
    if (!w->truncated) {
        w->truncated = 1;
        anomaly(w, VQD_A_TRUNCATED, VQD_NO_HEAD,
                "snapshot lists at most %u descriptors: chain of avail->ring[%u] "
                "(head %u) and later chains are cut short",
                w->max_descs, w->slot, w->head);
    }
    return 0;
}

/* Name a descriptor for details: "desc[i]", or "desc[i]->indirect[j]" for
 * entry j (>= 0) of the indirect table of desc[i]. Only called on anomalies. */
static const char *loc_name(char *buf, size_t n, uint32_t i, int64_t j)
{
    if (j < 0)
        snprintf(buf, n, "desc[%u]", i);
    else
        snprintf(buf, n, "desc[%u]->indirect[%u]", i, (unsigned)j);
    return buf;
}

/* List one (non-indirect) descriptor in the current chain and check its
 * buffer; (i, j) name it as in loc_name. */
static void emit(struct walk *w, const struct vqd_desc *d, uint32_t i, int64_t j)
{
    char loc[48];
    struct vqd_snap_out *o = w->out;
    uint32_t n = o->n_descs++;
    w->budget--;
    o->desc_addr[n] = d->addr;
    o->desc_len[n] = d->len;
    o->desc_flags[n] = d->flags;
    o->desc_next[n] = d->next;
    o->chain_ndescs[w->k]++;
    /* §2.7.5: VRING_DESC_F_WRITE marks a device-writable buffer, otherwise it
     * is device-readable. */
    if (d->flags & VRING_DESC_F_WRITE)
        o->chain_in_bytes[w->k] += d->len;
    else
        o->chain_out_bytes[w->k] += d->len;
    if (d->len == 0) {
        /* §2.7.5: a descriptor describes a buffer of len bytes. Zero is not
         * forbidden to the driver, but the descriptor carries no buffer and
         * devices differ in how they treat it: flagged, not fatal. */
        anomaly(w, VQD_A_ZERO_LEN, (int32_t)w->head, "%s.len = 0 (head %u)",
                loc_name(loc, sizeof loc, i, j), w->head);
    } else if (!is_valid(w, d->addr, d->len)) {
        /* §2.7.5: addr is a guest-physical address; the whole buffer must be
         * guest memory the device can map (one region, readable or
         * validate-only; addr + len without 64-bit overflow: find_region
         * never adds). */
        anomaly(w, VQD_A_ADDR_OUT_OF_RANGE, (int32_t)w->head,
                "%s.addr 0x%llx len %u is not inside one memory region (head %u)",
                loc_name(loc, sizeof loc, i, j), (unsigned long long)d->addr, d->len, w->head);
    }
}

/* Record an unread indirect table in want_addr/want_len, kept sorted by
 * (addr, len) without duplicates (binary search, then shift: at most
 * want_cap >= size entries, one per walked chain, so never full). */
static void want_table(struct vqd_snap_out *o, uint64_t addr, uint32_t len)
{
    uint32_t lo = 0, hi = o->n_want;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (o->want_addr[mid] < addr || (o->want_addr[mid] == addr && o->want_len[mid] < len))
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < o->n_want && o->want_addr[lo] == addr && o->want_len[lo] == len)
        return;
    if (o->n_want >= o->want_cap)
        return;
    memmove(&o->want_addr[lo + 1], &o->want_addr[lo], (o->n_want - lo) * sizeof o->want_addr[0]);
    memmove(&o->want_len[lo + 1], &o->want_len[lo], (o->n_want - lo) * sizeof o->want_len[0]);
    o->want_addr[lo] = addr;
    o->want_len[lo] = len;
    o->n_want++;
}

/* Walk the indirect table described by descriptor `di` (already read into
 * *d). §2.7.5.3: the table holds len / 16 descriptors, the chain starts at
 * entry 0 and follows next inside the table. */
static void walk_indirect(struct walk *w, uint32_t di, const struct vqd_desc *d)
{
    /* §2.7.5.3: struct indirect_descriptor_table { struct virtq_desc desc[len / 16]; }
     * so len is a non-zero multiple of 16; §2.7.5.3.1 (no chain longer than
     * the Queue Size, at most 32768 by §2.7) bounds it to 16 * 32768. */
    if (d->len == 0 || d->len % 16 || d->len > VQD_SNAP_MAX_INDIRECT_LEN) {
        anomaly(w, VQD_A_INDIRECT_LEN, (int32_t)w->head,
                "desc[%u].len = %u for an indirect table: not a non-zero multiple "
                "of 16 up to %u (head %u)", di, d->len, VQD_SNAP_MAX_INDIRECT_LEN, w->head);
        return;
    }
    const uint8_t *table = readable(w, d->addr, d->len);
    if (!table && find_region(w->valid, w->nr_valid, d->addr, d->len) >= 0) {
        /* Guest memory, but not read here: ask the caller for it. At most
         * one per chain, so want_cap >= size always has room. */
        want_table(w->out, d->addr, d->len);
        anomaly(w, VQD_A_INDIRECT_NOT_READ, (int32_t)w->head,
                "desc[%u] indirect table 0x%llx len %u is guest memory that was not "
                "read (head %u)", di, (unsigned long long)d->addr, d->len, w->head);
        return;
    }
    if (!table) {
        /* §2.7.5.3: addr is the guest-physical address of the table. */
        anomaly(w, VQD_A_INDIRECT_OUT_OF_RANGE, (int32_t)w->head,
                "desc[%u] indirect table 0x%llx len %u is not inside one memory "
                "region (head %u)", di, (unsigned long long)d->addr, d->len, w->head);
        return;
    }
    uint32_t n = d->len / 16, j = 0, count = 0;
    for (;;) {
        /* §2.7.5.2: no loops ("this implies that loops in the descriptor
         * chain are forbidden"); a walk longer than the table revisits. */
        if (count >= n) {
            anomaly(w, VQD_A_LOOP, (int32_t)w->head,
                    "desc[%u]->indirect chain is longer than its table of %u "
                    "entries: loop (head %u)", di, n, w->head);
            return;
        }
        if (!budget_ok(w))
            return;
        struct vqd_desc e;
        memcpy(&e, table + 16 * (size_t)j, sizeof e);
        count++;
        if (e.flags & VRING_DESC_F_INDIRECT) {
            /* §2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT
             * flag within an indirect descriptor (ie. only one table per
             * descriptor)." Not followed, not listed. */
            anomaly(w, VQD_A_NESTED_INDIRECT, (int32_t)w->head,
                    "desc[%u]->indirect[%u].flags = 0x%x sets VRING_DESC_F_INDIRECT "
                    "(head %u)", di, j, (unsigned)e.flags, w->head);
            return;
        }
        emit(w, &e, di, j);
        if (!(e.flags & VRING_DESC_F_NEXT))
            return;
        /* §2.7.5.3: next indexes the indirect table. */
        if (e.next >= n) {
            anomaly(w, VQD_A_NEXT_OUT_OF_RANGE, (int32_t)w->head,
                    "desc[%u]->indirect[%u].next = %u >= table entries %u (head %u)",
                    di, j, (unsigned)e.next, n, w->head);
            return;
        }
        j = e.next;
    }
}

/* Walk the chain of avail->ring[slot]. */
static void walk_chain(struct walk *w, uint32_t head)
{
    uint32_t size = w->size, i = head, count = 0;

    /* §2.7.6: avail->ring[] holds heads of descriptor chains, i.e. indices
     * into the descriptor table of Queue Size entries. */
    if (head >= size) {
        anomaly(w, VQD_A_HEAD_OUT_OF_RANGE, VQD_NO_HEAD, "avail->ring[%u] = head %u >= size %u",
                w->slot, head, size);
        return;
    }
    for (;;) {
        /* §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32
         * bytes in total; this implies that loops in the descriptor chain are
         * forbidden!" A chain longer than the table revisits a descriptor. */
        if (count >= size) {
            anomaly(w, VQD_A_LOOP, (int32_t)head,
                    "chain from head %u is longer than the descriptor table "
                    "(size %u): loop", head, size);
            return;
        }
        if (!budget_ok(w))
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
                anomaly(w, VQD_A_INDIRECT_WITH_NEXT, (int32_t)head,
                        "desc[%u].flags = 0x%x sets both VRING_DESC_F_INDIRECT and "
                        "VRING_DESC_F_NEXT (head %u)", i, (unsigned)d.flags, head);
            walk_indirect(w, i, &d);
            return;
        }
        emit(w, &d, i, -1);
        if (!(d.flags & VRING_DESC_F_NEXT))
            return;
        /* §2.7.5: next indexes the descriptor table of Queue Size entries. */
        if (d.next >= size) {
            anomaly(w, VQD_A_NEXT_OUT_OF_RANGE, (int32_t)head, "desc[%u].next = %u >= size %u (head %u)",
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
    struct walk w = {
        .regions = regions, .nr_regions = nr_regions, .valid = valid, .nr_valid = nr_valid,
        .size = size, .max_descs = max_descs, .budget = max_descs, .truncated = 0, .out = out,
    };
    /* §2.7: descriptor table 16 * size, driver area 6 + 2 * size (flags, idx,
     * ring, used_event), device area 6 + 8 * size (flags, idx, ring,
     * avail_event); each must lie inside one readable region. */
    const uint8_t *dt = readable(&w, desc, 16 * (uint64_t)size);
    if (!dt)
        return VQD_SNAP_E_DESC_AREA;
    const uint8_t *av = readable(&w, avail, 6 + 2 * (uint64_t)size);
    if (!av)
        return VQD_SNAP_E_AVAIL_AREA;
    const uint8_t *us = readable(&w, used, 6 + 8 * (uint64_t)size);
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
        anomaly(&w, VQD_A_AVAIL_IDX_JUMP, VQD_NO_HEAD,
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
