/* The device side of a split virtqueue (VIRTIO 1.2 §2.7): init, pop (avail
 * ring, descriptor chains, indirect tables, region mapping), copy to/from
 * popped buffers, rewind, fill/flush/push of used elements, the
 * notification decisions in both directions and the broken state. The net
 * fast paths (vqd_net.c) reuse its steps through vqd_vq_impl.h.
 *
 * Spec: §2.7 (queue size, alignment), §2.7.4.2 (readable before writable),
 * §2.7.5 / §2.7.5.2 / §2.7.5.3 (descriptors, chains, indirect tables),
 * §2.7.6 (avail ring), §2.7.8 (used ring), §2.7.7 / §2.7.10 (used buffer
 * notification suppression, VIRTIO_F_EVENT_IDX), §2.7.13 (driver-side
 * ordering mirrored here).
 *
 * Guards: every exported function that touches guest memory runs its body
 * under VQD_GUARDED (vqd_guard.h); a SIGBUS breaks the queue naming the
 * guest-physical address (vqd_fault_broken) and returns VQD_E_BROKEN. Every
 * chain walk is bounded by the queue size or the indirect table's size, and
 * every guest address is checked against the region table. Inflight
 * tracking (vqd_inflight.c) is called only when vq->inflight is set.
 *
 * Memory ordering (the driver runs on another CPU):
 * - avail->idx is loaded with acquire; ring entries and descriptors are read
 *   after it (§2.7.13.3: the driver writes them before the idx).
 * - used elements are written, then used->idx is stored with release
 *   (§2.7.8: the device writes the elements before updating idx), so the
 *   buffers' contents and the elements are visible before the idx.
 * - a full fence separates "publish used->idx" from "read used_event / avail
 *   flags" (§2.7.10 / §2.7.7), and "write avail_event / used flags" from
 *   "re-read avail->idx", to close the lost-notification races.
 * Descriptors are copied once into a local before they are checked and used:
 * the driver may change them under us and we must not read a field twice.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vqd_vq_impl.h"

_Static_assert(sizeof(struct vqd_iov) == sizeof(struct iovec), "vqd_iov must match struct iovec");
_Static_assert(sizeof(struct vqd_desc) == 16, "virtq_desc is 16 bytes (§2.7.5)");

void vqd_vq_set_broken(struct vqd_vq *vq, const char *reason)
{
    if (vq->broken)
        return; /* keep the first reason: later ones are consequences */
    vq->broken = 1;
    snprintf(vq->reason, sizeof(vq->reason), "%s", reason);
}

int vqd_broken(struct vqd_vq *vq, const char *fmt, ...)
{
    if (!vq->broken) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(vq->reason, sizeof(vq->reason), fmt, ap);
        va_end(ap);
        vq->broken = 1;
    }
    return VQD_E_BROKEN;
}

/* Mark vq broken after a guarded fault, naming the guest-physical address
 * and region (vq's region table maps host addresses back). */
int vqd_fault_broken(struct vqd_vq *vq)
{
    uintptr_t a = (uintptr_t)vqd_guard_fault_addr();
    if (!vq)
        return VQD_E_BROKEN;
    for (int i = 0; i < vq->nregions; i++) {
        const struct vqd_region *r = &vq->regions[i];
        if (a >= (uintptr_t)r->host && a - (uintptr_t)r->host < r->size)
            return vqd_broken(vq, "SIGBUS at guest-physical %#llx (region %d, %#llx+%#llx): the "
                              "front-end shrank its memory after SET_MEM_TABLE (memfd truncated?)",
                              (unsigned long long)(r->gpa + (a - (uintptr_t)r->host)), i,
                              (unsigned long long)r->gpa, (unsigned long long)r->size);
    }
    return vqd_broken(vq, "SIGBUS at host address %#llx: the front-end shrank its memory after "
                      "SET_MEM_TABLE (memfd truncated?)", (unsigned long long)a);
}

