/* The internals of a device-side vq that vqd_vq.c and the net fast paths
 * (vqd_net.c) share. No CDEF block: nothing here is part of the Python API.
 *
 * Naming: vqd_<op> is the unguarded body (call it only inside a
 * VQD_GUARDED section, vqd_guard.h), vqd_vq_<op> in vqd_vq.h the exported
 * entry point that runs it under the guard. The small per-element steps are
 * static inline (the net paths run them per frame); the rest are
 * VQD_INTERNAL functions of vqd_vq.c.
 *
 * Spec: §2.7.6 (avail entries, bounded by Queue Size), §2.7.8 (used
 * elements, then used->idx), §2.7.10 (used buffer notifications).
 * Guards: none of its own; whatever touches guest memory here runs inside
 * its caller's VQD_GUARDED section.
 */
#ifndef VQD_VQ_IMPL_H
#define VQD_VQ_IMPL_H

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "vqd_vq.h"
#include "vqd_evlog.h"
#include "vqd_guard.h"
#include "vqd_inflight.h"
#include "vqd_iotlb.h"

/* Latch vq broken with a printf-style reason (the first reason is kept:
 * later ones are consequences); returns VQD_E_BROKEN. */
VQD_INTERNAL __attribute__((format(printf, 2, 3))) int vqd_broken(struct vqd_vq *vq, const char *fmt, ...);

/* Mark vq broken after a guarded fault (the on_fault of VQD_GUARDED), naming
 * the guest-physical address and region; returns VQD_E_BROKEN. */
VQD_INTERNAL int vqd_fault_broken(struct vqd_vq *vq);

/* Pop one chain into iov; 1 popped, 0 none available, <0 error. */
VQD_INTERNAL int vqd_pop_one(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov);

typedef int (*vqd_pop_one_fn)(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov);

/* Pop up to max_elems chains with the layout's pop_one (vqd_pop_one,
 * vqd_ppop_one) into elems/iov; each elem's iov_idx says where its iovecs
 * start. Returns the chains popped, or a status when none could be. */
static inline int vqd_pop_batch(struct vqd_vq *vq, struct vqd_elem *elems, int max_elems,
                                struct vqd_iov *iov, int max_iov, vqd_pop_one_fn pop_one)
{
    int got = 0, used_iov = 0;
    if (vq->broken)
        return VQD_E_BROKEN;
    if (max_elems < 0 || max_iov < 0)
        return VQD_E_INVAL;
    while (got < max_elems) {
        int rc = pop_one(vq, &elems[got], iov + used_iov, max_iov - used_iov);
        if (rc == VQD_E_NOSPACE) {
            if (got == 0)
                return VQD_E_NOSPACE; /* this chain alone does not fit */
            break;                    /* leave it for the next call */
        }
        if (rc < 0)
            return got ? got : rc; /* hand back what was popped; broken is latched */
        if (rc == 0)
            break;
        elems[got].iov_idx = used_iov;
        used_iov += elems[got].out_num + elems[got].in_num;
        got++;
    }
    return got;
}

/* Does the driver want a used buffer notification now? Updates
 * signalled_used. §2.7.10 (no EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT) and
 * §2.7.7.2 / §2.7.10 (EVENT_IDX: used_event). */
VQD_INTERNAL int vqd_should_notify(struct vqd_vq *vq);

/* The layout-independent start of a vq's init: everything zeroed (counters,
 * state, reason), then the fds, size, region table, EVENT_IDX and the
 * device's next slot to read. */
static inline void vqd_init_common(struct vqd_vq *vq, uint32_t num, const struct vqd_region *regions,
                                   int nregions, uint16_t last_avail_idx, int event_idx, int call_fd,
                                   int kick_fd)
{
    memset(vq, 0, offsetof(struct vqd_vq, reason) + 1);
    vq->call_fd = call_fd;
    vq->kick_fd = kick_fd;
    vq->num = num;
    vq->regions = regions;
    vq->nregions = nregions;
    vq->event_idx = !!event_idx;
    vq->last_avail_idx = vq->shadow_avail_idx = last_avail_idx;
}

/* Note an IOTLB failure of an access needing perm at iova (vqd_gpa_map):
 * a miss is remembered for the worker to ask for (miss_*); a permission
 * refusal breaks the queue (nothing was touched). Returns VQD_E_MISS or
 * VQD_E_BROKEN. */
VQD_INTERNAL int vqd_iotlb_failed(struct vqd_vq *vq, uint64_t iova, uint32_t perm, int why, uint32_t entry_perm);

/* Map guest address addr for an access needing perm (VQD_ACCESS_RO: the
 * device reads, WO: it writes): the host pointer and, in *room, the bytes
 * contiguous from there. addr is guest-physical (the region table) or,
 * with an IOTLB, an IOVA (want: the bytes the caller needs, to join
 * contiguous entries). NULL when it does not map; with an IOTLB the reason
 * is in vq->miss_* (vqd_iotlb_short says what to return). */
