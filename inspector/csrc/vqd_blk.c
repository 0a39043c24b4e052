/* virtio-blk's data path (VIRTIO 1.2 §5.2.6) over io_uring: see vqd_blk.h
 * for the design (engine, zero copy, checks, guards, threading).
 *
 * A request's life: popped into a free slot (vqd_pop_one, its iovecs in the
 * slot's share of iov_pool); held there while the hold-io fault is on;
 * started (start: header, status, checks, then its I/O ops); completed when
 * its last op completes (finish: status byte, used element, counters,
 * recent ring). Used elements are filled in completion order and published
 * once per pass (vqd_flush), so the inflight area (vqd_inflight.c) stays
 * right with out-of-order completion; calls are decided by vqd_notify.
 *
 * One file on purpose (1100 lines): it is one job, one requestq's request
 * engine, whose stages (pop, check, issue, complete, publish) share the
 * private slot and queue structs and call each other as static functions;
 * splitting the checks from the engine would put those structs in a
 * header for two files that no one else may use.
 *
 * Spec: §5.2.6 (request layout, types, statuses, used length), §5.2.6.1 /
 * §5.2.6.2 (driver and device requirements: read-only, GET_ID, DISCARD and
 * WRITE_ZEROES segments and flags), §2.7.10 (kicks disabled while working).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#include "vqd_blk.h"
#include "vqd_blk_spec.h"
#include "vqd_vq_impl.h"
#include "vqd_pvq.h"
#include "vqd_pvq_impl.h"

_Static_assert(sizeof(struct virtio_blk_outhdr) == VIRTIO_BLK_REQ_HDR_SIZE, "§5.2.6 header is 16 bytes");
_Static_assert(sizeof(struct virtio_blk_discard_write_zeroes) == VIRTIO_BLK_DISCARD_SEGMENT_SIZE,
               "§5.2.6 discard segment is 16 bytes");
_Static_assert(sizeof(((struct vqd_blk_counters *)0)->requests) == VQD_BLK_REQ_COUNT * 8, "requests[]");
_Static_assert(sizeof(((struct vqd_blk_counters *)0)->status) == 3 * 8, "status[]");
_Static_assert(sizeof(((struct vqd_blk_counters *)0)->bad) == VQD_BLK_BAD_COUNT * 8, "bad[]");

static const char *const bad_names[VQD_BLK_BAD_COUNT] = {
    [VQD_BLK_BAD_NONE] = "",
    [VQD_BLK_BAD_HEADER_SHORT] = "header_short",
    [VQD_BLK_BAD_STATUS_MISSING] = "status_missing",
    [VQD_BLK_BAD_STATUS_NOT_WRITABLE] = "status_not_writable",
    [VQD_BLK_BAD_DATA_NOT_WRITABLE] = "data_not_writable",
    [VQD_BLK_BAD_DATA_NOT_READABLE] = "data_not_readable",
    [VQD_BLK_BAD_OUT_OF_RANGE] = "out_of_range",
    [VQD_BLK_BAD_SECTOR_OVERFLOW] = "sector_overflow",
    [VQD_BLK_BAD_UNALIGNED] = "unaligned",
    [VQD_BLK_BAD_TOO_MANY_SEGMENTS] = "too_many_segments",
    [VQD_BLK_BAD_SEGMENT_TOO_LARGE] = "segment_too_large",
    [VQD_BLK_BAD_READ_ONLY] = "read_only",
    [VQD_BLK_BAD_UNSUPPORTED] = "unsupported",
    [VQD_BLK_BAD_GET_ID_SHORT] = "get_id_short",
    [VQD_BLK_BAD_DISCARD_OVER_LIMIT] = "discard_over_limit",
    [VQD_BLK_BAD_WRITE_ZEROES_OVER_LIMIT] = "write_zeroes_over_limit",
    [VQD_BLK_BAD_DISCARD_BAD_SEGMENT] = "discard_bad_segment",
    [VQD_BLK_BAD_IO_ERROR] = "io_error",
};

/* io_uring user_data: an op of a slot is slot (bits 0-15), op kind (16-23),
 * expected result (24-55), tag 0; the queue's own polls carry a tag in the
 * top byte. (liburing's internal timeouts use UINT64_MAX: tag 0xff, ignored.) */
#define UD_TAG(ud) ((uint8_t)((ud) >> 56))
#define TAG_OP 0x00
#define TAG_KICK 0xA1
#define TAG_WAKE 0xA2      /* low 32 bits: the wake poll's generation */
#define TAG_HOLD 0xA3
#define TAG_IGNORE 0xA4    /* poll removals */
#define UD_MAKE(tag, low) (((uint64_t)(tag) << 56) | (uint64_t)(low))

enum { OP_READ = 1, OP_WRITE, OP_FSYNC, OP_DISCARD, OP_WZ_FALLOC, OP_WZ_WRITE };
enum { SLOT_FREE = 0, SLOT_HELD, SLOT_BUSY };

#define BIG_IOV 65536          /* iovecs for a chain too long for a slot (then too_many_segments) */
#define ZERO_CHUNK 65536
#define ZERO_IOVS 16           /* one zero-write op covers ZERO_IOVS * ZERO_CHUNK bytes */
#define MAX_ZERO_OPS 4096      /* zero-write ops of one request at most (4 GiB) */

static const uint8_t zeros[ZERO_CHUNK] __attribute__((aligned(4096)));
static struct iovec zero_iov[ZERO_IOVS];

struct blk_slot {
    struct vqd_elem e;
    struct vqd_iov *iov;       /* the chain's iovecs (the slot's share of iov_pool, or big_iov) */
    uint8_t *status;           /* the status byte in guest memory; NULL: none */
    uint8_t *bounce;           /* O_DIRECT bounce buffer (data_len bytes), or NULL */
    uint64_t sector;
    uint32_t type;             /* header type; UINT32_MAX: no header */
    uint32_t data_len;
    uint32_t dio_idx, dio_cnt; /* data iovecs: iov[dio_idx .. dio_idx + dio_cnt) */
    uint32_t used_len;         /* bytes written before the status byte when it ends OK */
    int pending;               /* ops in the engine */
    int err;                   /* first errno of a failed op; 0: none */
    uint8_t state;
    uint8_t retry_zero;        /* a zero-range fallocate is unsupported: redo as zero writes */
    uint8_t started;           /* counted in requests[] already */
    uint8_t too_long;          /* popped into big_iov: more pieces than any valid request */
    uint8_t err_kind;          /* the op kind that failed first */
};

