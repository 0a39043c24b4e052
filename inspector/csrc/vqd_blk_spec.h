/* virtio-blk's wire format (VIRTIO 1.2 §5.2.6), the C copy of the numbers in
 * inspector/spec/virtio.py, for the blk back-end's data path (vqd_blk.c) and
 * the load generator's driver side (vqd_blkload.c). They are in the CDEF
 * block so that inspector/_cffi.py can check at import that both copies agree.
 */
#ifndef VQD_BLK_SPEC_H
#define VQD_BLK_SPEC_H

#include <stdint.h>

/* CDEF BEGIN */
#define VIRTIO_BLK_REQ_HDR_SIZE 16
#define VIRTIO_BLK_SECTOR_SIZE 512
#define VIRTIO_BLK_SECTOR_SHIFT 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_GET_LIFETIME 10
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_T_SECURE_ERASE 14
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_DISCARD_SEGMENT_SIZE 16
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1

/* struct virtio_blk_outhdr: the request's device-readable header. */
struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;   /* "reserved" in VIRTIO 1.2 */
    uint64_t sector;   /* 512-byte units */
};

/* struct virtio_blk_discard_write_zeroes: one DISCARD/WRITE_ZEROES segment. */
struct virtio_blk_discard_write_zeroes {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;    /* bit 0: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP */
};
/* CDEF END */

#endif
