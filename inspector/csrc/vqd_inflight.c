/* Inflight I/O tracking for split virtqueues (vhost-user spec "Inflight I/O
 * tracking"); see vqd_inflight.h.
 *
 * Order of the writes to the shared area (the back-end can die between any
 * two of them; the next one reads the area, so program order is what counts;
 * atomics with release keep the compiler from reordering):
 *   take a head:   desc[i].counter = counter++; desc[i].inflight = 1
 *   publish a batch of used heads b1..bn (spec steps 1-7):
 *                  desc[bk].next = last_batch_head; last_batch_head = bk (each)
 *                  used->idx += n                       (vqd_vq_impl.h vqd_flush)
 *                  desc[bk].inflight = 0 (each); used_idx = used->idx
 * so at any point either region.used_idx == used->idx and the inflight flags
 * are exact, or the last batch (used->idx - used_idx heads from
 * last_batch_head) is published but still flagged.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vqd_inflight.h"

_Static_assert(sizeof(struct vqd_inflight_desc) == 16, "DescStateSplit is 16 bytes");
_Static_assert(sizeof(struct vqd_inflight_region) == 16, "QueueRegionSplit's header is 16 bytes");

/* libvhost-user's vu_inflight_queue_size: ALIGN_UP(16 * queue_size + 2, 64),
 * which equals ALIGN_UP(16 + 16 * queue_size, 64) (header plus states). */
uint64_t vqd_inflight_queue_size(uint32_t queue_size)
{
    uint64_t n = (uint64_t)sizeof(struct vqd_inflight_desc) * queue_size + sizeof(uint16_t);
    return (n + VQD_INFLIGHT_ALIGN - 1) & ~(uint64_t)(VQD_INFLIGHT_ALIGN - 1);
}