static const char *access_name(uint32_t perm)
{
    return perm == VQD_ACCESS_RO ? "ro" : perm == VQD_ACCESS_WO ? "wo" : perm == VQD_ACCESS_RW ? "rw" : "none";
}

int vqd_iotlb_failed(struct vqd_vq *vq, uint64_t iova, uint32_t perm, int why, uint32_t entry_perm)
{
    if (why == VQD_IOTLB_PERM)
        return vqd_broken(vq, "device %s at IOVA %#llx through an IOTLB entry with perm %s (the access needs "
                          "%s): refused, nothing %s (vhost-user IOTLB, VIRTIO 1.2 §6.1 "
                          "VIRTIO_F_ACCESS_PLATFORM)", perm & VQD_ACCESS_WO ? "write" : "read",
                          (unsigned long long)iova, access_name(entry_perm), access_name(perm),
                          perm & VQD_ACCESS_WO ? "written" : "read");
    vq->miss_iova = iova;
    vq->miss_perm = (uint8_t)perm;
    vq->miss_updates = __atomic_load_n(&vq->iotlb->updates, __ATOMIC_ACQUIRE);
    vq->miss_new = 1;
    return VQD_E_MISS;
}

int vqd_iotlb_short(struct vqd_vq *vq, uint64_t addr, uint64_t len, uint32_t perm, const uint8_t *mapped,
                    uint64_t room)
{
    if (vq->iotlb == NULL)
        return 0;
    if (vq->broken)
        return VQD_E_BROKEN;   /* a permission refusal (vqd_iotlb_failed) */
    if (mapped) {
        /* The run stopped short: the rest misses, is refused, or lies elsewhere. */
        uint64_t r2;
        if (!vqd_gpa_map(vq, addr + room, len - room, &r2, perm))
            return vq->broken ? VQD_E_BROKEN : (vq->iotlb_misses++, VQD_E_MISS);
        return vqd_broken(vq, "IOVA range %#llx+%#llx is mapped by IOTLB entries that are not contiguous in "
                          "the front-end's memory (a ring area or indirect table must be)",
                          (unsigned long long)addr, (unsigned long long)len);
    }
    vq->iotlb_misses++;
    return VQD_E_MISS;
}

int vqd_vq_iotlb_waiting(const struct vqd_vq *vq)
{
    return vq->iotlb != NULL && vq->iotlb_misses
           && __atomic_load_n(&vq->iotlb->updates, __ATOMIC_ACQUIRE) == vq->miss_updates;
}

/* §2.7.10 / §2.7.7.2: "notify if the new used index has just passed
 * used_event", i.e. event lies in [old, new). */
int vqd_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

static inline uint16_t *used_event_ptr(struct vqd_vq *vq)
{
    return &vq->avail->ring[vq->num]; /* §2.7.6: after ring[Queue Size] */
}

static inline uint16_t *avail_event_ptr(struct vqd_vq *vq)
{
    return (uint16_t *)&vq->used->ring[vq->num]; /* §2.7.8: after ring[Queue Size] */
}

static int vq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *avail, void *used,
                   const struct vqd_region *regions, int nregions, uint16_t last_avail_idx,
                   int event_idx, int call_fd, int kick_fd)
{
    vqd_init_common(vq, num, regions, nregions, last_avail_idx, event_idx, call_fd, kick_fd);
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    /* §2.7: Queue Size is a power of two, at most 32768 (we mask indices). */
    if (num == 0 || (num & (num - 1)) || num > VQD_MAX_QUEUE_SIZE)
        return vqd_broken(vq, "queue size %u is not a power of two in 1..32768 (VIRTIO 1.2 §2.7)", num);
    if (!desc || !avail || !used)
        return vqd_broken(vq, "a ring area is outside guest memory");
    /* §2.7: alignment of descriptor table 16, driver area 2, device area 4. */
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return vqd_broken(vq, "misaligned ring areas desc=%p avail=%p used=%p (VIRTIO 1.2 §2.7 alignment)",
                          desc, avail, used);
    /* The device's used index continues from what the ring holds (e.g. after
     * a front-end reconnect); last_avail_idx comes from SET_VRING_BASE. */
    vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    vq->signalled_used = vq->used_idx;
    vq->signalled_used_valid = 0;
    vq->notify_enabled = 1;
    return VQD_OK;
}

