/* The internals of a device-side packed vq (VIRTIO 1.2 §2.8) that vqd_pvq.c
 * and the net fast paths (vqd_net.c, through vqd_net_tmpl.h) share; the
 * packed sibling of vqd_vq_impl.h, with the same naming: vqd_p<op> is the
 * unguarded body, vqd_pvq_<op> (vqd_pvq.h) the guarded entry point.
 *
 * Positions: (slot, wrap counter) pairs; vqd_packed_counter (vqd_ring.h)
 * turns them into counters for distances.
 * Used descriptors are not written when a chain is used (vqd_pfill) but
 * collected in vq->pused and written by vqd_pflush, so a frame the net path
 * gives back (vqd_prestore) leaves no trace in the ring, and the flags of a
 * batch are written with one release: §2.8.9 (multi-buffer requests: the
 * first descriptor of a batch is marked used after the rest).
 * Guards: none of its own; whatever touches guest memory here runs inside
 * its caller's VQD_GUARDED section.
 */
#ifndef VQD_PVQ_IMPL_H
#define VQD_PVQ_IMPL_H

#include "vqd_pvq.h"
#include "vqd_vq_impl.h"

/* §2.8.1: a descriptor is available when its AVAIL bit equals the device's
 * avail_wrap_counter and its USED bit does not. */
static inline int vqd_pdesc_avail(uint16_t flags, int wrap)
{
    return (flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED))
           == (wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
}

/* Is the descriptor at the device's next slot available (0/1)? Acquire:
 * the descriptors of the chain are read after its head's flags (§2.8.21:
 * the driver writes them before it flips the head's flags). */
static inline int vqd_pavail(struct vqd_vq *vq)
{
    uint16_t f = __atomic_load_n(&vq->pdesc[vq->last_avail_idx].flags, __ATOMIC_ACQUIRE);
    return vqd_pdesc_avail(f, vq->avail_wrap_counter);
}

/* Pop one chain into iov; 1 popped, 0 none available, <0 error (vqd_pvq.c). */
VQD_INTERNAL int vqd_ppop_one(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov);

/* vqd_ppop_one with the common chain inline: one direct descriptor (what
 * DPDK's and Linux's drivers post per frame) whose buffer lies in one
 * region, on a queue without faults. The descriptor is read once into
 * locals, then checked as vqd_ppop_one checks it; anything else (a list, an
 * indirect table, a zero length refused, a buffer across regions or outside
 * memory, a buffer id not below Queue Size, all slots held) goes to vqd_ppop_one, which reads it again and
 * says what is wrong. */
static inline int vqd_ppop(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov)
{
    if (LIKELY(!vq->broken && !vq->fault && max_iov > 0 && vq->used_pending < vq->num)) {
        const struct vqd_pdesc *dp = &vq->pdesc[vq->last_avail_idx];
        uint16_t flags = __atomic_load_n(&dp->flags, __ATOMIC_ACQUIRE);
        if (!vqd_pdesc_avail(flags, vq->avail_wrap_counter))
            return 0;
        if (LIKELY(!(flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT)))) {
            struct vqd_pdesc d;
            uint64_t room;
            memcpy(&d, dp, sizeof(d));
            uint32_t len = d.len;
            uint16_t id = d.id;
            uint8_t *p = vqd_gpa_map(vq, d.addr, len, &room, vqd_desc_perm(flags));
            if (LIKELY(p && room >= len && len && id < vq->num)) {
                iov[0].base = p;
                iov[0].len = len;
                e->head = id;
                e->ndescs = 1;
                if (flags & VRING_DESC_F_WRITE) {
                    e->out_num = 0;
                    e->in_num = 1;
                    e->out_len = 0;
                    e->in_len = len;
                } else {
                    e->out_num = 1;
                    e->in_num = 0;
                    e->out_len = len;
                    e->in_len = 0;
                }
                if (UNLIKELY(++vq->last_avail_idx == vq->num)) {
                    vq->last_avail_idx = 0;
                    vq->avail_wrap_counter ^= 1;
                }
                return 1;
            }
        }
    }
    return vqd_ppop_one(vq, e, iov, max_iov);
}

/* Does the driver want a call now (§2.8.10, driver event suppression)?
 * Updates signalled_used (vqd_pvq.c). */
VQD_INTERNAL int vqd_pshould_notify(struct vqd_vq *vq);

/* The device's next-read position, saved before popping the chains of a
 * frame and put back when the frame is given back (vqd_prestore). */