__attribute__((format(printf, 2, 3))) static int inflight_broken(struct vqd_vq *vq, const char *fmt, ...)
{
    char reason[sizeof(vq->reason)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    vqd_vq_set_broken(vq, reason);
    return VQD_E_BROKEN;
}

static int by_counter(const void *a, const void *b)
{
    const struct vqd_inflight_slot *x = a, *y = b;
    if (x->counter != y->counter)
        return x->counter < y->counter ? -1 : 1;
    return x->head < y->head ? -1 : x->head > y->head;
}

/* Start tracking vq (after vqd_vq_init, before it is serviced) in the area
 * of one queue. A new area (version 0) is initialised and nothing is
 * resubmitted. A used one is recovered (spec "When reconnecting"): an
 * unfinished last batch is cleared, then every head still in flight is
 * queued for pop, oldest first, and last_avail_idx becomes
 * used->idx + that count (each in-flight head was taken from the avail ring
 * and not returned: the value SET_VRING_BASE gave is replaced). Returns the
 * number of heads to resubmit, or VQD_E_BROKEN (reason in vq->reason) when
 * the area is inconsistent, VQD_E_INVAL for a bad argument. */
int vqd_inflight_attach(struct vqd_vq *vq, struct vqd_inflight *inf, void *area, uint64_t area_size,
                        struct vqd_inflight_slot *resubmit, uint16_t *batch, uint32_t *pop_log)
{
    if (!vq || !inf || !area || !resubmit || !batch || !pop_log)
        return VQD_E_INVAL;
    memset(inf, 0, sizeof(*inf));
    if (vq->broken)
        return VQD_E_BROKEN;
    uint32_t num = vq->num;
    if (area_size < sizeof(struct vqd_inflight_region) + (uint64_t)num * sizeof(struct vqd_inflight_desc))
        return inflight_broken(vq, "inflight area of %llu bytes is too small for a ring of %u (needs %llu; "
                               "GET_INFLIGHT_FD's queue_size must be at least the ring size)",
                               (unsigned long long)area_size, num,
                               (unsigned long long)(sizeof(struct vqd_inflight_region) + 16ull * num));
    struct vqd_inflight_region *r = area;
    struct vqd_inflight_desc *desc = (struct vqd_inflight_desc *)(r + 1);
    uint64_t cap = (area_size - sizeof(*r)) / sizeof(*desc);
    inf->region = r;
    inf->desc = desc;
    inf->capacity = cap > 65536 ? 65536 : (uint32_t)cap;
    inf->mask = num - 1;
    inf->resubmit = resubmit;
    inf->batch = batch;
    inf->pop_log = pop_log;
    uint16_t used = vq->used_idx;
    uint16_t version = __atomic_load_n(&r->version, __ATOMIC_ACQUIRE);

    if (version == 0) {
        /* A new area: nothing was ever in flight in it. */
        memset(desc, 0, (size_t)num * sizeof(*desc));
        r->features = 0;
        r->desc_num = (uint16_t)num;   /* 32768 at most: fits */
        r->last_batch_head = 0;
        r->used_idx = used;
        __atomic_store_n(&r->version, VQD_INFLIGHT_VERSION, __ATOMIC_RELEASE);
        vq->inflight = inf;
        return 0;
    }
    if (version != VQD_INFLIGHT_VERSION)
        return inflight_broken(vq, "inflight area: version %u is not %u (the only one defined by the "
                               "vhost-user spec)", version, VQD_INFLIGHT_VERSION);
    uint32_t desc_num = r->desc_num;
    if (desc_num < num || desc_num > inf->capacity)
        return inflight_broken(vq, "inflight area: desc_num %u does not fit a ring of %u in an area of %u "
                               "descriptor states", desc_num, num, inf->capacity);

    /* Spec "When reconnecting", step 1: a batch published (used->idx moved)
     * but not cleared: its used->idx - used_idx heads, listed from
     * last_batch_head, are not in flight any more. */
    uint16_t recorded = r->used_idx;
    if (recorded != used) {
        uint16_t n = (uint16_t)(used - recorded);
        if (n > num)
            return inflight_broken(vq, "inflight area: used_idx %u is %u behind used->idx %u, more than the "
                                   "queue size %u", recorded, n, used, num);
        uint32_t h = r->last_batch_head;
        for (uint16_t k = 0; k < n; k++) {   /* bounded by n <= num */
            if (h >= num)
                return inflight_broken(vq, "inflight area: the last batch lists head %u >= queue size %u "
                                       "(entry %u of %u from last_batch_head %u)", h, num, k, n,
                                       r->last_batch_head);
            __atomic_store_n(&desc[h].inflight, 0, __ATOMIC_RELAXED);
            h = desc[h].next;
        }
        inf->recovered_batch = n;
        __atomic_store_n(&r->used_idx, used, __ATOMIC_RELEASE);
    }

    /* Step 2: every head still in flight, in the order it was taken. */
    uint32_t count = 0;
    uint64_t top = 0;
    for (uint32_t i = 0; i < desc_num; i++) {
        uint8_t f = __atomic_load_n(&desc[i].inflight, __ATOMIC_RELAXED);
        if (!f)
            continue;
        if (f != 1 || i >= num)
            return inflight_broken(vq, "inflight area: descriptor %u has inflight %u (%s)", i, f,
                                   f != 1 ? "must be 0 or 1" : "a head beyond the queue size");
        uint64_t c = desc[i].counter;   /* read once: the front-end could change it */
        resubmit[count].counter = c;
        resubmit[count].head = i;
        resubmit[count].pad = 0;
        count++;
        if (c >= top)
            top = c + 1;
    }
    if (count > 1)
        qsort(resubmit, count, sizeof(*resubmit), by_counter);
    inf->resubmit_num = count;
    inf->counter = top;
    vq->last_avail_idx = vq->shadow_avail_idx = (uint16_t)(used + count);
    vq->inflight = inf;
    return (int)count;
}

/* Heads flagged in flight in vq's area now (0 without tracking). */
int vqd_inflight_count(struct vqd_vq *vq)
{
    struct vqd_inflight *inf = vq->inflight;
    int n = 0;
    if (!inf)
        return 0;
    for (uint32_t i = 0; i <= inf->mask; i++)
        n += __atomic_load_n(&inf->desc[i].inflight, __ATOMIC_RELAXED) != 0;
    return n;
}

/* ------------------------------------------------------------------------
 * Data path hooks.
 */

/* The next head to hand back before the avail ring, or -1. */
int vqd_inflight_next_resubmit(struct vqd_vq *vq)
{
    struct vqd_inflight *inf = vq->inflight;
    if (inf->resubmit_pos >= inf->resubmit_num)
        return -1;
    return (int)inf->resubmit[inf->resubmit_pos].head;
}

/* Heads still to hand back (they count as available). */
int vqd_inflight_pending(struct vqd_vq *vq)
{
    struct vqd_inflight *inf = vq->inflight;
    return (int)(inf->resubmit_num - inf->resubmit_pos);
}

/* A chain of head was taken: from the resubmit list (already flagged) or
 * from the avail ring (flag it, counter first). Logged for rewind. */
void vqd_inflight_popped(struct vqd_vq *vq, uint16_t head, int resubmitted)
{
    struct vqd_inflight *inf = vq->inflight;
    if (resubmitted) {
        inf->resubmit_pos++;
    } else {
        struct vqd_inflight_desc *d = &inf->desc[head & inf->mask];  /* head < num: checked by pop */
        d->counter = inf->counter++;
        __atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE);
    }
    inf->pop_log[inf->pop_log_w] = head | (resubmitted ? VQD_INFLIGHT_RESUBMITTED : 0);
    inf->pop_log_w = (inf->pop_log_w + 1) & inf->mask;
    if (inf->pop_log_n <= inf->mask)
        inf->pop_log_n++;
}

