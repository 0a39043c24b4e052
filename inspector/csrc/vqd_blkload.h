/* The driver side of one virtio-blk requestq under load (VIRTIO 1.2 §2.7,
 * §5.2.6): the data path of `vqscope load blk` (inspector/datapath/blkload.py
 * wraps it, inspector/tools/blk_load.py is the command).
 *
 * One struct vqd_blkload is one split or packed ring that this engine drives
 * as the driver while vqd_blkload_run runs (the front-end did the handshake and
 * left nothing in flight). Python lays out `iodepth` request slots in guest
 * memory beforehand (struct vqd_bl_slot: 16-byte header, status byte, data
 * buffer of bs bytes) and fills the "in" fields; vqd_blkload_init checks
 * them all against guest memory and the queue size; each request is a
 * chain of `descs_per_slot` descriptors (header, data in segments of at most
 * seg_size bytes, status). Split: each slot's chain is written once, at
 * descriptors slot * descs_per_slot on (the first is the head); packed: it
 * is written at the next available slots each time, with the slot number as
 * its buffer id. vqd_blkload_run keeps `iodepth` requests in
 * flight for `run_ns` nanoseconds, without the GIL.
 *
 * Every used element is checked before it is believed: its id must be the
 * head (packed: the buffer id) of a slot in flight, its len at most what
 * the chain lets the device write, used->idx at most `in flight` entries
 * ahead; a violation stops the
 * run with `broken` and `reason` (the back-end is reported, never trusted),
 * as does a back-end that completes nothing for `stall_ns`.
 *
 * Returns of the exported functions: VQD_OK / a count, or a negative VQD_E_*
 * (vqd_vq.h): VQD_E_INVAL for bad parameters (reason says which),
 * VQD_E_BROKEN when the back-end broke the ring or stalled, or on a SIGBUS.
 */
#ifndef VQD_BLKLOAD_H
#define VQD_BLKLOAD_H

#include <stdint.h>
#include "vqd_blk_spec.h"
#include "vqd_ring.h"

/* CDEF BEGIN */
#define VQD_BL_HIST_SUB 16          /* log-linear histogram: 16 buckets per power of two */
#define VQD_BL_HIST_BUCKETS 1024    /* enough for 64-bit nanoseconds */
#define VQD_BL_MAX_SLOTS 4096

/* Offsets: sequential (a cursor that wraps at the region's end) or random
 * (xorshift64*, seeded). Direction: read_pct of requests are IN, the rest
 * OUT (100: all reads; 0: all writes). */
#define VQD_BL_SEQ 0
#define VQD_BL_RANDOM 1

/* Latency of the completions of one direction (ns). */
struct vqd_bl_lat {
    uint64_t n, min_ns, max_ns, sum_ns;
    uint64_t hist[1024];               /* VQD_BL_HIST_BUCKETS; vqd_blkload_bucket_low */
};

/* One request slot, in guest memory, laid out by the caller (gpa: guest-
 * physical, inside [0, mem_size)). The engine keeps its own fields after. */
struct vqd_bl_slot {
    uint64_t hdr_gpa;      /* in: 16-byte struct virtio_blk_outhdr */
    uint64_t status_gpa;   /* in: 1 status byte */
    uint64_t data_gpa;     /* in: bs bytes, contiguous */
    /* engine state */
    uint64_t sector;
    uint64_t submit_ns;
    uint32_t type;
    uint8_t in_flight;
    uint8_t check;         /* IN under verify: compare with the pattern */
    uint8_t fill;          /* OUT of the fill phase */
    uint8_t pad_;
};