int vqd_vq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *avail, void *used,
                const struct vqd_region *regions, int nregions, uint16_t last_avail_idx,
                int event_idx, int call_fd, int kick_fd)
{
    int rc;
    VQD_GUARDED(rc, vq_init(vq, num, desc, avail, used, regions, nregions, last_avail_idx, event_idx,
                            call_fd, kick_fd),
                rc = vqd_fault_broken(vq));
    return rc;
}

int vqd_vq_avail_count(struct vqd_vq *vq)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    VQD_GUARDED(rc, vqd_avail_count(vq), rc = vqd_fault_broken(vq));
    return rc;
}

/* Walk the chain starting at head and map it into iov[0..max_iov).
 * Bounded: at most num descriptors of the ring, or of the indirect table. */
static int map_chain(struct vqd_vq *vq, uint16_t head, struct vqd_elem *e,
                     struct vqd_iov *iov, int max_iov)
{
    const struct vqd_desc *table = vq->desc;
    uint32_t max = vq->num, i = head, walked = 0;
    int n = 0, rc, indirect = 0;
    uint64_t out_len = 0, in_len = 0;
    uint32_t out_num = 0, in_num = 0;
    struct vqd_desc d;

    memcpy(&d, &table[i], sizeof(d));
    if (d.flags & VRING_DESC_F_INDIRECT) {
        /* §2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT. */
        if (d.flags & VRING_DESC_F_NEXT)
            return vqd_broken(vq, "descriptor %u has both VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT "
                              "(VIRTIO 1.2 §2.7.5.3.1)", i);
        /* §2.7.5.3: the table is len / 16 descriptors. */
        if (d.len == 0 || d.len % sizeof(struct vqd_desc))
            return vqd_broken(vq, "indirect descriptor %u has length %u, not a non-zero multiple of 16 "
                              "(VIRTIO 1.2 §2.7.5.3)", i, d.len);
        if (d.len / sizeof(struct vqd_desc) > VQD_MAX_QUEUE_SIZE)
            return vqd_broken(vq, "indirect table of descriptor %u has %u entries, more than 32768",
                              i, (unsigned)(d.len / sizeof(struct vqd_desc)));
        uint64_t room;
        const uint8_t *t = vqd_gpa_map(vq, d.addr, d.len, &room, VQD_ACCESS_RO);
        if (!t || room < d.len) {
            if ((rc = vqd_iotlb_short(vq, d.addr, d.len, VQD_ACCESS_RO, t, room)))
                return rc;
            return vqd_broken(vq, "indirect table %#llx+%#x of descriptor %u is outside guest memory "
                              "or crosses a region end", (unsigned long long)d.addr, d.len, i);
        }
        table = (const struct vqd_desc *)t;
        max = d.len / sizeof(struct vqd_desc);
        indirect = 1;
        i = 0;
        memcpy(&d, &table[0], sizeof(d));
    }
    for (;;) {
        /* A chain longer than its table means a loop (§2.7.5.2: the driver
         * MUST NOT create a chain longer than the Queue Size). */
        if (UNLIKELY(++walked > max))
            return vqd_broken(vq, "descriptor chain from head %u loops: more than %u descriptors%s",
                              head, max, indirect ? " in its indirect table" : "");
        if (UNLIKELY(d.flags & VRING_DESC_F_INDIRECT))
            return vqd_broken(vq, indirect
                              ? "nested indirect descriptor %u in the table of head %u "
                                "(VIRTIO 1.2 §2.7.5.3.1: only one table per descriptor)"
                              : "indirect descriptor %u inside the chain of head %u (only a chain's "
                                "head may be indirect here)", i, head);
        if (UNLIKELY(d.len == 0 && vq->reject_zero_len))
            return vqd_broken(vq, "descriptor %u of head %u has length 0 (zero-sized buffers are "
                              "refused, as QEMU's virtqueue_map_desc does)", i, head);
        int start = n;
        if (d.flags & VRING_DESC_F_WRITE) {
            in_len += d.len;
        } else {
            /* §2.7.4.2: device-readable descriptors come before device-writable ones. */
            if (UNLIKELY(in_num))
                return vqd_broken(vq, "device-readable descriptor %u after a device-writable one in "
                                  "the chain of head %u (VIRTIO 1.2 §2.7.4.2)", i, head);
            out_len += d.len;
        }
        rc = vqd_map_range(vq, d.addr, d.len, iov, &n, max_iov, vqd_desc_perm(d.flags));
        if (UNLIKELY(rc))
            return rc;
        if (d.flags & VRING_DESC_F_WRITE)
            in_num += n - start;
        else
            out_num += n - start;
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        /* §2.7.5.2: next indexes the same table. */
        if (UNLIKELY(d.next >= max))
            return vqd_broken(vq, "descriptor %u of head %u has next %u >= %s size %u (VIRTIO 1.2 §2.7.5)",
                              i, head, d.next, indirect ? "indirect table" : "queue", max);
        i = d.next;
        memcpy(&d, &table[i], sizeof(d));
    }
    if (UNLIKELY(out_len > UINT32_MAX || in_len > UINT32_MAX))
        return vqd_broken(vq, "chain of head %u is longer than 4 GiB", head);
    e->head = head;
    e->out_num = out_num;
    e->in_num = in_num;
    e->out_len = out_len;
    e->in_len = in_len;
    return n;
}

