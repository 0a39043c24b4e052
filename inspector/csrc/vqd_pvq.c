/* The device side of a packed virtqueue (VIRTIO 1.2 §2.8), the sibling of
 * vqd_vq.c (split): init, pop (chains from the device's position with its
 * avail_wrap_counter, the buffer id from the chain's last descriptor,
 * indirect tables, region mapping), rewind, fill/flush of used descriptors
 * (vqd_pvq_impl.h), and event suppression both ways.
 *
 * Spec: §2.8.1 (wrap counters), §2.8.5 / §2.8.17 (chains: at most Queue
 * Size descriptors, device-readable before device-writable), §2.8.6 (the
 * buffer id is in the last descriptor; one used descriptor per chain, the
 * device skips the chain's slots), §2.8.7 / §2.8.19 (indirect tables: a
 * lone descriptor, no NEXT, no nested INDIRECT), §2.8.8 (VIRTIO_F_IN_ORDER:
 * chains are used in the order they were made available; with the feature
 * negotiated (vq->in_order) a run of zero-length used descriptors is written
 * as one, vqd_pflush), §2.8.9 (the first used descriptor of a batch is
 * marked last), §2.8.10 / §2.8.14 (event suppression: ENABLE / DISABLE /
 * DESC with off and wrap, DESC only with VIRTIO_F_RING_EVENT_IDX).
 *
 * Guards: every exported function that touches guest memory runs under
 * VQD_GUARDED (vqd_guard.h), as in vqd_vq.c. Every chain walk is bounded by
 * the queue size (ring slots) or the indirect table's size, and every guest
 * address is checked against the region table. The buffer id is opaque to
 * the device (§2.8.13): it is handed back as read, not checked.
 *
 * Memory ordering (the driver runs on another CPU): the head's flags are
 * loaded with acquire, the chain's descriptors read after (the driver makes
 * the head available last, §2.8.21); used descriptors are written by
 * vqd_pflush (id/len, release, flags, the batch's first flags last); a full
 * fence separates "write used descriptors" from "read the driver's event
 * suppression", and "write our event suppression" from "look at the ring
 * again", to close the lost-notification races.
 * Descriptors are copied once into a local before they are checked and used.
 */
#define _GNU_SOURCE
#include <string.h>

#include "vqd_pvq_impl.h"

_Static_assert(sizeof(struct vqd_pdesc) == 16, "pvirtq_desc is 16 bytes (§2.8.13)");
_Static_assert(sizeof(struct vqd_pevent) == 4, "pvirtq_event_suppress is 4 bytes (§2.8.14)");

static int pvq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *driver_event,
                    void *device_event, struct vqd_pused *pused,
                    const struct vqd_region *regions, int nregions,
                    uint16_t last_avail_idx, int avail_wrap_counter,
                    uint16_t next_used, int used_wrap_counter,
                    int event_idx, int call_fd, int kick_fd)
{
    vqd_init_common(vq, num, regions, nregions, last_avail_idx, event_idx, call_fd, kick_fd);
    vq->pdesc = desc;
    vq->driver_event = driver_event;
    vq->device_event = device_event;
    vq->pused = pused;
    vq->avail_wrap_counter = !!avail_wrap_counter;
    vq->used_idx = vq->signalled_used = next_used;
    vq->used_wrap_counter = vq->signalled_used_wrap = !!used_wrap_counter;
    /* §2.8.10.1: Queue Size need not be a power of two; positions are 15 bits. */
    if (num == 0 || num > VQD_MAX_QUEUE_SIZE)
        return vqd_broken(vq, "queue size %u is not in 1..32768 (VIRTIO 1.2 §2.8)", num);
    if (!desc || !driver_event || !device_event || !pused)
        return vqd_broken(vq, "a ring area is outside guest memory");
    /* §2.8.10.1: alignment 16 (descriptor ring), 4 (event suppression). */
    if (((uintptr_t)desc & 15) || ((uintptr_t)driver_event & 3) || ((uintptr_t)device_event & 3))
        return vqd_broken(vq, "misaligned ring areas desc=%p driver_event=%p device_event=%p "
                          "(VIRTIO 1.2 §2.8.10.1 alignment)", desc, driver_event, device_event);
    if (last_avail_idx >= num || next_used >= num)
        return vqd_broken(vq, "last_avail_idx %u / next_used %u not below the queue size %u "
                          "(vhost-user SET_VRING_BASE of a packed ring)", last_avail_idx, next_used, num);
    vq->signalled_used_valid = 0;
    vq->notify_enabled = 1;
    return VQD_OK;
}