struct vqd_blk_queue {
    struct vqd_vq *vq;
    const struct vqd_blk_disk *disk;
    int packed;                /* vq is a packed ring (vq->pdesc, vqd_pvq.c) */
    uint32_t depth;
    uint32_t slot_iov;
    struct blk_slot *slots;
    struct vqd_iov *iov_pool;
    struct vqd_iov *big_iov;
    uint32_t *free_list;
    uint32_t nfree;
    uint32_t *held;            /* FIFO of held slots, in pop order */
    uint32_t held_head, held_n;
    struct virtio_blk_discard_write_zeroes seg[VQD_BLK_MAX_DWZ_SEG];
    struct io_uring ring;
    int uring;                 /* io_uring in use */
    int uring_errno;           /* why not (0: in use or not tried) */
    uint32_t ops;              /* ops in the engine */
    int hold;                  /* hold-io fault (atomic) */
    int hold_fd;               /* eventfd: set_hold wakes the run loop */
    uint8_t kick_armed, hold_armed, wake_armed, wake_seen;
    uint8_t no_zero_range;     /* the file refused FALLOC_FL_ZERO_RANGE/PUNCH_HOLE for zeroes */
    int wake_fd_armed;
    uint32_t wake_gen;
    int filled;                /* used elements filled since the last flush */
    struct vqd_blk_counters c;
    /* One more entry than the readers get: the entry being written is never
     * one of the last VQD_BLK_RECENT completed (vqd_blk_recent). */
    struct vqd_blk_recent recent[VQD_BLK_RECENT + 1];
    uint64_t recent_w;         /* entries ever written (atomic) */
    char last_bad[192];
};

const char *vqd_blk_bad_name(int kind)
{
    return kind > 0 && kind < VQD_BLK_BAD_COUNT ? bad_names[kind] : "";
}

const struct vqd_blk_counters *vqd_blk_counters(const struct vqd_blk_queue *q) { return &q->c; }
const char *vqd_blk_last_bad(const struct vqd_blk_queue *q) { return q->last_bad; }
int vqd_blk_engine(const struct vqd_blk_queue *q) { return q->uring ? VQD_BLK_ENGINE_URING : VQD_BLK_ENGINE_SYNC; }
int vqd_blk_uring_errno(const struct vqd_blk_queue *q) { return q->uring_errno; }

static inline void count(uint64_t *c, uint64_t n)
{
    __atomic_store_n(c, *c + n, __ATOMIC_RELAXED); /* single writer; readers on other threads */
}

/* Size of a raw image or block device, and its logical block size. */
int vqd_blk_disk_probe(int fd, uint64_t *size, uint32_t *blk_size, int *is_block)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    *is_block = S_ISBLK(st.st_mode) ? 1 : 0;
    if (*is_block) {
        int ssz = 512;
        if (ioctl(fd, BLKGETSIZE64, size) < 0)
            return -errno;
        if (ioctl(fd, BLKSSZGET, &ssz) < 0)
            return -errno;
        *blk_size = (uint32_t)ssz;
        return 0;
    }
    if (!S_ISREG(st.st_mode))
        return -EINVAL;
    *size = (uint64_t)st.st_size;
    *blk_size = VIRTIO_BLK_SECTOR_SIZE;
    return 0;
}

/* --- copies between guest iovecs and host buffers (inside a guarded pass) --- */

/* Copy len bytes from the iovecs, starting skip bytes in. Returns bytes copied. */
static uint64_t gather(const struct vqd_iov *iov, uint32_t n, uint64_t skip, void *dst, uint64_t len)
{
    uint8_t *d = dst;
    uint64_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        if (skip >= iov[i].len) {
            skip -= iov[i].len;
            continue;
        }
        uint64_t k = iov[i].len - skip;
        if (k > len - done)
            k = len - done;
        memcpy(d + done, iov[i].base + skip, k);
        done += k;
        skip = 0;
    }
    return done;
}

static uint64_t scatter(const struct vqd_iov *iov, uint32_t n, const void *src, uint64_t len)
{
    const uint8_t *s = src;
    uint64_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        uint64_t k = iov[i].len < len - done ? iov[i].len : len - done;
        memcpy(iov[i].base, s + done, k);
        done += k;
    }
    return done;
}

/* --- completion ------------------------------------------------------------ */

static int req_class(uint32_t type)
{
    switch (type) {
    case VIRTIO_BLK_T_IN: return VQD_BLK_REQ_IN;
    case VIRTIO_BLK_T_OUT: return VQD_BLK_REQ_OUT;
    case VIRTIO_BLK_T_FLUSH: return VQD_BLK_REQ_FLUSH;
    case VIRTIO_BLK_T_GET_ID: return VQD_BLK_REQ_GET_ID;
    case VIRTIO_BLK_T_DISCARD: return VQD_BLK_REQ_DISCARD;
    case VIRTIO_BLK_T_WRITE_ZEROES: return VQD_BLK_REQ_WRITE_ZEROES;
    default: return VQD_BLK_REQ_OTHER;
    }
}

static void slot_free(struct vqd_blk_queue *q, struct blk_slot *s)
{
    free(s->bounce);
    s->bounce = NULL;
    s->state = SLOT_FREE;
    q->free_list[q->nfree++] = (uint32_t)(s - q->slots);
    count(&q->c.in_flight, (uint64_t)-1);
}

/* End a request: status byte (VQD_BLK_STATUS_NONE: none written), used
 * element, counters, recent ring; the slot is free again. */
static void finish(struct vqd_blk_queue *q, struct blk_slot *s, int bad, uint8_t status)
{
    uint32_t used = 0;
    if (s->status && status != VQD_BLK_STATUS_NONE) {
        if (status == VIRTIO_BLK_S_OK && s->bounce && s->type == VIRTIO_BLK_T_IN)
            scatter(s->iov + s->dio_idx, s->dio_cnt, s->bounce, s->data_len);
        *s->status = status;
        /* §5.2.6: used len is what the device wrote: data (IN, GET_ID) and status. */
        used = 1 + (status == VIRTIO_BLK_S_OK ? s->used_len : 0);
        count(&q->c.status[status], 1);
    } else {
        status = VQD_BLK_STATUS_NONE;
    }
    if (bad)
        count(&q->c.bad[bad], 1);
    if (status == VIRTIO_BLK_S_OK) {
        if (s->type == VIRTIO_BLK_T_IN)
            count(&q->c.bytes_read, s->data_len);
        else if (s->type == VIRTIO_BLK_T_OUT)
            count(&q->c.bytes_written, s->data_len);
    }
    /* A hostile driver can re-offer heads whose used elements are not yet
     * published: never keep more than a ring's worth pending. */
    if (q->vq->used_pending >= q->vq->num)
        q->packed ? vqd_pflush(q->vq) : vqd_flush(q->vq);
    if (q->packed)
        vqd_pfill(q->vq, (uint16_t)s->e.head, used, (uint16_t)s->e.ndescs);
    else
        vqd_fill(q->vq, s->e.head, used);
    q->filled++;
    struct vqd_blk_recent *r = &q->recent[q->recent_w % (VQD_BLK_RECENT + 1)];
    r->sector = s->sector;
    r->head = s->e.head;
    r->type = s->type;
    r->data_len = s->data_len;
    r->status = status;
    r->bad = (uint8_t)bad;
    __atomic_store_n(&q->recent_w, q->recent_w + 1, __ATOMIC_RELEASE);
    count(&q->c.completed, 1);
    slot_free(q, s);
}