int vqd_pop_one(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov)
{
    if (UNLIKELY(vq->broken))
        return VQD_E_BROKEN;
    if (UNLIKELY(vq->fault & VQD_FAULT_STALL))
        return 0; /* a stalled device takes nothing (it notices kicks: vqd_vq_notice) */
    if (UNLIKELY(vq->inflight != NULL)) {
        /* After a restart, heads still in flight go first (vqd_inflight.c). */
        int h = vqd_inflight_next_resubmit(vq);
        if (h >= 0) {
            int rc = map_chain(vq, (uint16_t)h, e, iov, max_iov);
            if (UNLIKELY(rc < 0))
                return rc == VQD_E_MISS ? 0 : rc;   /* an IOTLB miss: the head waits */
            vqd_inflight_popped(vq, (uint16_t)h, 1);
            return 1;
        }
    }
    if (vq->shadow_avail_idx == vq->last_avail_idx) {
        int n = vqd_avail_count(vq);
        if (n <= 0)
            return n;
    }
    /* §2.7.6: ring[last_avail_idx mod Queue Size] is the next head. */
    uint16_t head = __atomic_load_n(&vq->avail->ring[vq->last_avail_idx & (vq->num - 1)],
                                    __ATOMIC_RELAXED);
    if (UNLIKELY(head >= vq->num))
        return vqd_broken(vq, "avail->ring[%u] holds head %u >= queue size %u (VIRTIO 1.2 §2.7.6)",
                          vq->last_avail_idx & (vq->num - 1), head, vq->num);
    int rc = map_chain(vq, head, e, iov, max_iov);
    if (UNLIKELY(rc < 0))
        return rc == VQD_E_MISS ? 0 : rc;   /* an IOTLB miss: the chain stays in the ring */
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_popped(vq, head, 0);
    vq->last_avail_idx++;
    return 1;
}

int vqd_vq_pop(struct vqd_vq *vq, struct vqd_elem *elems, int max_elems,
               struct vqd_iov *iov, int max_iov)
{
    int rc;
    VQD_VQ_GUARDED(vq, rc, vqd_pop_batch(vq, elems, max_elems, iov, max_iov, vqd_pop_one),
                rc = vqd_fault_broken(vq));
    return rc;
}