int vqd_pvq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *driver_event,
                 void *device_event, struct vqd_pused *pused,
                 const struct vqd_region *regions, int nregions,
                 uint16_t last_avail_idx, int avail_wrap_counter,
                 uint16_t next_used, int used_wrap_counter,
                 int event_idx, int call_fd, int kick_fd)
{
    int rc;
    VQD_GUARDED(rc, pvq_init(vq, num, desc, driver_event, device_event, pused, regions, nregions,
                             last_avail_idx, avail_wrap_counter, next_used, used_wrap_counter,
                             event_idx, call_fd, kick_fd),
                rc = vqd_fault_broken(vq));
    return rc;
}

/* Map one descriptor's buffer (not indirect), keeping device-readable
 * before device-writable (§2.8.17). */
static inline int map_desc(struct vqd_vq *vq, const struct vqd_pdesc *d, uint32_t slot, uint32_t head,
                           const char *where, struct vqd_iov *iov, int *n, int max_iov,
                           uint64_t *out_len, uint64_t *in_len, uint32_t *out_num, uint32_t *in_num)
{
    if (UNLIKELY(d->len == 0 && vq->reject_zero_len))
        return vqd_broken(vq, "descriptor %u%s of the chain at slot %u has length 0 (zero-sized buffers "
                          "are refused, as QEMU's virtqueue_map_desc does)", slot, where, head);
    int start = *n;
    if (d->flags & VRING_DESC_F_WRITE) {
        *in_len += d->len;
    } else {
        if (UNLIKELY(*in_num))
            return vqd_broken(vq, "device-readable descriptor %u%s after a device-writable one in the "
                              "chain at slot %u (VIRTIO 1.2 §2.8.17)", slot, where, head);
        *out_len += d->len;
    }
    int rc = vqd_map_range(vq, d->addr, d->len, iov, n, max_iov, vqd_desc_perm(d->flags));
    if (UNLIKELY(rc))
        return rc;
    if (d->flags & VRING_DESC_F_WRITE)
        *in_num += *n - start;
    else
        *out_num += *n - start;
    return VQD_OK;
}

static int ppop_chain(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov);

int vqd_ppop_one(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov)
{
    int rc = ppop_chain(vq, e, iov, max_iov);
    return rc == VQD_E_MISS ? 0 : rc;   /* an IOTLB miss: the chain stays available */
}

