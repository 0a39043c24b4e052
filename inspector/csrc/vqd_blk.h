/* virtio-blk's data path in the back-end (VIRTIO 1.2 §5.2.6): the public API
 * of vqd_blk.c. One struct vqd_blk_queue services one requestq (a started
 * vq, split (vqd_vq.h) or packed (vqd_pvq.h) without VIRTIO_F_IN_ORDER, as
 * requests complete out of order) against one backing store (struct
 * vqd_blk_disk), without the GIL: vqd_blk_run pops requests, checks them, submits their I/O,
 * completes them (status byte, used element, call) and sleeps on the kick
 * eventfd, a wake eventfd and I/O completions together.
 *
 * I/O engine: io_uring (liburing). Why: it is truly asynchronous for
 * buffered and O_DIRECT files alike (Linux AIO is synchronous on buffered
 * files), so one thread per queue keeps many requests in flight; submission
 * is batched (one io_uring_enter for every request popped in a pass), there
 * is no thread pool to hand requests to and back, no GIL, and reads served
 * from the page cache complete inline at submission. Zero copy: the readv /
 * writev iovecs point straight into guest memory (the popped chain's struct
 * vqd_iov). If io_uring_queue_init fails (io_uring disabled by sysctl or
 * seccomp) the queue falls back to synchronous preadv/pwritev/fdatasync/
 * fallocate in the queue's thread, one request at a time
 * (vqd_blk_engine() says which, vqd_blk_uring_errno() why).
 *
 * Requests (§5.2.6): the header is the first 16 device-readable bytes (it may
 * span descriptors), the status the last byte of the last device-writable
 * descriptor, the data what lies between. Every request the ring rules allow
 * gets a status, never a broken queue: each check that fails counts a
 * VQD_BLK_BAD_* kind and sets the status that kind gives (VIRTIO_BLK_S_IOERR,
 * or UNSUPP for unknown types and unknown DISCARD/WRITE_ZEROES flags,
 * §5.2.6.2), and leaves its field and value in vqd_blk_last_bad(). A chain
 * the ring rules break (vqd_vq_pop) breaks the queue as for net.
 *
 * O_DIRECT (disk->direct): data buffers whose address or length is not a
 * multiple of the logical block size go through a bounce buffer (allocated
 * for the request, freed at its completion); offsets and lengths that are not
 * multiples of blk_size get IOERR (VQD_BLK_BAD_UNALIGNED): no read-modify-write.
 *
 * DISCARD is fallocate(PUNCH_HOLE | KEEP_SIZE) on a file, BLKDISCARD (inline,
 * in the queue's thread) on a block device; EOPNOTSUPP there is OK (a
 * discard is advisory, §5.2.6.2). WRITE_ZEROES is fallocate(ZERO_RANGE), or
 * PUNCH_HOLE with the UNMAP flag; a file that refuses them (tmpfs has no
 * ZERO_RANGE) gets zeros written instead, for that request and the queue's
 * later ones.
 *
 * Per-request state is a fixed array of `depth` slots allocated once; when
 * every slot is busy the queue stops popping until one completes. FLUSH is
 * an fdatasync issued after the completion of every write completed before
 * it. Writethrough (disk->writeback == 0): writes carry RWF_DSYNC.
 *
 * Guards: each pass that touches guest memory (header, status, segments,
 * GET_ID, bounce copies, the ring) runs under VQD_GUARDED (vqd_guard.h); a
 * SIGBUS breaks the queue. The kernel's own accesses for readv/writev into
 * truncated guest memory fail with EFAULT: that request gets IOERR (io_error).
 *
 * Threading: one thread runs vqd_blk_run at a time; vqd_blk_set_hold and the
 * counter / recent readers may run on other threads (counters are plain
 * 64-bit words, recent entries are sequence-checked).
 */
#ifndef VQD_BLK_H
#define VQD_BLK_H

#include <stdint.h>
#include "vqd_vq.h"

/* CDEF BEGIN */
/* Bad-request kinds (index into vqd_blk_counters.bad; names: vqd_blk_bad_name). */
#define VQD_BLK_BAD_NONE 0
#define VQD_BLK_BAD_HEADER_SHORT 1
#define VQD_BLK_BAD_STATUS_MISSING 2
#define VQD_BLK_BAD_STATUS_NOT_WRITABLE 3
#define VQD_BLK_BAD_DATA_NOT_WRITABLE 4
#define VQD_BLK_BAD_DATA_NOT_READABLE 5
#define VQD_BLK_BAD_OUT_OF_RANGE 6
#define VQD_BLK_BAD_SECTOR_OVERFLOW 7
#define VQD_BLK_BAD_UNALIGNED 8
#define VQD_BLK_BAD_TOO_MANY_SEGMENTS 9
#define VQD_BLK_BAD_SEGMENT_TOO_LARGE 10
#define VQD_BLK_BAD_READ_ONLY 11
#define VQD_BLK_BAD_UNSUPPORTED 12
#define VQD_BLK_BAD_GET_ID_SHORT 13
#define VQD_BLK_BAD_DISCARD_OVER_LIMIT 14
#define VQD_BLK_BAD_WRITE_ZEROES_OVER_LIMIT 15
#define VQD_BLK_BAD_DISCARD_BAD_SEGMENT 16
#define VQD_BLK_BAD_IO_ERROR 17
#define VQD_BLK_BAD_COUNT 18

