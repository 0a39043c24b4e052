/* The parts both snapshot decoders share; see vqd_decode_walk.h. Mirrored
 * by inspector/ring/reference.py's _Mem and _Walk: change both together. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vqd_decode_walk.h"

void vqd_w_anomaly(struct vqd_walk *w, uint32_t kind, int32_t head, const char *fmt, ...)
{
    struct vqd_snap_out *o = w->out;
    /* Cannot overflow: the caller sized anomaly_cap by the decoder's
     * *_anomaly_cap (checked on entry); kept as a guard. */
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

/* Overflow-checked: never computes gpa + len. Unlike vqd_gpa_to_host (first
 * region holding gpa), a region that holds gpa but not the whole range does
 * not end the search: the decoder's tables may overlap (a local copy of a
 * ring area inside a copy of an indirect table, readable copies inside
 * validate-only RAM). */
int vqd_find_region(const struct vqd_region *r, int nr, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < nr; i++) {
        if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size && len <= r[i].size - (gpa - r[i].gpa))
            return i;
    }
    return -1;
}

const uint8_t *vqd_w_readable(const struct vqd_walk *w, uint64_t gpa, uint64_t len)
{
    int i = vqd_find_region(w->regions, w->nr_regions, gpa, len);
    return i < 0 ? NULL : w->regions[i].host + (gpa - w->regions[i].gpa);
}

/* Is the range valid guest memory (readable or validate-only)? An OR, so
 * the order does not matter: validate-only regions first, they are few (the
 * RAM ranges) and hold most buffers, while the readable ones of a remote
 * read are many small copies (ring areas, indirect tables). */
static int is_valid(const struct vqd_walk *w, uint64_t gpa, uint64_t len)
{
    return vqd_find_region(w->valid, w->nr_valid, gpa, len) >= 0
        || vqd_find_region(w->regions, w->nr_regions, gpa, len) >= 0;
}

/* The snapshot lists at most max_descs descriptors in total, so a hostile
 * ring (every slot naming a chain of `size` descriptors, each ending in a
 * 32768-entry indirect table) cannot make the output grow as
 * size * (size + 32768). */
int vqd_w_budget_ok(struct vqd_walk *w)
{
    if (w->budget)
        return 1;
    if (!w->truncated) {
        w->truncated = 1;
        if (w->packed)
            vqd_w_anomaly(w, VQD_A_TRUNCATED, VQD_NO_HEAD,
                          "snapshot lists at most %u descriptors: chain at slot %u and later "
                          "chains are cut short", w->max_descs, w->slot);
        else
            vqd_w_anomaly(w, VQD_A_TRUNCATED, VQD_NO_HEAD,
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

void vqd_w_emit(struct vqd_walk *w, const struct vqd_desc *d, uint32_t i, int64_t j)
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
    /* §2.7.5, §2.8.13: VRING_DESC_F_WRITE marks a device-writable buffer,
     * otherwise it is device-readable. */
    if (d->flags & VRING_DESC_F_WRITE)
        o->chain_in_bytes[w->k] += d->len;
    else
        o->chain_out_bytes[w->k] += d->len;
    if (d->len == 0) {
        /* §2.7.5: a descriptor describes a buffer of len bytes. Zero is not
         * forbidden to the driver, but the descriptor carries no buffer and
         * devices differ in how they treat it: flagged, not fatal. */
        vqd_w_anomaly(w, VQD_A_ZERO_LEN, (int32_t)w->head, "%s.len = 0 (%s %u)",
                      loc_name(loc, sizeof loc, i, j), vqd_w_chain_word(w), w->head);
    } else if (!is_valid(w, d->addr, d->len)) {
        /* §2.7.5, §2.8.13: addr is a guest-physical address; the whole
         * buffer must be guest memory the device can map (one region,
         * readable or validate-only; addr + len without 64-bit overflow:
         * vqd_find_region never adds). */
        vqd_w_anomaly(w, VQD_A_ADDR_OUT_OF_RANGE, (int32_t)w->head,
                      "%s.addr 0x%llx len %u is not inside one memory region (%s %u)",
                      loc_name(loc, sizeof loc, i, j), (unsigned long long)d->addr, d->len,
                      vqd_w_chain_word(w), w->head);
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

const uint8_t *vqd_w_indirect_table(struct vqd_walk *w, uint32_t di, const struct vqd_desc *d)
{
    const char *cw = vqd_w_chain_word(w);
    /* §2.7.5.3 / §2.8.7: the table is an array of descriptors of len / 16
     * entries, so len is a non-zero multiple of 16; §2.7.5.3.1 (no chain
     * longer than the Queue Size, at most 32768 by §2.7) bounds it to
     * 16 * 32768. */
    if (d->len == 0 || d->len % 16 || d->len > VQD_SNAP_MAX_INDIRECT_LEN) {
        vqd_w_anomaly(w, VQD_A_INDIRECT_LEN, (int32_t)w->head,
                      "desc[%u].len = %u for an indirect table: not a non-zero multiple "
                      "of 16 up to %u (%s %u)", di, d->len, VQD_SNAP_MAX_INDIRECT_LEN, cw, w->head);
        return NULL;
    }
    const uint8_t *table = vqd_w_readable(w, d->addr, d->len);
    if (!table && vqd_find_region(w->valid, w->nr_valid, d->addr, d->len) >= 0) {
        /* Guest memory, but not read here: ask the caller for it. At most
         * one per chain, so want_cap >= size always has room. */
        want_table(w->out, d->addr, d->len);
        vqd_w_anomaly(w, VQD_A_INDIRECT_NOT_READ, (int32_t)w->head,
                      "desc[%u] indirect table 0x%llx len %u is guest memory that was not "
                      "read (%s %u)", di, (unsigned long long)d->addr, d->len, cw, w->head);
        return NULL;
    }
    if (!table) {
        /* §2.7.5.3 / §2.8.7: addr is the guest-physical address of the table. */
        vqd_w_anomaly(w, VQD_A_INDIRECT_OUT_OF_RANGE, (int32_t)w->head,
                      "desc[%u] indirect table 0x%llx len %u is not inside one memory "
                      "region (%s %u)", di, (unsigned long long)d->addr, d->len, cw, w->head);
        return NULL;
    }
    return table;
}
