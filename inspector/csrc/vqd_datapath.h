/* The back-end's data path for split virtqueues (VIRTIO 1.2 §2.7), device side.
 *
 * A struct vqd_vq is one ring the device services: host pointers to its
 * three areas (the caller translated the front-end's addresses through the
 * region table), the region table that maps descriptor addresses, and the
 * device's private state (last_avail_idx, shadow used idx, notification
 * state, counters). Nothing here allocates; every chain walk is bounded by
 * the queue size (or the indirect table's size) and every guest address is
 * checked against the region table. A violation latches `broken` with a
 * reason and the queue does no more work; it never crashes or hangs.
 *
 * Functions return a count (>= 0) or a negative VQD_E_* status; the Python
 * wrapper (inspector/vqd.py, data path section) turns those into exceptions.
 *
 * Threading: one thread services a vq at a time (the device's worker); the
 * driver runs concurrently on another CPU and only shares ring memory.
 *
 * Faults: a front-end may shrink the memory behind a region after
 * SET_MEM_TABLE (ftruncate of its memfd); touching the lost pages raises
 * SIGBUS. vqd_guard_install() installs a process-wide SIGBUS handler (once;
 * faults outside our guarded sections go to the handler that was there
 * before, or the default action). Every exported function that touches guest
 * memory runs its body under a thread-local sigsetjmp (one per call, i.e. per
 * burst, not per descriptor): a SIGBUS there jumps back, the queue(s) of the
 * call are marked broken with the faulting guest-physical address, and the
 * call returns VQD_E_BROKEN (vqd_snapshot_guarded: VQD_E_FAULT). Nothing in
 * a guarded section takes a lock or allocates, so abandoning it is safe;
 * writes it did to the (hostile) ring may be partial.
 *
 * Event log: a vq may carry a struct vqd_evlog, a single-producer (the
 * worker servicing the vq) / single-consumer (vqd_vq_drain_events, called
 * by one thread at a time) ring of timed events, recorded exactly where the
 * kicks / calls / calls_suppressed counters move. When it is full an event
 * is counted in `dropped` and lost: the data path never waits for a reader.
 */
#ifndef VQD_DATAPATH_H
#define VQD_DATAPATH_H

#include <stdint.h>
#include "vqd_ring.h"

struct vqd_snap_out; /* vqd_decode.h */
struct vqd_inflight; /* vqd_inflight.h */

/* CDEF BEGIN */
#define VQD_OK 0
#define VQD_E_BROKEN -1   /* the queue (or the peer queue) is broken; see reason */
#define VQD_E_NOSPACE -2  /* the caller's iovec array cannot hold the next chain */
#define VQD_E_IO -3       /* a tap read/write failed; errno in scratch->err */
#define VQD_E_INVAL -4    /* bad argument from the caller (not the driver) */
#define VQD_E_FAULT -5    /* guest memory faulted (SIGBUS): vqd_guard_fault_addr() says where */

#define VQD_NET_IOV 1024     /* iovecs per frame in the net scratch */
#define VQD_NET_FRAME_MAX 65536

/* Same layout as struct iovec on LP64 (checked in vqd_datapath.c). */
struct vqd_iov {
    uint8_t *base;
    uint64_t len;
};

/* One popped chain: its iovecs are iov[iov_idx .. iov_idx + out_num + in_num),
 * device-readable ones first (§2.7.4.2). */
struct vqd_elem {
    uint32_t head;
    uint32_t iov_idx;
    uint32_t out_num;
    uint32_t in_num;
    uint64_t out_len;
    uint64_t in_len;
};

/* Event kinds (inspector/events.py KINDS names them). */
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