static int ppop_chain(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov)
{
    if (UNLIKELY(vq->broken))
        return VQD_E_BROKEN;
    if (UNLIKELY(vq->fault & VQD_FAULT_STALL))
        return 0; /* a stalled device takes nothing (it notices kicks: vqd_pvq_notice) */
    const struct vqd_pdesc *ring = vq->pdesc;
    uint32_t num = vq->num, head = vq->last_avail_idx, slot = head, walked = 0;
    int wrap = vq->avail_wrap_counter;
    uint16_t flags = __atomic_load_n(&ring[slot].flags, __ATOMIC_ACQUIRE);
    if (!vqd_pdesc_avail(flags, wrap))
        return 0;
    /* Every chain popped and used but not yet written holds at least one
     * slot: with num of them pending the ring is all the device's, and a
     * descriptor available now was made available again before it was used
     * (§2.8.16: the driver MUST NOT change a descriptor until it sees it
     * used). pused has room for num. */
    if (UNLIKELY(vq->used_pending >= num))
        return vqd_broken(vq, "descriptor at slot %u (flags %#x) is available again while the device "
                          "holds all %u slots unused (VIRTIO 1.2 §2.8.16)", head, flags, num);
    uint64_t out_len = 0, in_len = 0;
    uint32_t out_num = 0, in_num = 0;
    int n = 0, rc;
    struct vqd_pdesc d;
    for (;;) {
        /* §2.8.17: a list is at most Queue Size descriptors long. */
        if (UNLIKELY(++walked > num))
            return vqd_broken(vq, "descriptor chain at slot %u is longer than the queue size %u "
                              "(VIRTIO 1.2 §2.8.17)", head, num);
        memcpy(&d, &ring[slot], sizeof(d));
        if (walked == 1)
            d.flags = flags; /* the flags we checked, not a second read */
        else if (UNLIKELY(!vqd_pdesc_avail(d.flags, wrap)))
            /* §2.8.6/§2.8.1: the driver makes every descriptor of a list
             * available with the wrap counter of its slot (the head's
             * flags last); a later one that is not is a list the driver
             * never finished, or one from another round. */
            return vqd_broken(vq, "descriptor %u (flags %#x) of the chain at slot %u is not available for "
                              "wrap counter %d: AVAIL/USED impossible after its head (VIRTIO 1.2 §2.8.1, "
                              "§2.8.6)", slot, d.flags, head, wrap);
        if (UNLIKELY(d.flags & VRING_DESC_F_INDIRECT)) {
            /* §2.8.19: an indirect descriptor stands alone (not in a list
             * linked by NEXT), its table is len / 16 descriptors. */
            if (d.flags & VRING_DESC_F_NEXT || walked > 1)
                return vqd_broken(vq, "descriptor %u (flags %#x) is indirect inside a list linked by "
                                  "VIRTQ_DESC_F_NEXT, chain at slot %u (VIRTIO 1.2 §2.8.19)",
                                  slot, d.flags, head);
            if (d.len == 0 || d.len % sizeof(struct vqd_pdesc))
                return vqd_broken(vq, "indirect descriptor %u has length %u, not a non-zero multiple of "
                                  "16 (VIRTIO 1.2 §2.8.7)", slot, d.len);
            uint32_t entries = d.len / sizeof(struct vqd_pdesc);
            if (entries > VQD_MAX_QUEUE_SIZE)
                return vqd_broken(vq, "indirect table of descriptor %u has %u entries, more than 32768",
                                  slot, entries);
            uint64_t room;
            const struct vqd_pdesc *t = (const struct vqd_pdesc *)vqd_gpa_map(vq, d.addr, d.len, &room,
                                                                               VQD_ACCESS_RO);
            if (!t || room < d.len) {
                if ((rc = vqd_iotlb_short(vq, d.addr, d.len, VQD_ACCESS_RO, (const uint8_t *)t, room)))
                    return rc;
                return vqd_broken(vq, "indirect table %#llx+%#x of descriptor %u is outside guest memory "
                                  "or crosses a region end", (unsigned long long)d.addr, d.len, slot);
            }
            for (uint32_t k = 0; k < entries; k++) {
                struct vqd_pdesc td;
                memcpy(&td, &t[k], sizeof(td));
                /* §2.8.19: only WRITE is valid in a table (others are ignored
                 * by the device, §2.8.7), but a nested table is refused as a
                 * split ring's is (§2.7.5.3.1). */
                if (UNLIKELY(td.flags & VRING_DESC_F_INDIRECT))
                    return vqd_broken(vq, "nested indirect descriptor %u (flags %#x) in the table of slot %u "
                                      "(VIRTIO 1.2 §2.8.19: only VIRTQ_DESC_F_WRITE within an indirect "
                                      "table)", k, td.flags, slot);
                rc = map_desc(vq, &td, k, head, " of the indirect table", iov, &n, max_iov,
                              &out_len, &in_len, &out_num, &in_num);
                if (UNLIKELY(rc))
                    return rc;
            }
        } else {
            rc = map_desc(vq, &d, slot, head, "", iov, &n, max_iov, &out_len, &in_len, &out_num, &in_num);
            if (UNLIKELY(rc))
                return rc;
        }
        if (++slot == num) {
            slot = 0;
            wrap ^= 1;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
    }
    if (UNLIKELY(out_len > UINT32_MAX || in_len > UINT32_MAX))
        return vqd_broken(vq, "chain at slot %u is longer than 4 GiB", head);
    /* §2.8.6: the buffer id is in the last descriptor and names one of the
     * ring's Queue Size buffers (the used descriptor hands it back). */
    if (UNLIKELY(d.id >= num))
        return vqd_broken(vq, "buffer id %u of the chain at slot %u is not below the queue size %u "
                          "(VIRTIO 1.2 §2.8.6)", d.id, head, num);
    e->head = d.id;
    e->ndescs = walked;
    e->out_num = out_num;
    e->in_num = in_num;
    e->out_len = out_len;
    e->in_len = in_len;
    vq->last_avail_idx = (uint16_t)slot;
    vq->avail_wrap_counter = (uint8_t)wrap;
    return 1;
}

int vqd_pvq_pop(struct vqd_vq *vq, struct vqd_elem *elems, int max_elems,
                struct vqd_iov *iov, int max_iov)
{
    int rc;
    VQD_VQ_GUARDED(vq, rc, vqd_pop_batch(vq, elems, max_elems, iov, max_iov, vqd_ppop_one),
                rc = vqd_fault_broken(vq));
    return rc;
}

/* 1 when the device's next slot holds an available descriptor, else 0
 * (a packed ring has no index saying how many more there are). */
int vqd_pvq_avail_count(struct vqd_vq *vq)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    VQD_GUARDED(rc, vqd_pavail(vq), rc = vqd_fault_broken(vq));
    return rc;
}

