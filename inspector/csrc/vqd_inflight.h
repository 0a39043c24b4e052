/* Inflight I/O tracking for split virtqueues: the vhost-user spec's
 * "Inflight I/O tracking" (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and
 * libvhost-user's VuVirtqInflight.
 *
 * The front-end keeps a shared area (GET_INFLIGHT_FD / SET_INFLIGHT_FD) that
 * outlives the back-end process. Per queue it holds a 16-byte header and one
 * 16-byte state per descriptor. The data path marks a head in flight when it
 * takes it from the avail ring, links the heads of each batch of used
 * elements before it publishes used->idx, and clears them after. A back-end
 * started on a used area (vqd_inflight_attach) first finishes the bookkeeping
 * of a batch that was published but not cleared, then hands back every head
 * still in flight, in the order they were taken, before anything new from the
 * avail ring: each descriptor is returned exactly once across a crash.
 *
 * The area is shared with the front-end, so it is untrusted: attach reads
 * every field once, bounds every index by the ring size and every list walk
 * by the queue size, and marks the queue broken (vqd_vq_set_broken) with the
 * field and value when the area is inconsistent.
 *
 * vqd_inflight_attach allocates nothing: the caller gives it three arrays of
 * `num` entries (inspector/datapath/inflight.py does) that live as long as the vq.
 */
#ifndef VQD_INFLIGHT_H
#define VQD_INFLIGHT_H

#include <stdint.h>
#include "vqd_vq.h"

/* CDEF BEGIN */
#define VQD_INFLIGHT_VERSION 1      /* QueueRegionSplit.version; 0: area never used */
#define VQD_INFLIGHT_ALIGN 64       /* each queue's area is aligned up to this */

/* DescStateSplit: 16 bytes per descriptor of the ring. */
struct vqd_inflight_desc {
    uint8_t inflight;     /* 1: head taken from the avail ring, not yet in used */
    uint8_t padding[5];
    uint16_t next;        /* link of the last batch of used heads */
    uint64_t counter;     /* order in which the heads were taken */
};

/* QueueRegionSplit header; desc[desc_num] follows it. */
struct vqd_inflight_region {
    uint64_t features;        /* 0 */
    uint16_t version;         /* VQD_INFLIGHT_VERSION once initialised */
    uint16_t desc_num;        /* entries of desc[] (the ring size) */
    uint16_t last_batch_head; /* head of the list of the last used batch */
    uint16_t used_idx;        /* used->idx once the last batch was cleared */
};

/* One head to hand back after a restart, with its counter. */
struct vqd_inflight_slot {
    uint64_t counter;
    uint32_t head;
    uint32_t pad;
};

/* The back-end's private tracking state of one vq (vq->inflight). */
struct vqd_inflight {
    struct vqd_inflight_region *region;
    struct vqd_inflight_desc *desc;
    uint32_t capacity;                 /* desc[] entries the area holds */
    uint32_t mask;                     /* num - 1 */
    uint64_t counter;                  /* counter of the next head taken */
    struct vqd_inflight_slot *resubmit; /* [num]: heads to hand back first, by counter */
    uint32_t resubmit_num;
    uint32_t resubmit_pos;             /* next one to hand back */
    uint16_t *batch;                   /* [num]: heads filled, not yet published */
    uint32_t *pop_log;                 /* [num]: last pops, head | VQD_INFLIGHT_RESUBMITTED */
    uint32_t pop_log_w;                /* next slot of pop_log */
    uint32_t pop_log_n;                /* valid entries of pop_log (<= num) */
    uint32_t recovered_batch;          /* out of attach: heads of an unfinished batch cleared */
};

uint64_t vqd_inflight_queue_size(uint32_t queue_size);
int vqd_inflight_attach(struct vqd_vq *vq, struct vqd_inflight *inf, void *area, uint64_t area_size,
                        struct vqd_inflight_slot *resubmit, uint16_t *batch, uint32_t *pop_log);
int vqd_inflight_count(struct vqd_vq *vq);
/* CDEF END */

#define VQD_INFLIGHT_RESUBMITTED 0x10000u

/* Data path hooks (vqd_vq.c and vqd_vq_impl.h call them only when vq->inflight is set). */
int vqd_inflight_next_resubmit(struct vqd_vq *vq);
int vqd_inflight_pending(struct vqd_vq *vq);
void vqd_inflight_popped(struct vqd_vq *vq, uint16_t head, int resubmitted);
void vqd_inflight_rewind(struct vqd_vq *vq, int n);
void vqd_inflight_filled(struct vqd_vq *vq, uint16_t pos, uint32_t head);
void vqd_inflight_pre_publish(struct vqd_vq *vq, uint16_t n);
void vqd_inflight_post_publish(struct vqd_vq *vq, uint16_t n, uint16_t new_idx);

#endif
