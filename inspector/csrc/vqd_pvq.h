/* The device side of a packed virtqueue (VIRTIO 1.2 §2.8): the public API
 * of vqd_pvq.c, the packed sibling of vqd_vq.h (split, §2.7).
 *
 * A packed ring is a struct vqd_vq with pdesc set (vqd_pvq_init): the
 * descriptor ring, the driver's event suppression area (it says when the
 * driver wants calls), the device's (we say when we want kicks), the
 * device's positions (last_avail_idx + avail_wrap_counter: the next slot to
 * read; used_idx + used_wrap_counter: next_used) and the used descriptors
 * not yet written (pused, caller-allocated, one per chain). Counters, the
 * event log, faults, broken/reason, the kick/call fds and the copy helpers
 * are the split ring's (vqd_vq.h: vqd_vq_drain_kick, vqd_vq_copy_iov,
 * vqd_vq_set_broken, the event log functions work on both layouts).
 *
 * Statuses as in vqd_vq.h (a count >= 0 or a negative VQD_E_*). Every
 * exported function that touches guest memory runs under the SIGBUS guard.
 */
#ifndef VQD_PVQ_H
#define VQD_PVQ_H

#include <stdint.h>
#include "vqd_vq.h"

/* CDEF BEGIN */
/* One used descriptor waiting to be written (vqd_pvq_flush): the buffer
 * id, the bytes written into the buffer, and the ring slots the chain took. */
struct vqd_pused {
    uint16_t id;
    uint16_t ndescs;
    uint32_t len;
};

int vqd_pvq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *driver_event,
                 void *device_event, struct vqd_pused *pused,
                 const struct vqd_region *regions, int nregions,
                 uint16_t last_avail_idx, int avail_wrap_counter,
                 uint16_t next_used, int used_wrap_counter,
                 int event_idx, int call_fd, int kick_fd);
int vqd_pvq_avail_count(struct vqd_vq *vq);
int vqd_pvq_pop(struct vqd_vq *vq, struct vqd_elem *elems, int max_elems,
                struct vqd_iov *iov, int max_iov);
int vqd_pvq_rewind(struct vqd_vq *vq, uint32_t ndescs);
int vqd_pvq_fill(struct vqd_vq *vq, uint32_t id, uint32_t len, uint32_t ndescs);
int vqd_pvq_flush(struct vqd_vq *vq);
int vqd_pvq_should_notify(struct vqd_vq *vq);
int vqd_pvq_notify(struct vqd_vq *vq);
int vqd_pvq_set_notification(struct vqd_vq *vq, int enable);
int vqd_pvq_notice(struct vqd_vq *vq);
/* CDEF END */

#endif