struct vqd_blkload {
    /* --- in: guest memory and the ring (gpa 0 is mem[0]) --- */
    uint8_t *mem;
    uint64_t mem_size;
    uint8_t packed;                    /* VIRTIO_F_RING_PACKED (§2.8); else split (§2.7) */
    uint32_t num;                      /* queue size (split: a power of two) */
    uint64_t desc_gpa, avail_gpa, used_gpa;  /* packed: descriptor ring, driver event
                                        * suppression, device event suppression */
    uint16_t avail_idx;                /* in/out: split: the avail->idx shadow; packed:
                                        * the next slot to make available */
    uint16_t last_used_idx;            /* in/out: split: used idx; packed: next used slot */
    uint8_t avail_wrap, used_wrap;     /* in/out: packed: the two wrap counters */
    uint8_t event_idx;                 /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int kick_fd, call_fd;
    int conn_fd;                       /* the vhost-user socket (-1: none): a hang-up seen
                                        * while waiting ends the run */
    uint8_t stop;                      /* set by another thread: stop submitting, drain */
    /* --- in: the requests --- */
    struct vqd_bl_slot *slots;
    uint32_t iodepth;                  /* slots, all kept in flight */
    uint32_t bs;                       /* bytes per request, a multiple of 512 */
    uint32_t seg_size;                 /* data descriptor at most this long (SIZE_MAX); >= 512 */
    uint32_t descs_per_slot;           /* out of init: 2 + data segments */
    uint64_t region_sector;            /* first sector of this queue's region */
    uint64_t region_blocks;            /* its length in bs units (>= 1) */
    uint32_t pattern;                  /* VQD_BL_SEQ or VQD_BL_RANDOM */
    uint32_t read_pct;                 /* 0..100 */
    uint64_t seed;                     /* offsets and the verify pattern */
    uint8_t verify;                    /* write the pattern; check reads (see written) */
    uint8_t fill;                      /* after run_ns, write every block not yet written */
    uint8_t *written;                  /* NULL or a bitmap of region_blocks bits: blocks
                                        * written OK; with it a read is checked only
                                        * when its block was written before it was
                                        * submitted; without, every read is checked */
    uint64_t max_ios;                  /* a run stops submitting after this many (0: no limit) */
    uint32_t spin;                     /* empty used-ring polls before sleeping in poll() */
    uint64_t stall_ns;                 /* no completion this long with requests in flight: broken */
    /* --- out: counters of the last run (zeroed when a run starts, up to elapsed_ns) --- */
    uint64_t submitted, completed, reads, writes, fills;
    uint64_t bytes_read, bytes_written;
    uint64_t status_ok, status_ioerr, status_unsupp, status_other;
    uint64_t used_len_short;           /* len below what the request let the device write */
    uint64_t verified_sectors, mismatched_sectors, unverified_reads;
    uint64_t first_mismatch_sector;    /* valid when mismatched_sectors */
    uint64_t mismatch_got, mismatch_want;  /* the first differing 8-byte word there */
    uint64_t kicks, kicks_suppressed, calls, sleeps;
    struct vqd_bl_lat lat[2];          /* [0]: IN (reads), [1]: OUT (writes) */
    uint64_t elapsed_ns;               /* of the last run, drain included */
    uint32_t in_flight;
    uint8_t broken;
    char reason[200];
    /* engine state */
    struct vqd_desc *desc_;
    struct vqd_avail *avail_;
    struct vqd_used *used_;
    uint32_t *free_;                   /* [iodepth] free slot stack */
    uint32_t nfree_;
    uint16_t kicked_idx_;              /* avail idx at the last kick decision (split) */
    uint16_t added_;                   /* descriptors made available since then (packed) */
    struct vqd_pdesc *pdesc_;
    struct vqd_pevent *drv_event_, *dev_event_;
    uint64_t rng_, cursor_, fill_cursor_;
};

int vqd_blkload_init(struct vqd_blkload *bl, uint32_t *free_stack);
int vqd_blkload_run(struct vqd_blkload *bl, uint64_t run_ns);
uint64_t vqd_blkload_bucket_low(uint32_t bucket);
void vqd_blkload_pattern(uint8_t *buf, uint64_t sector, uint32_t nsectors, uint64_t seed);
/* CDEF END */

#endif