struct vqd_vq {
    uint32_t num;
    struct vqd_desc *desc;
    struct vqd_avail *avail;
    struct vqd_used *used;
    const struct vqd_region *regions;
    int nregions;
    uint16_t last_avail_idx;
    uint16_t shadow_avail_idx;   /* last avail->idx read */
    uint16_t used_idx;           /* shadow of used->idx (what we published) */
    uint16_t used_pending;       /* used elems written, not yet published */
    uint16_t signalled_used;
    uint8_t signalled_used_valid;
    uint8_t event_idx;           /* VIRTIO_RING_F_EVENT_IDX negotiated */
    uint8_t notify_enabled;      /* kicks wanted (NO_NOTIFY clear / avail_event set) */
    uint8_t broken;
    uint8_t reject_zero_len;     /* a 0-length descriptor breaks the queue (as in QEMU) */
    int call_fd;                 /* -1: none */
    int kick_fd;                 /* -1: none */
    uint64_t kicks;
    uint64_t calls;
    uint64_t calls_suppressed;
    uint64_t packets;
    uint64_t bytes;
    uint64_t drops;
    struct vqd_evlog *evlog;     /* NULL: no event log; set after vqd_vq_init */
    struct vqd_inflight *inflight; /* NULL: no inflight tracking (vqd_inflight.h) */
    char reason[160];
};

/* Per-worker scratch for the net fast paths (allocate once, reuse). */
struct vqd_net_scratch {
    struct vqd_iov tx_iov[1024];
    struct vqd_iov rx_iov[1024];
    int rx_starved;      /* out: stopped because RX had no buffers */
    int tx_blocked;      /* out: the tap would block on write */
    int err;             /* out: errno of the failed tap call */
    uint32_t pending_len;  /* tap RX: bytes of a frame read but not delivered */
    uint8_t buf[65536];
};

int vqd_guard_install(void);
uint64_t vqd_guard_fault_addr(void);
int vqd_snapshot_guarded(const struct vqd_region *regions, int nr_regions,
                         const struct vqd_region *valid, int nr_valid,
                         uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t size, int32_t last_avail_idx, uint32_t max_descs,
                         struct vqd_snap_out *out);

int vqd_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx);

int vqd_vq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *avail, void *used,
                const struct vqd_region *regions, int nregions, uint16_t last_avail_idx,
                int event_idx, int call_fd, int kick_fd);
int vqd_vq_avail_count(struct vqd_vq *vq);
int vqd_vq_pop(struct vqd_vq *vq, struct vqd_elem *elems, int max_elems,
               struct vqd_iov *iov, int max_iov);
int vqd_vq_rewind(struct vqd_vq *vq, int n);
int64_t vqd_vq_copy_iov(struct vqd_vq *vq, const struct vqd_iov *iov, int n, uint8_t *buf,
                        uint64_t len, int to_guest);
int vqd_vq_fill(struct vqd_vq *vq, uint32_t head, uint32_t len);
int vqd_vq_flush(struct vqd_vq *vq);
int vqd_vq_push(struct vqd_vq *vq, const uint32_t *heads, const uint32_t *lens, int n);
int vqd_vq_should_notify(struct vqd_vq *vq);
int vqd_vq_notify(struct vqd_vq *vq);
int vqd_vq_set_notification(struct vqd_vq *vq, int enable);
int vqd_vq_drain_kick(struct vqd_vq *vq);
void vqd_vq_set_broken(struct vqd_vq *vq, const char *reason);

int vqd_evlog_init(struct vqd_evlog *log, struct vqd_event *buf, uint32_t capacity);
int vqd_vq_events_pending(struct vqd_vq *vq);
int vqd_vq_drain_events(struct vqd_vq *vq, struct vqd_event *out, int max);
uint64_t vqd_vq_events_dropped(struct vqd_vq *vq);

int vqd_net_loopback(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                     int budget, int spin, struct vqd_net_scratch *s);
int vqd_net_tap_tx(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget,
                   struct vqd_net_scratch *s);
int vqd_net_tap_rx(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                   struct vqd_net_scratch *s);
/* CDEF END */

#endif