/* A bad request: count it, say why, give it its status. */
__attribute__((format(printf, 5, 6)))
static void reject(struct vqd_blk_queue *q, struct blk_slot *s, int bad, uint8_t status, const char *fmt, ...)
{
    int k = snprintf(q->last_bad, sizeof(q->last_bad), "head %u: %s: ", s->e.head, bad_names[bad]);
    if (k > 0 && (size_t)k < sizeof(q->last_bad)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(q->last_bad + k, sizeof(q->last_bad) - (size_t)k, fmt, ap);
        va_end(ap);
    }
    finish(q, s, bad, status);
}

/* --- the I/O engine --------------------------------------------------------- */

static void op_done(struct vqd_blk_queue *q, struct blk_slot *s, int kind, int64_t res, uint32_t expect);
static void start(struct vqd_blk_queue *q, struct blk_slot *s);

static struct io_uring_sqe *get_sqe(struct vqd_blk_queue *q)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);
    if (!sqe) {
        io_uring_submit(&q->ring);
        sqe = io_uring_get_sqe(&q->ring);
    }
    return sqe;
}

/* Issue one op of slot s: io_uring, or the synchronous call (completed at once). */
static void issue(struct vqd_blk_queue *q, struct blk_slot *s, int kind, const struct iovec *iov,
                  uint32_t niov, uint64_t off, uint64_t len, int mode)
{
    const struct vqd_blk_disk *d = q->disk;
    int rwf = d->writeback ? 0 : RWF_DSYNC;
    uint32_t expect = (kind == OP_READ || kind == OP_WRITE || kind == OP_WZ_WRITE) ? (uint32_t)len : 0;
    s->pending++;
    if (kind == OP_DISCARD && d->is_block) {
        /* a block device's discard is an ioctl (no io_uring op for it here): done inline */
        uint64_t range[2] = {off, len};
        op_done(q, s, kind, ioctl(d->fd, BLKDISCARD, range) < 0 ? -errno : 0, 0);
        return;
    }
    if (q->uring) {
        struct io_uring_sqe *sqe = get_sqe(q);
        if (!sqe) {
            op_done(q, s, kind, -EAGAIN, expect);
            return;
        }
        switch (kind) {
        case OP_READ: io_uring_prep_readv(sqe, d->fd, iov, niov, off); break;
        case OP_WRITE:
        case OP_WZ_WRITE: io_uring_prep_writev2(sqe, d->fd, iov, niov, off, rwf); break;
        case OP_FSYNC: io_uring_prep_fsync(sqe, d->fd, IORING_FSYNC_DATASYNC); break;
        default: io_uring_prep_fallocate(sqe, d->fd, mode, (off_t)off, (off_t)len); break;
        }
        io_uring_sqe_set_data64(sqe, UD_MAKE(TAG_OP, (uint64_t)(s - q->slots)
                                             | ((uint64_t)kind << 16) | ((uint64_t)expect << 24)));
        q->ops++;
        return;
    }
    int64_t r;
    switch (kind) {
    case OP_READ: r = preadv(d->fd, iov, (int)niov, (off_t)off); break;
    case OP_WRITE:
    case OP_WZ_WRITE: r = pwritev2(d->fd, iov, (int)niov, (off_t)off, rwf); break;
    case OP_FSYNC: r = fdatasync(d->fd); break;
    default: r = fallocate(d->fd, mode, (off_t)off, (off_t)len); break;
    }
    op_done(q, s, kind, r < 0 ? -errno : r, expect);
}

/* Zeroes by writing them (files without FALLOC_FL_ZERO_RANGE, e.g. tmpfs). */
static void issue_zero_writes(struct vqd_blk_queue *q, struct blk_slot *s, uint64_t off, uint64_t len)
{
    while (len) {
        uint64_t k = len < (uint64_t)ZERO_IOVS * ZERO_CHUNK ? len : (uint64_t)ZERO_IOVS * ZERO_CHUNK;
        uint32_t n = (uint32_t)((k + ZERO_CHUNK - 1) / ZERO_CHUNK);
        struct iovec *iov = zero_iov;
        struct iovec tail[ZERO_IOVS];
        if (k % ZERO_CHUNK) {   /* a shorter last iovec: a private copy of the table */
            memcpy(tail, zero_iov, sizeof(tail));
            tail[n - 1].iov_len = k % ZERO_CHUNK;
            iov = tail;
            if (q->uring) {     /* io_uring may read the table after we return: do this one inline */
                int64_t r = pwritev2(q->disk->fd, iov, (int)n, (off_t)off, q->disk->writeback ? 0 : RWF_DSYNC);
                s->pending++;
                op_done(q, s, OP_WZ_WRITE, r < 0 ? -errno : r, (uint32_t)k);
                off += k;
                len -= k;
                continue;
            }
        }
        issue(q, s, OP_WZ_WRITE, iov, n, off, k, 0);
        off += k;
        len -= k;
    }
}

static void op_done(struct vqd_blk_queue *q, struct blk_slot *s, int kind, int64_t res, uint32_t expect)
{
    if (res < 0) {
        int e = (int)-res;
        if ((kind == OP_WZ_FALLOC) && (e == EOPNOTSUPP || e == ENOTSUP || e == EINVAL || e == ENODEV))
            s->retry_zero = 1;
        else if (kind == OP_DISCARD && (e == EOPNOTSUPP || e == ENOTSUP))
            ; /* discarding is advisory (§5.2.6.2: the device MAY deallocate) */
        else if (!s->err) {
            s->err = e;
            s->err_kind = (uint8_t)kind;
        }
    } else if (expect && (uint64_t)res != expect && !s->err) {
        s->err = EIO; /* short transfer inside capacity */
        s->err_kind = (uint8_t)kind;
    }
    if (--s->pending)
        return;
    if (s->err) {
        reject(q, s, VQD_BLK_BAD_IO_ERROR, VIRTIO_BLK_S_IOERR, "%s at sector %llu failed: %s",
               s->err_kind == OP_READ ? "read" : s->err_kind == OP_WRITE ? "write"
               : s->err_kind == OP_FSYNC ? "fdatasync" : s->err_kind == OP_WZ_WRITE ? "zero write" : "fallocate", (unsigned long long)s->sector, strerror(s->err));
        return;
    }
    if (s->retry_zero) {
        s->retry_zero = 0;
        q->no_zero_range = 1;
        start(q, s);   /* the same request again, as zero writes */
        return;
    }
    finish(q, s, VQD_BLK_BAD_NONE, VIRTIO_BLK_S_OK);
}