/* Give back the last n chains taken (vqd_vq_rewind): a resubmitted one goes
 * back to the front of the resubmit list, one from the avail ring back to
 * the ring (last_avail_idx--) and is no longer in flight. At most num chains
 * are taken and not returned, so the log of the last num pops has them. */
void vqd_inflight_rewind(struct vqd_vq *vq, int n)
{
    struct vqd_inflight *inf = vq->inflight;
    for (int k = 0; k < n; k++) {
        if (!inf->pop_log_n) {   /* not a chain we took: behave as without tracking */
            vq->last_avail_idx--;
            continue;
        }
        inf->pop_log_w = (inf->pop_log_w - 1) & inf->mask;
        inf->pop_log_n--;
        uint32_t e = inf->pop_log[inf->pop_log_w];
        if (e & VQD_INFLIGHT_RESUBMITTED) {
            if (inf->resubmit_pos)
                inf->resubmit_pos--;
        } else {
            __atomic_store_n(&inf->desc[e & inf->mask].inflight, 0, __ATOMIC_RELAXED);
            vq->last_avail_idx--;
        }
    }
}

/* Used element pos (of those not yet published) is head. */
void vqd_inflight_filled(struct vqd_vq *vq, uint16_t pos, uint32_t head)
{
    struct vqd_inflight *inf = vq->inflight;
    inf->batch[pos & inf->mask] = (uint16_t)head;
}

/* Before used->idx moves by n: link the batch (spec steps 1-3). */
void vqd_inflight_pre_publish(struct vqd_vq *vq, uint16_t n)
{
    struct vqd_inflight *inf = vq->inflight;
    uint16_t last = inf->region->last_batch_head;
    for (uint16_t k = 0; k < n && k <= inf->mask; k++) {
        uint16_t h = inf->batch[k];
        if (h > inf->mask)
            continue;
        inf->desc[h].next = last;
        last = h;
    }
    __atomic_store_n(&inf->region->last_batch_head, last, __ATOMIC_RELEASE);
}

/* After used->idx = new_idx: the batch is not in flight (steps 6-7). */
void vqd_inflight_post_publish(struct vqd_vq *vq, uint16_t n, uint16_t new_idx)
{
    struct vqd_inflight *inf = vq->inflight;
    /* used->idx (stored before the call) must be visible before any flag clears. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint16_t k = 0; k < n && k <= inf->mask; k++) {
        uint16_t h = inf->batch[k];
        if (h <= inf->mask)
            __atomic_store_n(&inf->desc[h].inflight, 0, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&inf->region->used_idx, new_idx, __ATOMIC_RELEASE);
}
