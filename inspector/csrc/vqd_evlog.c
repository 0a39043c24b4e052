/* The event log's consumer side and set-up (see vqd_evlog.h): one log per
 * vq, filled by the data path (vqd_ev_record, inlined into vqd_vq.c and
 * vqd_net.c) and drained by one reader thread at a time.
 *
 * Spec: none of its own; it times the notifications of VIRTIO 1.2 §2.7.10
 * (available buffer notifications = kicks, used buffer notifications =
 * calls) as the device sees them.
 *
 * Guards: no guest memory is touched here (the log lives in memory the
 * caller allocated), so nothing runs under the SIGBUS guard; the
 * producer/consumer split and the memory ordering are described in
 * vqd_evlog.h.
 */
#include <string.h>

#include "vqd_evlog.h"

_Static_assert(sizeof(struct vqd_event) == 16, "vqd_event is read as <QII by inspector/events.py");

int vqd_evlog_init(struct vqd_evlog *log, struct vqd_event *buf, uint32_t capacity)
{
    if (!log || !buf || capacity == 0 || (capacity & (capacity - 1)))
        return VQD_E_INVAL;
    memset(log, 0, sizeof(*log));
    log->ev = buf;
    log->mask = capacity - 1;
    return VQD_OK;
}

/* Events logged and not drained yet (the consumer's view: a lower bound
 * while the producer runs). */
int vqd_vq_events_pending(struct vqd_vq *vq)
{
    struct vqd_evlog *l = vq->evlog;
    if (!l)
        return 0;
    return (int)(__atomic_load_n(&l->head, __ATOMIC_ACQUIRE) - __atomic_load_n(&l->tail, __ATOMIC_RELAXED));
}

/* Copy up to max logged events, oldest first, into out and free their
 * slots; returns how many. One consumer at a time (the caller serialises). */
int vqd_vq_drain_events(struct vqd_vq *vq, struct vqd_event *out, int max)
{
    struct vqd_evlog *l = vq->evlog;
    if (max < 0)
        return VQD_E_INVAL;
    if (!l)
        return 0;
    uint64_t t = __atomic_load_n(&l->tail, __ATOMIC_RELAXED);
    uint64_t h = __atomic_load_n(&l->head, __ATOMIC_ACQUIRE);
    uint64_t n = h - t;
    if (n > (uint64_t)max)
        n = (uint64_t)max;
    /* At most two runs: up to the end of the array, then from its start. */
    uint64_t first = (t & l->mask) + n > (uint64_t)l->mask + 1 ? (uint64_t)l->mask + 1 - (t & l->mask) : n;
    memcpy(out, &l->ev[t & l->mask], first * sizeof(*out));
    memcpy(out + first, &l->ev[0], (n - first) * sizeof(*out));
    __atomic_store_n(&l->tail, t + n, __ATOMIC_RELEASE);
    return (int)n;
}

/* Events lost because the log was full, since the log was initialised. */
uint64_t vqd_vq_events_dropped(struct vqd_vq *vq)
{
    return vq->evlog ? __atomic_load_n(&vq->evlog->dropped, __ATOMIC_RELAXED) : 0;
}