/* Request classes counted in vqd_blk_counters.requests. */
#define VQD_BLK_REQ_IN 0
#define VQD_BLK_REQ_OUT 1
#define VQD_BLK_REQ_FLUSH 2
#define VQD_BLK_REQ_GET_ID 3
#define VQD_BLK_REQ_DISCARD 4
#define VQD_BLK_REQ_WRITE_ZEROES 5
#define VQD_BLK_REQ_OTHER 6
#define VQD_BLK_REQ_COUNT 7

#define VQD_BLK_RECENT 32          /* completed requests kept in the recent ring */
#define VQD_BLK_STATUS_NONE 255    /* recent.status of a request that had no status byte */
#define VQD_BLK_MAX_SEG_MAX 1024   /* seg_max at most (UIO_MAXIOV) */
#define VQD_BLK_MAX_DWZ_SEG 256    /* max_discard_seg / max_write_zeroes_seg at most */

#define VQD_BLK_ENGINE_AUTO 0
#define VQD_BLK_ENGINE_URING 1
#define VQD_BLK_ENGINE_SYNC 2

/* The backing store, one per device, shared by its queues (read only to
 * them, except writeback, which the device flips on SET_CONFIG). */
struct vqd_blk_disk {
    int fd;
    uint8_t readonly;
    uint8_t direct;                 /* fd has O_DIRECT */
    uint8_t writeback;              /* 0: writethrough, every write is RWF_DSYNC */
    uint8_t is_block;               /* a block device: DISCARD is BLKDISCARD */
    uint32_t blk_size;              /* logical block size, bytes */
    uint64_t capacity;              /* 512-byte sectors */
    uint32_t seg_max;               /* data segments per request */
    uint32_t size_max;              /* bytes per segment */
    uint32_t max_discard_sectors;   /* 0: DISCARD unsupported */
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors; /* 0: WRITE_ZEROES unsupported */
    uint32_t max_write_zeroes_seg;
    uint8_t serial[20];             /* GET_ID answer, NUL-padded */
};

/* Cumulative counters of one queue; single writer (the run thread). */
struct vqd_blk_counters {
    uint64_t requests[7];           /* by VQD_BLK_REQ_* */
    uint64_t status[3];             /* by VIRTIO_BLK_S_* */
    uint64_t bad[18];               /* by VQD_BLK_BAD_* ([0] unused) */
    uint64_t in_flight;             /* popped, not yet completed (held ones included) */
    uint64_t resubmitted;           /* taken back from the inflight area after a restart */
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t completed;
};

/* One completed request (the recent ring). */
struct vqd_blk_recent {
    uint64_t sector;
    uint32_t head;
    uint32_t type;                  /* the header's type; UINT32_MAX: no header */
    uint32_t data_len;
    uint8_t status;                 /* VIRTIO_BLK_S_*, or VQD_BLK_STATUS_NONE */
    uint8_t bad;                    /* VQD_BLK_BAD_*; 0: none */
    uint8_t pad[2];
};

struct vqd_blk_queue;

int vqd_blk_disk_probe(int fd, uint64_t *size, uint32_t *blk_size, int *is_block);
int vqd_blk_queue_new(struct vqd_vq *vq, const struct vqd_blk_disk *disk, uint32_t depth, int engine,
                      struct vqd_blk_queue **out);
int vqd_blk_run(struct vqd_blk_queue *q, int wake_fd, int timeout_ms);
int vqd_blk_set_hold(struct vqd_blk_queue *q, int hold);
int vqd_blk_drain(struct vqd_blk_queue *q, int complete);
void vqd_blk_queue_free(struct vqd_blk_queue *q);
const struct vqd_blk_counters *vqd_blk_counters(const struct vqd_blk_queue *q);
int vqd_blk_recent(const struct vqd_blk_queue *q, struct vqd_blk_recent *out, int max);
const char *vqd_blk_bad_name(int kind);
const char *vqd_blk_last_bad(const struct vqd_blk_queue *q);
int vqd_blk_engine(const struct vqd_blk_queue *q);
int vqd_blk_uring_errno(const struct vqd_blk_queue *q);
/* CDEF END */

#endif