struct vqd_pmark {
    uint16_t last_avail_idx;
    uint8_t avail_wrap_counter;
    uint16_t used_pending;
};

static inline struct vqd_pmark vqd_pmark(const struct vqd_vq *vq)
{
    struct vqd_pmark m = {vq->last_avail_idx, vq->avail_wrap_counter, vq->used_pending};
    return m;
}

/* Give back what was popped (and filled) since m: the next pop reads the
 * same chains again; their used descriptors were never written. */
static inline void vqd_prestore(struct vqd_vq *vq, const struct vqd_pmark *m)
{
    vq->last_avail_idx = m->last_avail_idx;
    vq->avail_wrap_counter = m->avail_wrap_counter;
    vq->used_pending = m->used_pending;
}

/* One chain used: its used descriptor waits in pused until vqd_pflush.
 * The caller keeps used_pending < num (one per popped chain). */
static inline void vqd_pfill(struct vqd_vq *vq, uint16_t id, uint32_t len, uint16_t ndescs)
{
    struct vqd_pused *p = &vq->pused[vq->used_pending++];
    p->id = id;
    p->len = len;
    p->ndescs = ndescs;
}

/* With VIRTIO_F_IN_ORDER (§2.8.8 "In-order use of descriptors": the device
 * MAY write a single used descriptor with the buffer id of the last one of
 * a batch and skip forward by the batch's slots; the driver works out the
 * rest from the order it made them available), fold each run of pending
 * used descriptors with len 0 (transmit buffers: the device wrote nothing,
 * so no length is lost) into its first entry: the run's last buffer id, all
 * its slots. Returns the entries left. Runs with a non-zero len stay one
 * descriptor each (the driver needs every receive length). */
static inline uint32_t vqd_pfold_in_order(struct vqd_pused *p, uint32_t n)
{
    uint32_t w = 0;
    for (uint32_t k = 0; k < n; k++) {
        if (w && p[k].len == 0 && p[w - 1].len == 0) {
            p[w - 1].id = p[k].id;
            p[w - 1].ndescs = (uint16_t)(p[w - 1].ndescs + p[k].ndescs); /* <= num <= 32768 */
        } else {
            p[w++] = p[k];
        }
    }
    return w;
}

/* Write the pending used descriptors (§2.8.21 "Receiving Used Buffers" in
 * reverse: id and len of each, then its flags with AVAIL = USED =
 * used_wrap_counter) and advance next_used by each chain's slots (with
 * IN_ORDER, runs of zero-length ones folded into one: vqd_pfold_in_order).
 * Ordering (§2.8.9, as DPDK's vhost_flush_enqueue_shadow_packed): every
 * id/len first, a release fence, the flags of all but the first, and the
 * first one's flags last with a release store, so the driver (which reads
 * in ring order from the first) never sees a partial batch. */
static inline void vqd_pflush(struct vqd_vq *vq)
{
    uint32_t n = vq->used_pending, num = vq->num, total = 0;
    if (!n)
        return;
    struct vqd_pdesc *ring = vq->pdesc;
    struct vqd_pused *p = vq->pused;
    if (vq->in_order)
        n = vqd_pfold_in_order(p, n);
    uint32_t slot = vq->used_idx;
    for (uint32_t k = 0; k < n; k++) {
        ring[slot].id = p[k].id;
        ring[slot].len = p[k].len;
        slot += p[k].ndescs;
        if (slot >= num)
            slot -= num;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint32_t first = vq->used_idx;
    int wrap = vq->used_wrap_counter;
    uint16_t first_flags = wrap ? (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0;
    slot = first;
    for (uint32_t k = 0; k < n; k++) {
        if (k)
            __atomic_store_n(&ring[slot].flags,
                             (uint16_t)(wrap ? (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0),
                             __ATOMIC_RELAXED);
        slot += p[k].ndescs;
        total += p[k].ndescs;
        if (slot >= num) {
            slot -= num;
            wrap ^= 1;
        }
    }
    __atomic_store_n(&ring[first].flags, first_flags, __ATOMIC_RELEASE);
    vq->used_idx = (uint16_t)slot;
    vq->used_wrap_counter = (uint8_t)wrap;
    vq->used_pending = 0;
    vq->used_since_signal += total;
}

/* Call the driver if it wants it (§2.8.10), else count a suppressed call. */
static inline int vqd_pnotify(struct vqd_vq *vq, uint64_t *now)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    return vqd_call_or_suppress(vq, vqd_pshould_notify(vq), now);
}

#endif
