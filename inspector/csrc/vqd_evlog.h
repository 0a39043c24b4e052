/* Per-queue event log: a struct vqd_evlog hangs off a vq (vq->evlog) and
 * holds the queue's timed kicks, calls and suppressed calls.
 *
 * It is a single-producer (the worker servicing the vq, through
 * vqd_ev_record below, called exactly where the kicks / calls /
 * calls_suppressed counters move in vqd_vq.c) / single-consumer
 * (vqd_vq_drain_events, called by one thread at a time) ring. When it is
 * full an event is counted in `dropped` and lost: the data path never waits
 * for a reader. The log touches no guest memory (the caller allocates it),
 * so it needs no SIGBUS guard.
 */
#ifndef VQD_EVLOG_H
#define VQD_EVLOG_H

#include <stdint.h>
#include <time.h>
#include "vqd_vq.h"

/* CDEF BEGIN */
/* Event kinds (inspector/events.py EVENT_KIND_CODES names them). */
#define VQD_EV_KICK 1             /* value: the kick eventfd's counter read (kicks coalesced) */
#define VQD_EV_CALL 2             /* value: used_idx when the call eventfd was written */
#define VQD_EV_CALL_SUPPRESSED 3  /* value: used_idx when the driver did not want a call */
#define VQD_EVLOG_DEFAULT 8192    /* entries per vring log (128 KiB) */

/* One timed event: 16 bytes, time in ns since the epoch (CLOCK_REALTIME). */
struct vqd_event {
    uint64_t time_ns;
    uint32_t kind;
    uint32_t value;
};

/* The log: ev[capacity], capacity = mask + 1, a power of two. head and
 * dropped are written only by the producer, tail only by the consumer;
 * head is published with release and read with acquire (and tail the
 * other way), so an entry is complete before it is seen and read before
 * it is overwritten. tail_cache is the producer's private copy of tail. */
struct vqd_evlog {
    struct vqd_event *ev;
    uint32_t mask;
    uint64_t head;
    uint64_t tail;
    uint64_t tail_cache;
    uint64_t dropped;
};

int vqd_evlog_init(struct vqd_evlog *log, struct vqd_event *buf, uint32_t capacity);
int vqd_vq_events_pending(struct vqd_vq *vq);
int vqd_vq_drain_events(struct vqd_vq *vq, struct vqd_event *out, int max);
uint64_t vqd_vq_events_dropped(struct vqd_vq *vq);
/* CDEF END */

/* The producer side, inlined into the data path (vqd_vq.c, vqd_net.c). */

static inline uint64_t vqd_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Append one event, or count it in dropped when the log is full; never
 * blocks. *now is the event's time: 0 means "read the clock" (a vDSO
 * clock_gettime, the main cost of a record) and the value read is left
 * there, so the calls and suppressed calls that end one burst on several
 * queues share one reading. */
static inline void vqd_ev_record(struct vqd_vq *vq, uint32_t kind, uint32_t value, uint64_t *now)
{
    struct vqd_evlog *l = vq->evlog;
    if (!l)
        return;
    uint64_t h = __atomic_load_n(&l->head, __ATOMIC_RELAXED);
    if (UNLIKELY(h - l->tail_cache > l->mask)) {
        /* Looks full: see how far the consumer got. Acquire: its reads of
         * the slots it freed are done before we overwrite them. */
        l->tail_cache = __atomic_load_n(&l->tail, __ATOMIC_ACQUIRE);
        if (h - l->tail_cache > l->mask) {
            __atomic_store_n(&l->dropped, l->dropped + 1, __ATOMIC_RELAXED);
            return;
        }
    }
    if (!*now)
        *now = vqd_realtime_ns();
    struct vqd_event *e = &l->ev[h & l->mask];
    e->time_ns = *now;
    e->kind = kind;
    e->value = value;
    /* Release: the entry is written before the consumer can see it. */
    __atomic_store_n(&l->head, h + 1, __ATOMIC_RELEASE);
}

#endif