/* --- request checks ---------------------------------------------------------- */

/* §5.2.6: sectors [sector, sector + n) must lie in the capacity, and their byte
 * offsets must fit an off_t. Returns a VQD_BLK_BAD_* kind (0: fine). */
static int range_bad(const struct vqd_blk_disk *d, uint64_t sector, uint64_t n)
{
    const uint64_t max = (uint64_t)INT64_MAX >> VIRTIO_BLK_SECTOR_SHIFT;
    if (sector > max || n > max - sector)
        return VQD_BLK_BAD_SECTOR_OVERFLOW;
    if (sector + n > d->capacity)
        return VQD_BLK_BAD_OUT_OF_RANGE;
    return 0;
}

static void reject_range(struct vqd_blk_queue *q, struct blk_slot *s, int bad, uint64_t sector, uint64_t n)
{
    if (bad == VQD_BLK_BAD_SECTOR_OVERFLOW)
        reject(q, s, bad, VIRTIO_BLK_S_IOERR, "sector %llu + %llu sectors overflows a byte offset",
               (unsigned long long)sector, (unsigned long long)n);
    else
        reject(q, s, bad, VIRTIO_BLK_S_IOERR, "sector %llu + %llu sectors is beyond capacity %llu",
               (unsigned long long)sector, (unsigned long long)n, (unsigned long long)q->disk->capacity);
}

/* IN / OUT: data length, segments, range, O_DIRECT alignment; then the op. */
static void start_rw(struct vqd_blk_queue *q, struct blk_slot *s, int write)
{
    const struct vqd_blk_disk *d = q->disk;
    struct vqd_iov *dio = s->iov + s->dio_idx;
    if (s->data_len % VIRTIO_BLK_SECTOR_SIZE) {
        reject(q, s, VQD_BLK_BAD_UNALIGNED, VIRTIO_BLK_S_IOERR, "data length %u is not a multiple of 512",
               s->data_len);
        return;
    }
    if (s->dio_cnt > d->seg_max) {
        reject(q, s, VQD_BLK_BAD_TOO_MANY_SEGMENTS, VIRTIO_BLK_S_IOERR, "%u data segments, seg_max %u",
               s->dio_cnt, d->seg_max);
        return;
    }
    int unaligned_mem = 0;
    uint32_t align = d->blk_size > VIRTIO_BLK_SECTOR_SIZE ? d->blk_size : VIRTIO_BLK_SECTOR_SIZE;
    for (uint32_t i = 0; i < s->dio_cnt; i++) {
        if (d->size_max && dio[i].len > d->size_max) {
            reject(q, s, VQD_BLK_BAD_SEGMENT_TOO_LARGE, VIRTIO_BLK_S_IOERR,
                   "data segment %u is %llu bytes, size_max %u", i, (unsigned long long)dio[i].len, d->size_max);
            return;
        }
        if (((uintptr_t)dio[i].base | dio[i].len) & (align - 1))
            unaligned_mem = 1;
    }
    uint64_t n = s->data_len >> VIRTIO_BLK_SECTOR_SHIFT;
    int bad = range_bad(d, s->sector, n);
    if (bad) {
        reject_range(q, s, bad, s->sector, n);
        return;
    }
    uint64_t off = s->sector << VIRTIO_BLK_SECTOR_SHIFT;
    if (d->direct && ((off | s->data_len) & (d->blk_size - 1))) {
        reject(q, s, VQD_BLK_BAD_UNALIGNED, VIRTIO_BLK_S_IOERR,
               "O_DIRECT: offset %llu or length %u is not a multiple of blk_size %u",
               (unsigned long long)off, s->data_len, d->blk_size);
        return;
    }
    if (!s->data_len) {
        finish(q, s, VQD_BLK_BAD_NONE, VIRTIO_BLK_S_OK);
        return;
    }
    if (write)
        s->used_len = 0;
    else
        s->used_len = s->data_len;
    if (d->direct && unaligned_mem) {
        if (posix_memalign((void **)&s->bounce, 4096, s->data_len)) {
            s->bounce = NULL;
            reject(q, s, VQD_BLK_BAD_IO_ERROR, VIRTIO_BLK_S_IOERR, "no memory for a %u-byte bounce buffer",
                   s->data_len);
            return;
        }
        if (write)
            gather(dio, s->dio_cnt, 0, s->bounce, s->data_len);
    }
    if (s->bounce) {
        /* The op's iovec must outlive the call: keep it in the slot's spare last iovec. */
        struct vqd_iov *bi = &s->iov[q->slot_iov - 1];
        bi->base = s->bounce;
        bi->len = s->data_len;
        issue(q, s, write ? OP_WRITE : OP_READ, (const struct iovec *)bi, 1, off, s->data_len, 0);
    } else {
        issue(q, s, write ? OP_WRITE : OP_READ, (const struct iovec *)dio, s->dio_cnt, off, s->data_len, 0);
    }
}

