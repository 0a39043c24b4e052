/* virtio-net's fast paths in the back-end (VIRTIO 1.2 §5.1.6): the public
 * API of vqd_net.c. Each call moves a burst of frames between a transmit
 * and a receive vq (loopback) or between a vq and a tap fd, without the GIL.
 * Returns the frames done (>= 0) or a negative VQD_E_* status (vqd_vq.h);
 * VQD_E_IO leaves the tap's errno in the scratch.
 */
#ifndef VQD_NET_H
#define VQD_NET_H

#include <stdint.h>
#include "vqd_vq.h"

/* CDEF BEGIN */
#define VQD_NET_IOV 1024     /* iovecs per frame in the net scratch */
#define VQD_NET_FRAME_MAX 65536

/* Per-worker scratch for the net fast paths (allocate once, reuse). */
struct vqd_net_scratch {
    struct vqd_iov tx_iov[1024];
    struct vqd_iov rx_iov[1024];
    int rx_starved;      /* out: RX had no buffers (tap: stopped; loopback: frames dropped) */
    int tx_blocked;      /* out: the tap would block on write */
    int err;             /* out: errno of the failed tap call */
    uint32_t pending_len;  /* tap RX: bytes of a frame read but not delivered */
    uint8_t buf[65536];
};

int vqd_net_loopback(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                     int budget, int spin, struct vqd_net_scratch *s);
int vqd_net_tap_tx(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget,
                   struct vqd_net_scratch *s);
int vqd_net_tap_rx(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                   struct vqd_net_scratch *s);
/* CDEF END */

#endif