/* Give back popped chains not yet used, `ndescs` ring slots in all (the sum
 * of their vqd_elem.ndescs): the next pops return them again. */
int vqd_pvq_rewind(struct vqd_vq *vq, uint32_t ndescs)
{
    if (ndescs > vq->num)
        return VQD_E_INVAL;
    uint32_t slot = vq->last_avail_idx;
    if (ndescs > slot) {
        slot += vq->num;
        vq->avail_wrap_counter ^= 1;
    }
    vq->last_avail_idx = (uint16_t)(slot - ndescs);
    return VQD_OK;
}

int vqd_pvq_fill(struct vqd_vq *vq, uint32_t id, uint32_t len, uint32_t ndescs)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    if (id > 0xFFFF || ndescs == 0 || ndescs > vq->num || vq->used_pending >= vq->num)
        return VQD_E_INVAL;
    vqd_pfill(vq, (uint16_t)id, len, (uint16_t)ndescs);
    return VQD_OK;
}

int vqd_pvq_flush(struct vqd_vq *vq)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    int n = vq->used_pending, rc;
    VQD_GUARDED(rc, (vqd_pflush(vq), n), rc = vqd_fault_broken(vq));
    return rc;
}

/* §2.8.10 / §2.8.14: the driver's event suppression area says when it
 * wants calls. ENABLE: always; DISABLE: never; DESC (only meaningful with
 * EVENT_IDX; without it the flag is treated as ENABLE, as DPDK does): when
 * next_used has just passed the position (desc_event_off,
 * desc_event_wrap), i.e. it lies in [signalled, next_used). */