static inline uint8_t *vqd_gpa_map(struct vqd_vq *vq, uint64_t gpa, uint64_t want, uint64_t *room,
                                   uint32_t perm)
{
    if (UNLIKELY(vq->iotlb != NULL)) {
        int why = 0;
        uint32_t why_perm = 0;
        uint8_t *p = vqd_iotlb_map(vq->iotlb, gpa, want, perm, room, &why, &why_perm);
        if (UNLIKELY(!p))
            vqd_iotlb_failed(vq, gpa, perm, why, why_perm);
        return p;
    }
    const struct vqd_region *r = vq->regions;
    for (int i = 0; i < vq->nregions; i++) {
        if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size) {
            uint64_t off = gpa - r[i].gpa;
            *room = r[i].size - off;
            return r[i].host + off;
        }
    }
    return NULL;
}

/* After vqd_gpa_map of [addr, addr + len) for perm returned `mapped` with
 * `room` bytes (NULL, or room < len): with an IOTLB, VQD_E_MISS for a miss
 * (the chain waits; iotlb_misses counted), VQD_E_BROKEN for a refusal or a
 * range not contiguous in host memory (reason set); without one, 0: the
 * caller breaks the queue with its own words. */
VQD_INTERNAL int vqd_iotlb_short(struct vqd_vq *vq, uint64_t addr, uint64_t len, uint32_t perm,
                                 const uint8_t *mapped, uint64_t room);

/* Map [addr, addr + len) to iovecs, one per region (or IOTLB run) it
 * touches (clamped at region ends, like libvhost-user's vu_gpa_to_va), for
 * an access needing perm. */
static inline int vqd_map_range(struct vqd_vq *vq, uint64_t addr, uint32_t len,
                            struct vqd_iov *iov, int *n, int max_iov, uint32_t perm)
{
    uint64_t left = len;
    while (left) {
        uint64_t room;
        uint8_t *p = vqd_gpa_map(vq, addr, left, &room, perm);
        if (UNLIKELY(!p)) {
            int rc = vqd_iotlb_short(vq, addr, left, perm, NULL, 0);
            if (rc)
                return rc;
            return vqd_broken(vq, "buffer %#llx+%#x (at %#llx) is outside guest memory "
                              "(VIRTIO 1.2 §2.7.5, §2.8.13: addr is a guest-physical address)",
                              (unsigned long long)(addr - (len - left)), len, (unsigned long long)addr);
        }
        if (UNLIKELY(*n >= max_iov))
            return VQD_E_NOSPACE;
        uint64_t chunk = left < room ? left : room;
        iov[*n].base = p;
        iov[*n].len = chunk;
        (*n)++;
        addr += chunk;
        left -= chunk;
    }
    return VQD_OK;
}

/* The access a descriptor's buffer needs (§2.7.5: VRING_DESC_F_WRITE: the device writes it). */
static inline uint32_t vqd_desc_perm(uint16_t flags)
{
    return (flags & VRING_DESC_F_WRITE) ? VQD_ACCESS_WO : VQD_ACCESS_RO;
}

/* Run `call` into rc under vq's IOTLB read lock (when it has one) and the
 * SIGBUS guard: the lock is held for the whole burst, so an invalidation
 * (vqd_iotlb_invalidate) waits for it to end; it is taken outside the
 * guarded section, which a fault abandons. Not re-entered: a burst calls
 * the unguarded bodies. */
#define VQD_VQ_GUARDED(vq, rc, call, on_fault)                                   \
    do {                                                                         \
        struct vqd_iotlb *const tlb_ = (vq)->iotlb;                              \
        if (tlb_)                                                                \
            pthread_rwlock_rdlock(&tlb_->lock);                                  \
        VQD_GUARDED(rc, call, on_fault);                                         \
        if (tlb_)                                                                \
            pthread_rwlock_unlock(&tlb_->lock);                                  \
    } while (0)

/* vqd_pop_one with the common chain inline: a head (below the queue size)
 * whose descriptor is one direct buffer of non-zero length in one region,
 * already counted in the shadow avail index, on a queue without faults or
 * inflight tracking. The descriptor is read once into a local, then checked
 * as map_chain checks it; anything else goes to vqd_pop_one, which reads it
 * again and says what is wrong. */
static inline int vqd_pop(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov)
{
    if (LIKELY(!vq->broken && !vq->fault && vq->inflight == NULL && max_iov > 0
               && vq->shadow_avail_idx != vq->last_avail_idx)) {
        uint16_t head = __atomic_load_n(&vq->avail->ring[vq->last_avail_idx & (vq->num - 1)],
                                        __ATOMIC_RELAXED);
        if (LIKELY(head < vq->num)) {
            struct vqd_desc d;
            memcpy(&d, &vq->desc[head], sizeof(d));
            uint64_t room;
            uint8_t *p;
            if (LIKELY(!(d.flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT)) && d.len
                       && (p = vqd_gpa_map(vq, d.addr, d.len, &room, vqd_desc_perm(d.flags))) != NULL
                       && room >= d.len)) {
                iov[0].base = p;
                iov[0].len = d.len;
                e->head = head;
                if (d.flags & VRING_DESC_F_WRITE) {
                    e->out_num = 0;
                    e->in_num = 1;
                    e->out_len = 0;
                    e->in_len = d.len;
                } else {
                    e->out_num = 1;
                    e->in_num = 0;
                    e->out_len = d.len;
                    e->in_len = 0;
                }
                vq->last_avail_idx++;
                return 1;
            }
        }
    }
    return vqd_pop_one(vq, e, iov, max_iov);
}

