/* The device side of a split virtqueue (VIRTIO 1.2 §2.7): the public API of
 * vqd_vq.c, and the data path's status family (VQD_OK / negative VQD_E_*)
 * shared by vqd_vq.c, vqd_evlog.c, vqd_net.c and vqd_inflight.c.
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
 * side (inspector/_cffi.py, check) turns those into exceptions. The
 * decoder's VQD_SNAP_* statuses (vqd_decode.h, vqd_guard.h) are another
 * family and never mix with these.
 *
 * Threading: one thread services a vq at a time (the device's worker); the
 * driver runs concurrently on another CPU and only shares ring memory.
 * Every exported function that touches guest memory runs under the SIGBUS
 * guard (vqd_guard.h): a fault breaks the queue and returns VQD_E_BROKEN.
 */
#ifndef VQD_VQ_H
#define VQD_VQ_H

#include <stdint.h>
#include "vqd_ring.h"

struct vqd_evlog;    /* vqd_evlog.h */
struct vqd_pused;    /* vqd_pvq.h */
struct vqd_inflight; /* vqd_inflight.h */
struct vqd_iotlb;    /* vqd_iotlb.h */

/* CDEF BEGIN */
#define VQD_OK 0
#define VQD_E_BROKEN -1   /* the queue (or the peer queue) is broken; see reason */
#define VQD_E_NOSPACE -2  /* the caller's iovec array cannot hold the next chain */
#define VQD_E_IO -3       /* a tap read/write failed; errno in scratch->err */
#define VQD_E_INVAL -4    /* bad argument from the caller (not the driver) */
#define VQD_E_MISS -5     /* internal: an IOTLB miss (pop turns it into 0: the chain waits) */

/* Faults on purpose (vqd_vq.fault, set by the thread servicing the vq;
 * inspector/faults.py): */
#define VQD_FAULT_STALL 1       /* pop nothing (the device stopped serving the vring) */
#define VQD_FAULT_DROP_CALLS 2  /* a due call is not written: counted in calls_dropped */

/* Same layout as struct iovec on LP64 (checked in vqd_vq.c). */
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
    uint32_t ndescs;   /* packed rings: ring slots the chain took (next_used advances by it, §2.8.21) */
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
    uint8_t fault;               /* VQD_FAULT_* bits; 0: none */
    int call_fd;                 /* -1: none */
    int kick_fd;                 /* -1: none */
    uint64_t kicks;
    uint64_t calls;
    uint64_t calls_suppressed;
    uint64_t packets;
    uint64_t bytes;
    uint64_t drops;              /* frames lost (RX: no buffer, too small, stalled) */
    uint64_t calls_dropped;      /* calls due but not written (VQD_FAULT_DROP_CALLS) */
    struct vqd_evlog *evlog;     /* NULL: no event log; set after vqd_vq_init (vqd_evlog.h) */
    struct vqd_inflight *inflight; /* NULL: no inflight tracking (vqd_inflight.h) */
    /* VIRTIO_F_ACCESS_PLATFORM (vqd_iotlb.h): NULL, buffer addresses are
     * guest-physical (the region table); else IOVAs translated through it.
     * A buffer with no entry is an IOTLB miss: the chain is left in the ring
     * (pop returns 0) and miss_* say what to ask the front-end for. */
    struct vqd_iotlb *iotlb;
    uint64_t miss_iova;          /* the IOVA of the last miss */
    uint64_t miss_updates;       /* the IOTLB's update count at that miss */
    uint64_t iotlb_misses;       /* misses met (a chain retried counts again) */
    uint8_t miss_perm;           /* VQD_ACCESS_* the access needed */
    uint8_t miss_new;            /* set at each miss; the worker clears it when it has asked */
    /* Packed rings only (VIRTIO 1.2 §2.8, vqd_pvq.c; pdesc NULL: a split ring). For
     * them last_avail_idx is the device's next slot to read, used_idx its
     * next_used slot, used_pending the used descriptors waiting in pused, and
     * signalled_used the next_used of the last call decision. */
    struct vqd_pdesc *pdesc;
    struct vqd_pevent *driver_event;   /* driver-written: used buffer notifications (calls) */
    struct vqd_pevent *device_event;   /* device-written: available buffer notifications (kicks) */
    struct vqd_pused *pused;           /* [num] used descriptors not yet written (caller's memory) */
    uint32_t used_since_signal;        /* descriptors used since the last call decision */
    uint8_t avail_wrap_counter;
    uint8_t used_wrap_counter;
    uint8_t signalled_used_wrap;
    uint8_t in_order;                  /* VIRTIO_F_IN_ORDER negotiated: vqd_pflush writes one used
                                        * descriptor for a run of chains the device wrote nothing
                                        * into (§2.8.8); set by the caller after vqd_pvq_init */
    char reason[160];
};

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
int vqd_vq_notice(struct vqd_vq *vq);
void vqd_vq_set_broken(struct vqd_vq *vq, const char *reason);
int vqd_vq_iotlb_waiting(const struct vqd_vq *vq);
/* CDEF END */

#endif