/* Copy between iovecs of popped chains and a caller's buffer, under the
 * SIGBUS guard (the Python side of the data path: the net paths copy inside
 * their own guarded bursts). to_guest: buf -> iov, else iov -> buf. At most
 * len bytes; returns the bytes copied, or VQD_E_BROKEN with vq marked broken
 * when the memory behind an iovec was truncated (the fault's guest-physical
 * address in the reason). */
static int64_t iov_copy(const struct vqd_iov *iov, int n, uint8_t *buf, uint64_t len, int to_guest)
{
    uint64_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        uint64_t k = iov[i].len < len - done ? iov[i].len : len - done;
        if (to_guest)
            memmove(iov[i].base, buf + done, k);
        else
            memmove(buf + done, iov[i].base, k);
        done += k;
    }
    return (int64_t)done;
}

int64_t vqd_vq_copy_iov(struct vqd_vq *vq, const struct vqd_iov *iov, int n, uint8_t *buf,
                        uint64_t len, int to_guest)
{
    int64_t rc;
    if (n < 0)
        return VQD_E_INVAL;
    VQD_VQ_GUARDED(vq, rc, iov_copy(iov, n, buf, len, to_guest), rc = vqd_fault_broken(vq));
    return rc;
}

/* Give back the last n popped (not yet used) chains, like vu_queue_rewind. */
int vqd_vq_rewind(struct vqd_vq *vq, int n)
{
    if (UNLIKELY(vq->inflight != NULL)) {
        vqd_inflight_rewind(vq, n);
        return VQD_OK;
    }
    vq->last_avail_idx -= (uint16_t)n;
    return VQD_OK;
}

int vqd_vq_fill(struct vqd_vq *vq, uint32_t head, uint32_t len)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    if (head >= vq->num || vq->used_pending >= vq->num)
        return VQD_E_INVAL;
    int rc;
    VQD_GUARDED(rc, (vqd_fill(vq, head, len), VQD_OK), rc = vqd_fault_broken(vq));
    return rc;
}

int vqd_vq_flush(struct vqd_vq *vq)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    int n = vq->used_pending, rc;
    VQD_GUARDED(rc, (vqd_flush(vq), n), rc = vqd_fault_broken(vq));
    return rc;
}

static int push(struct vqd_vq *vq, const uint32_t *heads, const uint32_t *lens, int n)
{
    for (int i = 0; i < n; i++)
        vqd_fill(vq, heads[i], lens[i]);
    vqd_flush(vq);
    return n;
}

int vqd_vq_push(struct vqd_vq *vq, const uint32_t *heads, const uint32_t *lens, int n)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    if (n < 0 || n > (int)vq->num - vq->used_pending)
        return VQD_E_INVAL;
    for (int i = 0; i < n; i++)
        if (heads[i] >= vq->num)
            return VQD_E_INVAL;
    int rc;
    VQD_GUARDED(rc, push(vq, heads, lens, n), rc = vqd_fault_broken(vq));
    return rc;
}