int vqd_pshould_notify(struct vqd_vq *vq)
{
    /* the used descriptors must be visible before we read what the driver asked for */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t flags = __atomic_load_n(&vq->driver_event->flags, __ATOMIC_RELAXED) & 3;
    if (!vq->event_idx)
        return flags != RING_EVENT_FLAGS_DISABLE;
    uint32_t num = vq->num;
    uint32_t old = vqd_packed_counter(vq->signalled_used, vq->signalled_used_wrap, num);
    uint32_t new_c = vqd_packed_counter(vq->used_idx, vq->used_wrap_counter, num);
    uint32_t since = vq->used_since_signal;
    int valid = vq->signalled_used_valid;
    vq->signalled_used = vq->used_idx;
    vq->signalled_used_wrap = vq->used_wrap_counter;
    vq->signalled_used_valid = 1;
    vq->used_since_signal = 0;
    if (flags != RING_EVENT_FLAGS_DESC)
        return flags != RING_EVENT_FLAGS_DISABLE;
    /* A whole ring used since the last decision passes any event the
     * driver can have asked for; so does a decision we never made. */
    if (!valid || since >= num)
        return 1;
    uint16_t ow = __atomic_load_n(&vq->driver_event->off_wrap, __ATOMIC_RELAXED);
    uint32_t off = ow & RING_EVENT_OFF_MASK;
    if (off >= num)
        return 1; /* an offset outside the ring: err on the side of calling */
    uint32_t ev = vqd_packed_counter(off, ow >> RING_EVENT_WRAP_SHIFT, num);
    return vqd_packed_distance(old, ev, num) < vqd_packed_distance(old, new_c, num);
}

int vqd_pvq_should_notify(struct vqd_vq *vq)
{
    int rc;
    VQD_GUARDED(rc, vqd_pshould_notify(vq), rc = vqd_fault_broken(vq));
    return rc;
}

int vqd_pvq_notify(struct vqd_vq *vq)
{
    uint64_t now = 0;
    int rc;
    VQD_GUARDED(rc, vqd_pnotify(vq, &now), rc = vqd_fault_broken(vq));
    return rc;
}

/* Ask for kicks at the device's next slot: DESC at (last_avail_idx,
 * avail_wrap_counter) with EVENT_IDX (offset written before the flags), else
 * ENABLE (§2.8.10, §2.8.14). */
static inline void want_kicks(struct vqd_vq *vq)
{
    struct vqd_pevent *ev = vq->device_event;
    if (vq->event_idx) {
        __atomic_store_n(&ev->off_wrap, (uint16_t)(vq->last_avail_idx
                         | (vq->avail_wrap_counter << RING_EVENT_WRAP_SHIFT)), __ATOMIC_RELAXED);
        __atomic_store_n(&ev->flags, (uint16_t)RING_EVENT_FLAGS_DESC, __ATOMIC_RELEASE);
    } else {
        __atomic_store_n(&ev->flags, (uint16_t)RING_EVENT_FLAGS_ENABLE, __ATOMIC_RELAXED);
    }
}

/* Enable or disable available buffer notifications (kicks) through the
 * device event suppression area. After enabling, returns 1 when a chain is
 * already available at the device's next slot (the driver may have made it
 * available before it saw the change): the caller must service it instead
 * of sleeping. */
static int set_notification(struct vqd_vq *vq, int enable)
{
    vq->notify_enabled = !!enable;
    if (!enable) {
        __atomic_store_n(&vq->device_event->flags, (uint16_t)RING_EVENT_FLAGS_DISABLE, __ATOMIC_RELAXED);
        return 0;
    }
    want_kicks(vq);
    /* our write must be visible before we look at the ring again */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vqd_pavail(vq);
}

int vqd_pvq_set_notification(struct vqd_vq *vq, int enable)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    VQD_GUARDED(rc, set_notification(vq, enable), rc = vqd_fault_broken(vq));
    return rc;
}

/* What a kicked device that cannot work does (VQD_FAULT_STALL): ask for a
 * kick on every descriptor made available from now on (ENABLE: the driver's
 * position past what is there is not known without walking the ring) and
 * look at the next slot. Returns 1 when a chain waits there, else 0. */
static int notice(struct vqd_vq *vq)
{
    vq->notify_enabled = 1;
    __atomic_store_n(&vq->device_event->flags, (uint16_t)RING_EVENT_FLAGS_ENABLE, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vqd_pavail(vq);
}

int vqd_pvq_notice(struct vqd_vq *vq)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    VQD_GUARDED(rc, notice(vq), rc = vqd_fault_broken(vq));
    return rc;
}