/* Entries the driver made available beyond last_avail_idx (refreshing the
 * shadow), or VQD_E_BROKEN when avail->idx moved more than Queue Size ahead
 * (§2.7.6: the driver cannot have more than Queue Size buffers available). */
static inline int vqd_avail_count(struct vqd_vq *vq)
{
    uint16_t a = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(a - vq->last_avail_idx);
    if (UNLIKELY(n > vq->num))
        return vqd_broken(vq, "avail->idx %u is %u entries ahead of last_avail_idx %u, more than "
                          "the queue size %u (VIRTIO 1.2 §2.7.6)", a, n, vq->last_avail_idx, vq->num);
    vq->shadow_avail_idx = a;
    if (UNLIKELY(vq->inflight != NULL)) {
        /* heads to hand back after a restart count too, and together they
         * still cannot exceed Queue Size (a hostile inflight area could) */
        uint32_t pending = vqd_inflight_pending(vq);
        if (UNLIKELY(n + pending > vq->num))
            return vqd_broken(vq, "%u entries available and %u heads in flight (inflight area): more than "
                              "the queue size %u (VIRTIO 1.2 §2.7.6)", n, pending, vq->num);
        return (int)(n + pending);
    }
    return n;
}

/* Write one used element after the pending ones; not visible to the driver
 * until vqd_vq_flush. */
static inline void vqd_fill(struct vqd_vq *vq, uint32_t head, uint32_t len)
{
    struct vqd_used_elem *u = &vq->used->ring[(uint16_t)(vq->used_idx + vq->used_pending) & (vq->num - 1)];
    u->id = head;   /* §2.7.8: id is the head of the used chain */
    u->len = len;   /* §2.7.8: bytes written into the device-writable part */
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_filled(vq, vq->used_pending, head);
    vq->used_pending++;
}

/* Publish the pending used elements with one release store of used->idx. */
static inline void vqd_flush(struct vqd_vq *vq)
{
    uint16_t old = vq->used_idx, new_idx;
    if (!vq->used_pending)
        return;
    new_idx = (uint16_t)(old + vq->used_pending);
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_pre_publish(vq, vq->used_pending);
    /* §2.7.8 / §2.7.13.4 mirror: elements (and buffer data) before idx. */
    __atomic_store_n(&vq->used->idx, new_idx, __ATOMIC_RELEASE);
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_post_publish(vq, vq->used_pending, new_idx);
    vq->used_idx = new_idx;
    vq->used_pending = 0;
    /* If the index just ran past signalled_used (16-bit wrap), the stored
     * value no longer says anything about [old, new): forget it. */
    if (UNLIKELY((int16_t)(new_idx - vq->signalled_used) < (uint16_t)(new_idx - old)))
        vq->signalled_used_valid = 0;
}

static inline int vqd_write_call(struct vqd_vq *vq, uint64_t *now)
{
    uint64_t one = 1;
    if (vq->call_fd >= 0) {
        ssize_t w;
        do
            w = write(vq->call_fd, &one, sizeof(one));
        while (w < 0 && errno == EINTR);
        /* EAGAIN: the counter is saturated, the driver has a call pending. */
    }
    vq->calls++;
    vqd_ev_record(vq, VQD_EV_CALL, vq->used_idx, now);
    return 1;
}

/* Call the driver if it wants it (`wanted`: the layout's decision, made
 * by vqd_should_notify or vqd_pshould_notify), else count (and log) a
 * suppressed call; *now as for vqd_ev_record. With VQD_FAULT_DROP_CALLS a due call is lost
 * after the decision (signalled_used has moved, as for a call written):
 * neither written, nor counted in calls, nor logged; only calls_dropped. */
static inline int vqd_call_or_suppress(struct vqd_vq *vq, int wanted, uint64_t *now)
{
    if (!wanted) {
        vq->calls_suppressed++;
        vqd_ev_record(vq, VQD_EV_CALL_SUPPRESSED, vq->used_idx, now);
        return 0;
    }
    if (UNLIKELY(vq->fault & VQD_FAULT_DROP_CALLS)) {
        vq->calls_dropped++;
        return 0;
    }
    return vqd_write_call(vq, now);
}

static inline int vqd_notify(struct vqd_vq *vq, uint64_t *now)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    return vqd_call_or_suppress(vq, vqd_should_notify(vq), now);
}

#endif