/* DISCARD / WRITE_ZEROES: the segments after the header (§5.2.6, §5.2.6.2). */
static void start_dwz(struct vqd_blk_queue *q, struct blk_slot *s, int wz)
{
    const struct vqd_blk_disk *d = q->disk;
    uint32_t max_sectors = wz ? d->max_write_zeroes_sectors : d->max_discard_sectors;
    uint32_t max_seg = wz ? d->max_write_zeroes_seg : d->max_discard_seg;
    int over = wz ? VQD_BLK_BAD_WRITE_ZEROES_OVER_LIMIT : VQD_BLK_BAD_DISCARD_OVER_LIMIT;
    const char *what = wz ? "write_zeroes" : "discard";
    if (d->readonly) {
        reject(q, s, VQD_BLK_BAD_READ_ONLY, VIRTIO_BLK_S_IOERR, "%s on a read-only disk", what);
        return;
    }
    if (!max_sectors) {
        reject(q, s, VQD_BLK_BAD_UNSUPPORTED, VIRTIO_BLK_S_UNSUPP, "%s is not offered", what);
        return;
    }
    uint64_t seg_bytes = s->e.out_len - VIRTIO_BLK_REQ_HDR_SIZE;
    if (!seg_bytes || seg_bytes % VIRTIO_BLK_DISCARD_SEGMENT_SIZE) {
        reject(q, s, VQD_BLK_BAD_DISCARD_BAD_SEGMENT, VIRTIO_BLK_S_IOERR,
               "%s segment buffer is %llu bytes, not a non-zero multiple of 16", what,
               (unsigned long long)seg_bytes);
        return;
    }
    uint64_t nseg = seg_bytes / VIRTIO_BLK_DISCARD_SEGMENT_SIZE;
    if (nseg > max_seg || nseg > VQD_BLK_MAX_DWZ_SEG) {
        reject(q, s, over, VIRTIO_BLK_S_IOERR, "%llu segments, max_%s_seg %u", (unsigned long long)nseg,
               what, max_seg);
        return;
    }
    /* One copy of the segments: the checks and the ops see the same values. */
    gather(s->iov, s->e.out_num, VIRTIO_BLK_REQ_HDR_SIZE, q->seg, seg_bytes);
    for (uint32_t i = 0; i < nseg; i++) {
        const struct virtio_blk_discard_write_zeroes *g = &q->seg[i];
        uint32_t unknown = wz ? g->flags & ~(uint32_t)VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : g->flags;
        if (unknown) {
            /* §5.2.6.2: UNSUPP for discard with the unmap flag, or unknown flags. */
            reject(q, s, VQD_BLK_BAD_DISCARD_BAD_SEGMENT, VIRTIO_BLK_S_UNSUPP,
                   "%s segment %u has flags %#x", what, i, g->flags);
            return;
        }
        if (g->num_sectors > max_sectors) {
            reject(q, s, over, VIRTIO_BLK_S_IOERR, "segment %u: %u sectors, max_%s_sectors %u", i,
                   g->num_sectors, what, max_sectors);
            return;
        }
        int bad = range_bad(d, g->sector, g->num_sectors);
        if (bad) {
            reject_range(q, s, bad, g->sector, g->num_sectors);
            return;
        }
    }
    if (s->type == VIRTIO_BLK_T_WRITE_ZEROES && q->no_zero_range) {
        uint64_t ops = 0;
        for (uint32_t i = 0; i < nseg; i++)
            ops += ((uint64_t)q->seg[i].num_sectors * VIRTIO_BLK_SECTOR_SIZE
                    + (uint64_t)ZERO_IOVS * ZERO_CHUNK - 1) / ((uint64_t)ZERO_IOVS * ZERO_CHUNK);
        if (ops > MAX_ZERO_OPS) {
            reject(q, s, over, VIRTIO_BLK_S_IOERR, "%llu zero-write ops needed, at most %u",
                   (unsigned long long)ops, MAX_ZERO_OPS);
            return;
        }
    }
    s->pending++; /* hold the request open while its ops are issued (sync ones complete at once) */
    for (uint32_t i = 0; i < nseg; i++) {
        uint64_t off = q->seg[i].sector << VIRTIO_BLK_SECTOR_SHIFT;
        uint64_t len = (uint64_t)q->seg[i].num_sectors << VIRTIO_BLK_SECTOR_SHIFT;
        if (!len)
            continue;
        if (!wz)
            issue(q, s, OP_DISCARD, NULL, 0, off, len, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
        else if (q->no_zero_range)
            issue_zero_writes(q, s, off, len);
        else if (q->seg[i].flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            issue(q, s, OP_WZ_FALLOC, NULL, 0, off, len, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
        else
            issue(q, s, OP_WZ_FALLOC, NULL, 0, off, len, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
    }
    op_done(q, s, 0, 0, 0);
}

/* Start a popped request: find header, data and status (§5.2.6), check them,
 * and issue its I/O or give it its status. */
static void start(struct vqd_blk_queue *q, struct blk_slot *s)
{
    struct vqd_elem *e = &s->e;
    const struct vqd_blk_disk *d = q->disk;
    uint32_t nout = e->out_num, nin = e->in_num;
    struct virtio_blk_outhdr h;
    int have_hdr = e->out_len >= VIRTIO_BLK_REQ_HDR_SIZE;

    s->err = 0;
    s->err_kind = 0;
    s->retry_zero = 0;
    s->used_len = 0;
    s->status = NULL;
    if (have_hdr) {
        gather(s->iov, nout, 0, &h, sizeof(h));
        s->type = h.type;
        s->sector = h.sector;
    } else {
        s->type = UINT32_MAX;
        s->sector = 0;
    }
    if (!s->started) {
        s->started = 1;
        count(&q->c.requests[req_class(s->type)], 1);
    }
    s->data_len = 0;
    if (!e->in_len) {
        /* No device-writable byte: nowhere to put a status. The chain goes back
         * with used len 0 and nothing written. */
        if (e->out_len > VIRTIO_BLK_REQ_HDR_SIZE)
            reject(q, s, VQD_BLK_BAD_STATUS_NOT_WRITABLE, VQD_BLK_STATUS_NONE,
                   "the chain's last byte is device-readable (%llu readable bytes, none writable)",
                   (unsigned long long)e->out_len);
        else
            reject(q, s, VQD_BLK_BAD_STATUS_MISSING, VQD_BLK_STATUS_NONE,
                   "no status byte (%llu readable bytes, none writable)", (unsigned long long)e->out_len);
        return;
    }
    struct vqd_iov *last = &s->iov[nout + nin - 1];   /* map_range gives no empty iovecs */
    s->status = last->base + last->len - 1;
    if (!have_hdr) {
        reject(q, s, VQD_BLK_BAD_HEADER_SHORT, VIRTIO_BLK_S_IOERR, "header is %llu bytes, not 16",
               (unsigned long long)e->out_len);
        return;
    }
    if (s->too_long) {
        reject(q, s, VQD_BLK_BAD_TOO_MANY_SEGMENTS, VIRTIO_BLK_S_IOERR,
               "the chain maps to %u pieces, more than seg_max %u + header + status",
               nout + nin, d->seg_max);
        return;
    }
    uint64_t rd_data = e->out_len - VIRTIO_BLK_REQ_HDR_SIZE;   /* readable bytes after the header */
    uint64_t wr_data = e->in_len - 1;                          /* writable bytes before the status */
    switch (s->type) {
    case VIRTIO_BLK_T_IN:
        if (rd_data) {
            reject(q, s, VQD_BLK_BAD_DATA_NOT_WRITABLE, VIRTIO_BLK_S_IOERR,
                   "read with %llu device-readable data bytes", (unsigned long long)rd_data);
            return;
        }
        /* the data: every writable iovec, the last one short of the status byte */
        s->dio_idx = nout;
        s->dio_cnt = nin;
        if (--last->len == 0)
            s->dio_cnt--;
        s->data_len = (uint32_t)wr_data;
        start_rw(q, s, 0);
        return;
    case VIRTIO_BLK_T_OUT: {
        if (d->readonly) {
            s->data_len = (uint32_t)rd_data;
            reject(q, s, VQD_BLK_BAD_READ_ONLY, VIRTIO_BLK_S_IOERR, "write to a read-only disk");
            return;
        }
        if (wr_data) {
            reject(q, s, VQD_BLK_BAD_DATA_NOT_READABLE, VIRTIO_BLK_S_IOERR,
                   "write with %llu device-writable data bytes", (unsigned long long)wr_data);
            return;
        }
        /* the data: the readable iovecs after the header's 16 bytes */
        uint64_t skip = VIRTIO_BLK_REQ_HDR_SIZE;
        uint32_t k = 0;
        while (k < nout && skip >= s->iov[k].len)
            skip -= s->iov[k++].len;
        if (k < nout) {
            s->iov[k].base += skip;
            s->iov[k].len -= skip;
        }
        s->dio_idx = k;
        s->dio_cnt = nout - k;
        s->data_len = (uint32_t)rd_data;
        start_rw(q, s, 1);
        return;
    }
    case VIRTIO_BLK_T_FLUSH:
        s->pending++;
        issue(q, s, OP_FSYNC, NULL, 0, 0, 0, 0);
        op_done(q, s, 0, 0, 0);
        return;
    case VIRTIO_BLK_T_GET_ID: {
        if (wr_data < VIRTIO_BLK_ID_BYTES) {
            reject(q, s, VQD_BLK_BAD_GET_ID_SHORT, VIRTIO_BLK_S_IOERR, "GET_ID buffer is %llu bytes, not 20",
                   (unsigned long long)wr_data);
            return;
        }
        /* the serial, NUL-padded to 20 bytes, at the start of the writable data */
        scatter(s->iov + nout, nin, d->serial, VIRTIO_BLK_ID_BYTES);
        s->data_len = VIRTIO_BLK_ID_BYTES;
        s->used_len = VIRTIO_BLK_ID_BYTES;
        finish(q, s, VQD_BLK_BAD_NONE, VIRTIO_BLK_S_OK);
        return;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        s->data_len = (uint32_t)rd_data;
        start_dwz(q, s, s->type == VIRTIO_BLK_T_WRITE_ZEROES);
        return;
    default:
        reject(q, s, VQD_BLK_BAD_UNSUPPORTED, VIRTIO_BLK_S_UNSUPP, "request type %u", s->type);
        return;
    }
}

/* --- the queue ------------------------------------------------------------------ */

int vqd_blk_queue_new(struct vqd_vq *vq, const struct vqd_blk_disk *disk, uint32_t depth, int engine,
                      struct vqd_blk_queue **out)
{
    *out = NULL;
    if (!vq || !disk || !depth || disk->seg_max == 0 || disk->seg_max > VQD_BLK_MAX_SEG_MAX
        || disk->max_discard_seg > VQD_BLK_MAX_DWZ_SEG || disk->max_write_zeroes_seg > VQD_BLK_MAX_DWZ_SEG
        || disk->blk_size < VIRTIO_BLK_SECTOR_SIZE || (disk->blk_size & (disk->blk_size - 1)))
        return VQD_E_INVAL;
    struct vqd_blk_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    q->vq = vq;
    q->disk = disk;
    /* Completions are out of order: VIRTIO_F_IN_ORDER (§2.8.8) must not be negotiated. */
    q->packed = vq->pdesc != NULL;
    if (q->packed && vq->in_order) {
        free(q);
        return VQD_E_INVAL;
    }
    q->depth = depth < vq->num ? depth : vq->num;   /* one used slot per request in flight */
    /* header + data segments + status, a few region splits, and one spare for a bounce buffer */
    q->slot_iov = disk->seg_max + 8;
    q->slots = calloc(q->depth, sizeof(*q->slots));
    q->iov_pool = calloc((size_t)q->depth * q->slot_iov, sizeof(*q->iov_pool));
    q->free_list = calloc(q->depth, sizeof(*q->free_list));
    q->held = calloc(q->depth, sizeof(*q->held));
    q->hold_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->wake_fd_armed = -1;
    if (!q->slots || !q->iov_pool || !q->free_list || !q->held || q->hold_fd < 0) {
        int e = q->hold_fd < 0 ? -errno : -ENOMEM;
        vqd_blk_queue_free(q);
        return e;
    }
    for (uint32_t i = 0; i < q->depth; i++) {
        q->slots[i].iov = q->iov_pool + (size_t)i * q->slot_iov;
        q->free_list[i] = q->depth - 1 - i;
    }
    q->nfree = q->depth;
    for (int i = 0; i < ZERO_IOVS; i++) {   /* same values every time: a benign race */
        zero_iov[i].iov_base = (void *)zeros;
        zero_iov[i].iov_len = ZERO_CHUNK;
    }
    if (engine != VQD_BLK_ENGINE_SYNC) {
        uint32_t entries = 8;
        while (entries < 2 * q->depth + 8 && entries < 4096)
            entries <<= 1;
        int rc = io_uring_queue_init(entries, &q->ring, 0);
        if (rc == 0)
            q->uring = 1;
        else if (engine == VQD_BLK_ENGINE_URING) {
            vqd_blk_queue_free(q);
            return rc;
        } else
            q->uring_errno = -rc;
    }
    *out = q;
    return VQD_OK;
}

/* One pass: completions, held requests released, new requests popped and
 * started, used elements published and the driver called if it wants.
 * Runs guarded. Returns the work done (0: nothing to do now). */
static int pass(struct vqd_blk_queue *q)
{
    struct vqd_vq *vq = q->vq;
    int work = 0;
    if (q->uring) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_for_each_cqe(&q->ring, head, cqe) {
            uint64_t ud = io_uring_cqe_get_data64(cqe);
            n++;
            switch (UD_TAG(ud)) {
            case TAG_OP: {
                struct blk_slot *s = &q->slots[ud & 0xFFFF];
                q->ops--;
                op_done(q, s, (int)((ud >> 16) & 0xFF), cqe->res, (uint32_t)(ud >> 24));
                work++;
                break;
            }
            case TAG_KICK:
                q->kick_armed = 0;
                vqd_vq_drain_kick(vq);
                break;
            case TAG_HOLD: {
                uint64_t v;
                q->hold_armed = 0;
                if (read(q->hold_fd, &v, sizeof(v)) < 0)
                    (void)0;
                break;
            }
            case TAG_WAKE:
                if ((uint32_t)ud == q->wake_gen && q->wake_armed) {
                    uint64_t v;
                    q->wake_armed = 0;
                    if (cqe->res > 0 && read(q->wake_fd_armed, &v, sizeof(v)) == sizeof(v))
                        q->wake_seen = 1;
                }
                break;
            default:
                break;
            }
        }
        io_uring_cq_advance(&q->ring, n);
    }
    if (!__atomic_load_n(&q->hold, __ATOMIC_ACQUIRE)) {
        while (q->held_n) {
            struct blk_slot *s = &q->slots[q->held[q->held_head]];
            q->held_head = (q->held_head + 1) % q->depth;
            q->held_n--;
            s->state = SLOT_BUSY;
            start(q, s);
            work++;
        }
    }
    /* at most depth pops a pass: requests that end at once free their slot
     * again, and the wake fd and completions must not wait behind a busy driver */
    for (uint32_t popped = 0; q->nfree && !vq->broken && popped < q->depth; popped++) {
        uint32_t idx = q->free_list[q->nfree - 1];
        struct blk_slot *s = &q->slots[idx];
        int resub = vq->inflight && vqd_inflight_pending(vq) > 0;
        s->iov = q->iov_pool + (size_t)idx * q->slot_iov;
        /* the slot's last iovec is kept spare for a bounce buffer */
        vqd_pop_one_fn pop_one = q->packed ? vqd_ppop_one : vqd_pop_one;
        int rc = pop_one(vq, &s->e, s->iov, (int)q->slot_iov - 1);
        if (rc == VQD_E_NOSPACE) {
            /* Longer than any valid request: pop it into the big array to give it its status. */
            if (!q->big_iov)
                q->big_iov = malloc(sizeof(*q->big_iov) * BIG_IOV);
            if (!q->big_iov)
                return vqd_broken(vq, "no memory for a chain of more than %u iovecs", q->slot_iov - 1);
            s->iov = q->big_iov;
            rc = pop_one(vq, &s->e, s->iov, BIG_IOV);
            if (rc == VQD_E_NOSPACE)
                return vqd_broken(vq, "a request's chain maps to more than %u iovecs", BIG_IOV);
        }
        if (rc <= 0)
            break;
        s->e.iov_idx = 0;
        s->started = 0;
        s->too_long = s->iov == q->big_iov;
        s->pending = 0;
        s->bounce = NULL;
        q->nfree--;
        count(&q->c.in_flight, 1);
        if (resub)
            count(&q->c.resubmitted, 1);
        work++;
        if (s->too_long) {
            s->state = SLOT_BUSY;
            start(q, s); /* rejected at once (too_many_segments): big_iov is reused by the next one */
            continue;
        }
        if (__atomic_load_n(&q->hold, __ATOMIC_ACQUIRE)) {
            s->state = SLOT_HELD;
            q->held[(q->held_head + q->held_n) % q->depth] = idx;
            q->held_n++;
        } else {
            s->state = SLOT_BUSY;
            start(q, s);
        }
    }
    if (q->filled) {
        uint64_t now = 0;
        q->filled = 0;
        if (q->packed) {
            vqd_pflush(vq);
            vqd_pnotify(vq, &now);
        } else {
            vqd_flush(vq);
            vqd_notify(vq, &now);
        }
    }
    return work;
}

/* One pass under the vq's IOTLB read lock and the SIGBUS guard (a fault
 * breaks the queue). In a function of its own: the sigsetjmp clobbers no
 * caller's locals. */
static int guarded_pass(struct vqd_blk_queue *q)
{
    struct vqd_vq *vq = q->vq;
    int rc;
    VQD_VQ_GUARDED(vq, rc, pass(q), rc = vqd_fault_broken(vq));
    return rc;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void arm_poll(struct vqd_blk_queue *q, int fd, uint64_t ud)
{
    struct io_uring_sqe *sqe = get_sqe(q);
    if (!sqe)
        return;
    io_uring_prep_poll_add(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, ud);
}

/* Sleep until a kick (want_kick), the wake fd, the hold fd or an I/O
 * completion, at most timeout_ms (-1: no limit). */
static void wait_events(struct vqd_blk_queue *q, int want_kick, int wake_fd, int timeout_ms)
{
    int kick_fd = q->vq->kick_fd;
    if (kick_fd < 0 && want_kick && (timeout_ms < 0 || timeout_ms > 1))
        timeout_ms = 1;   /* a polling front-end: nap */
    if (!q->uring) {
        struct pollfd p[3];
        int n = 0;
        p[n++] = (struct pollfd){.fd = q->hold_fd, .events = POLLIN};
        if (wake_fd >= 0)
            p[n++] = (struct pollfd){.fd = wake_fd, .events = POLLIN};
        if (want_kick && kick_fd >= 0)
            p[n++] = (struct pollfd){.fd = kick_fd, .events = POLLIN};
        if (poll(p, n, timeout_ms) <= 0)
            return;
        uint64_t v;
        if ((p[0].revents & POLLIN) && read(q->hold_fd, &v, sizeof(v)) < 0)
            (void)0;
        if (wake_fd >= 0 && (p[1].revents & POLLIN) && read(wake_fd, &v, sizeof(v)) == sizeof(v))
            q->wake_seen = 1;
        if (want_kick && kick_fd >= 0 && (p[n - 1].revents & POLLIN))
            vqd_vq_drain_kick(q->vq);
        return;
    }
    if (want_kick && kick_fd >= 0 && !q->kick_armed) {
        arm_poll(q, kick_fd, UD_MAKE(TAG_KICK, 0));
        q->kick_armed = 1;
    }
    if (!q->hold_armed) {
        arm_poll(q, q->hold_fd, UD_MAKE(TAG_HOLD, 0));
        q->hold_armed = 1;
    }
    struct io_uring_cqe *cqe;
    if (timeout_ms < 0) {
        io_uring_submit_and_wait(&q->ring, 1);
        return;
    }
    io_uring_submit(&q->ring);
    struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000, .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
    io_uring_wait_cqe_timeout(&q->ring, &cqe, &ts);
}

int vqd_blk_run(struct vqd_blk_queue *q, int wake_fd, int timeout_ms)
{
    struct vqd_vq *vq = q->vq;
    uint64_t done0 = q->c.completed;
    int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
    if (vq->broken)
        return 0;
    q->wake_seen = 0;
    if (q->uring && wake_fd >= 0 && !(q->wake_armed && q->wake_fd_armed == wake_fd)) {
        if (q->wake_armed) {   /* armed on another fd by an earlier call: remove that poll */
            struct io_uring_sqe *sqe = get_sqe(q);
            if (sqe) {
                io_uring_prep_poll_remove(sqe, UD_MAKE(TAG_WAKE, q->wake_gen));
                io_uring_sqe_set_data64(sqe, UD_MAKE(TAG_IGNORE, 0));
            }
        }
        q->wake_gen++;
        q->wake_fd_armed = wake_fd;
        arm_poll(q, wake_fd, UD_MAKE(TAG_WAKE, q->wake_gen));
        q->wake_armed = 1;
    }
    int (*set_notification)(struct vqd_vq *, int) = q->packed ? vqd_pvq_set_notification
                                                                 : vqd_vq_set_notification;
    int (*notice)(struct vqd_vq *) = q->packed ? vqd_pvq_notice : vqd_vq_notice;
    if (set_notification(vq, 0) < 0)
        return 0;
    for (;;) {
        int rc;
        rc = guarded_pass(q);
        if (q->uring && io_uring_sq_ready(&q->ring))
            io_uring_submit(&q->ring);
        if (vq->broken || q->wake_seen)
            break;
        if (UNLIKELY(vq->miss_new))
            break;   /* an IOTLB miss: the worker asks the front-end and waits for the update */
        int left = -1;
        if (deadline >= 0) {
            int64_t l = deadline - now_ms();
            if (l <= 0)
                break;
            left = (int)l;
        }
        if (rc > 0)
            continue;
        /* Nothing to do now: ask for kicks (if a slot is free) and re-check
         * before sleeping (§2.7.10; the driver may have published meanwhile). */
        int stalled = vq->fault & VQD_FAULT_STALL;
        int want_kick = q->nfree > 0;
        if (want_kick && !stalled) {
            int n = set_notification(vq, 1);
            if (n < 0)
                break;
            if (n > 0) {
                set_notification(vq, 0);
                continue;
            }
        } else if (want_kick && notice(vq) < 0) {
            break;
        }
        wait_events(q, want_kick, wake_fd, left);
        if (want_kick && !stalled && set_notification(vq, 0) < 0)
            break;
    }
    return (int)(q->c.completed - done0);
}

int vqd_blk_set_hold(struct vqd_blk_queue *q, int hold)
{
    uint64_t one = 1;
    __atomic_store_n(&q->hold, hold ? 1 : 0, __ATOMIC_RELEASE);
    if (write(q->hold_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        return -errno;
    return VQD_OK;
}

/* Finish with the queue (run has returned): every request still held or in
 * the engine ends. complete=1 (and the queue not broken): held requests are
 * started, every op is waited for and every request completed on the ring as
 * usual. complete=0, or a broken queue: ops are waited for (the kernel may
 * still use their buffers) but nothing is written to the ring; the requests
 * stay in flight in the inflight area, if any, for the next back-end.
 * Returns the requests completed on the ring. */
int vqd_blk_drain(struct vqd_blk_queue *q, int complete)
{
    struct vqd_vq *vq = q->vq;
    uint64_t done0 = q->c.completed;
    uint8_t saved = vq->fault;
    int rc = 0;
    vq->fault |= VQD_FAULT_STALL;   /* complete what we hold, take nothing new */
    __atomic_store_n(&q->hold, 0, __ATOMIC_RELEASE);
    if (!complete || vq->broken) {
        while (q->held_n) {
            struct blk_slot *s = &q->slots[q->held[q->held_head]];
            q->held_head = (q->held_head + 1) % q->depth;
            q->held_n--;
            slot_free(q, s);
        }
    } else {
        rc = guarded_pass(q);   /* starts the held ones */
    }
    while (q->uring && q->ops) {
        struct io_uring_cqe *cqe;
        io_uring_submit(&q->ring);
        if (io_uring_wait_cqe(&q->ring, &cqe) < 0)
            break;
        if (complete && !vq->broken) {
            rc = guarded_pass(q);
            continue;
        }
        unsigned head, n = 0;
        io_uring_for_each_cqe(&q->ring, head, cqe) {
            uint64_t ud = io_uring_cqe_get_data64(cqe);
            n++;
            if (UD_TAG(ud) == TAG_OP) {
                struct blk_slot *s = &q->slots[ud & 0xFFFF];
                q->ops--;
                if (--s->pending == 0)
                    slot_free(q, s);
            }
        }
        io_uring_cq_advance(&q->ring, n);
    }
    vq->fault = saved;
    (void)rc;
    return (int)(q->c.completed - done0);
}

void vqd_blk_queue_free(struct vqd_blk_queue *q)
{
    if (!q)
        return;
    if (q->slots && q->free_list && q->held)
        vqd_blk_drain(q, 0);
    if (q->uring)
        io_uring_queue_exit(&q->ring);
    if (q->hold_fd >= 0)
        close(q->hold_fd);
    if (q->slots)
        for (uint32_t i = 0; i < q->depth; i++)
            free(q->slots[i].bounce);
    free(q->slots);
    free(q->iov_pool);
    free(q->big_iov);
    free(q->free_list);
    free(q->held);
    free(q);
}

/* Copy the last completed requests, oldest first, at most max (and at most
 * VQD_BLK_RECENT); safe while vqd_blk_run runs: entries the writer may have
 * overwritten during the copy are left out. Returns the entries copied. */
int vqd_blk_recent(const struct vqd_blk_queue *q, struct vqd_blk_recent *out, int max)
{
    uint64_t w1 = __atomic_load_n(&q->recent_w, __ATOMIC_ACQUIRE);
    uint64_t n = w1 < VQD_BLK_RECENT ? w1 : VQD_BLK_RECENT;
    if (max < 0)
        return VQD_E_INVAL;
    if (n > (uint64_t)max)
        n = (uint64_t)max;
    uint64_t first = w1 - n;
    for (uint64_t i = 0; i < n; i++)
        out[i] = q->recent[(first + i) % (VQD_BLK_RECENT + 1)];
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint64_t w2 = __atomic_load_n(&q->recent_w, __ATOMIC_ACQUIRE);
    /* entry w2 may be being written now, over entry w2 - 33: entries up to
     * there may have been torn during the copy */
    uint64_t skip = 0;
    if (w2 > VQD_BLK_RECENT && w2 - VQD_BLK_RECENT > first)
        skip = w2 - VQD_BLK_RECENT - first;
    if (skip >= n)
        return 0;
    if (skip)
        memmove(out, out + skip, (size_t)(n - skip) * sizeof(*out));
    return (int)(n - skip);
}