int vqd_should_notify(struct vqd_vq *vq)
{
    uint16_t old, new_idx;
    int valid;
    /* used->idx must be visible before we read what the driver asked for. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vq->event_idx)
        return !(__atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
    valid = vq->signalled_used_valid;
    vq->signalled_used_valid = 1;
    old = vq->signalled_used;
    new_idx = vq->signalled_used = vq->used_idx;
    return !valid || vqd_need_event(__atomic_load_n(used_event_ptr(vq), __ATOMIC_RELAXED), new_idx, old);
}

int vqd_vq_should_notify(struct vqd_vq *vq)
{
    int rc;
    VQD_GUARDED(rc, vqd_should_notify(vq), rc = vqd_fault_broken(vq));
    return rc;
}

int vqd_vq_notify(struct vqd_vq *vq)
{
    uint64_t now = 0;
    int rc;
    VQD_GUARDED(rc, vqd_notify(vq, &now), rc = vqd_fault_broken(vq));
    return rc;
}

/* Enable or disable available buffer notifications (kicks), §2.7.10.
 * Without EVENT_IDX: VRING_USED_F_NO_NOTIFY in used->flags. With EVENT_IDX
 * the driver ignores the flags: enabling writes avail_event =
 * last_avail_idx ("kick me for the next buffer"); disabling leaves it stale,
 * so the driver kicks at most once more until the index wraps (as Linux
 * vhost does). After enabling, returns how many entries are already
 * available (the driver may have added them before seeing the change): the
 * caller must service them instead of sleeping. */
static int set_notification(struct vqd_vq *vq, int enable)
{
    vq->notify_enabled = !!enable;
    if (vq->event_idx) {
        if (enable)
            __atomic_store_n(avail_event_ptr(vq), vq->last_avail_idx, __ATOMIC_RELAXED);
    } else {
        uint16_t f = __atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED);
        f = enable ? (f & ~VRING_USED_F_NO_NOTIFY) : (f | VRING_USED_F_NO_NOTIFY);
        __atomic_store_n(&vq->used->flags, f, __ATOMIC_RELAXED);
    }
    if (!enable)
        return 0;
    /* Our write must be visible before we look at avail->idx again. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vqd_avail_count(vq);
}

int vqd_vq_set_notification(struct vqd_vq *vq, int enable)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    VQD_GUARDED(rc, set_notification(vq, enable), rc = vqd_fault_broken(vq));
    return rc;
}

/* Read the kick eventfd without blocking (the fd must be O_NONBLOCK) and
 * add its counter to kicks (and log a kick event carrying it); returns the
 * count read. */
int vqd_vq_drain_kick(struct vqd_vq *vq)
{
    uint64_t v = 0;
    ssize_t r;
    if (vq->kick_fd < 0)
        return 0;
    do
        r = read(vq->kick_fd, &v, sizeof(v));
    while (r < 0 && errno == EINTR);
    if (r != sizeof(v))
        return 0;
    vq->kicks += v;
    /* An eventfd counter above 2^32 - 1 would need 4 billion unread kicks. */
    uint64_t now = 0;
    vqd_ev_record(vq, VQD_EV_KICK, v > UINT32_MAX ? UINT32_MAX : (uint32_t)v, &now);
    return v > INT32_MAX ? INT32_MAX : (int)v;
}

/* What a kicked device that cannot work does (a stalled vq,
 * VQD_FAULT_STALL): read avail->idx (shadow_avail_idx moves: it noticed
 * the entries) and ask for a kick at the next entry published after those,
 * as Linux vhost_enable_notify does (avail_event = the avail_idx it read,
 * §2.7.10; without EVENT_IDX, VRING_USED_F_NO_NOTIFY clear), re-reading
 * avail->idx after a full fence until it is stable (at most 4 times) so
 * that the driver's next publish kicks. Returns the entries available
 * beyond last_avail_idx. */
static int notice(struct vqd_vq *vq)
{
    int n = 0;
    vq->notify_enabled = 1;
    for (int i = 0; i < 4; i++) {
        uint16_t seen = vq->shadow_avail_idx;
        n = vqd_avail_count(vq);
        if (n < 0)
            return n;
        if (i > 0 && vq->shadow_avail_idx == seen)
            break;
        if (vq->event_idx) {
            __atomic_store_n(avail_event_ptr(vq), vq->shadow_avail_idx, __ATOMIC_RELAXED);
        } else {
            uint16_t f = __atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED);
            __atomic_store_n(&vq->used->flags, (uint16_t)(f & ~VRING_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
        }
        /* our write must be visible before we look at avail->idx again */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    return n;
}

int vqd_vq_notice(struct vqd_vq *vq)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    VQD_GUARDED(rc, notice(vq), rc = vqd_fault_broken(vq));
    return rc;
}
