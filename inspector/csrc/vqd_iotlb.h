/* The device IOTLB of a back-end connection: IOVA -> host translations the
 * front-end hands out (vhost-user VHOST_USER_IOTLB_MSG, struct
 * vhost_iotlb_msg: UPDATE iova/size/uaddr/perm, INVALIDATE iova/size) when
 * VIRTIO_F_ACCESS_PLATFORM was negotiated (VIRTIO 1.2 §6.1: "the device
 * ... accesses memory through the platform's IOMMU"). Every ring and buffer
 * address the driver gives is then an IOVA; the device may touch a buffer
 * only through an entry whose permission allows the access
 * (VHOST_ACCESS_RO: the device reads, WO: it writes, RW: both).
 *
 * Structure: entries sorted by iova, never overlapping (an UPDATE that
 * overlaps a different entry is refused: the front-end must INVALIDATE
 * first), at most `capacity` of them; a full table evicts one entry (a cache:
 * an evicted translation only misses again, as DPDK's vhost IOTLB does).
 * Lookups are binary searches; a translation may run on across neighbours
 * that are contiguous in both IOVA and host space (a ring or a buffer
 * crossing page-sized entries).
 *
 * Each entry's host pointer was computed by the caller from its uaddr and
 * the memory table; the caller flushes the table when that memory table
 * changes (its mappings go away). A table whose host pointers are NULL only
 * mirrors what a front-end said (a proxy's view): it is never given to a vq.
 *
 * Concurrency: the connection's thread changes the table
 * (update/invalidate/flush) under the write lock; a data-path thread holds
 * the read lock for a whole burst (VQD_VQ_GUARDED in vqd_vq_impl.h), so an
 * invalidation returns only after every burst that could still use the
 * old entry ended: "invalidation takes effect before the next access".
 * The lock is taken outside the SIGBUS-guarded section (a fault abandons
 * that section, never the lock).
 */
#ifndef VQD_IOTLB_H
#define VQD_IOTLB_H

#include <pthread.h>
#include <stdint.h>

/* CDEF BEGIN */
/* struct vhost_iotlb_msg.perm (include/uapi/linux/vhost_types.h). */
#define VQD_ACCESS_RO 1
#define VQD_ACCESS_WO 2
#define VQD_ACCESS_RW 3
#define VQD_IOTLB_DEFAULT_CAPACITY 16384

/* vqd_iotlb_update results (>= 0: the table holds the mapping). */
#define VQD_IOTLB_ADDED 0
#define VQD_IOTLB_SAME 1           /* an identical entry was there: nothing changed */
#define VQD_IOTLB_E_OVERLAP -1     /* overlaps a different entry (*conflict says which) */
#define VQD_IOTLB_E_ARG -2         /* size 0, iova + size or uaddr + size past 2^64, bad perm */

/* vqd_iotlb_lookup results when no translation is returned. */
#define VQD_IOTLB_MISS -1
#define VQD_IOTLB_PERM -2

struct vqd_iotlb_entry {
    uint64_t iova;
    uint64_t size;
    uint64_t uaddr;    /* the front-end's virtual address (the memory table's userspace_addr space) */
    uint8_t *host;     /* where uaddr is mapped here (NULL in a mirror) */
    uint32_t perm;     /* VQD_ACCESS_* */
    uint32_t pad;
};

struct vqd_iotlb_stats {
    uint32_t entries;
    uint32_t capacity;
    uint64_t updates;               /* UPDATEs that added an entry */
    uint64_t invalidations;         /* INVALIDATEs that removed at least one entry */
    uint64_t invalidations_unmapped; /* INVALIDATEs of ranges that held no entry */
    uint64_t evictions;             /* entries dropped because the table was full */
    uint64_t generation;            /* bumped whenever an entry goes away */
};

struct vqd_iotlb;

struct vqd_iotlb *vqd_iotlb_new(uint32_t capacity);
void vqd_iotlb_free(struct vqd_iotlb *t);
int vqd_iotlb_update(struct vqd_iotlb *t, uint64_t iova, uint64_t size, uint64_t uaddr, uint8_t *host,
                     uint32_t perm, struct vqd_iotlb_entry *conflict);
int vqd_iotlb_invalidate(struct vqd_iotlb *t, uint64_t iova, uint64_t last);   /* [iova, last] */
void vqd_iotlb_flush(struct vqd_iotlb *t);
int vqd_iotlb_copy(struct vqd_iotlb *t, struct vqd_iotlb_entry *out, int max, struct vqd_iotlb_stats *st);
int64_t vqd_iotlb_lookup(struct vqd_iotlb *t, uint64_t iova, uint64_t len, uint32_t perm,
                         struct vqd_iotlb_entry *first);
/* CDEF END */

struct vqd_iotlb {
    pthread_rwlock_t lock;
    struct vqd_iotlb_entry *e;   /* [cap], e[0..n) sorted by iova, disjoint */
    uint32_t n;
    uint32_t cap;
    uint32_t rng;                /* xorshift state for eviction */
    uint64_t updates;            /* read without the lock by vqd_vq_iotlb_waiting: atomic */
    uint64_t invalidations;
    uint64_t invalidations_unmapped;
    uint64_t evictions;
    uint64_t generation;
};

/* Index of the entry holding iova, or -1 (caller holds a lock). */
static inline int vqd_iotlb_find(const struct vqd_iotlb *t, uint64_t iova)
{
    int lo = 0, hi = (int)t->n - 1, hit = -1;
    while (lo <= hi) {   /* last entry with e.iova <= iova */
        int mid = lo + (hi - lo) / 2;
        if (t->e[mid].iova <= iova) {
            hit = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    if (hit >= 0 && iova - t->e[hit].iova < t->e[hit].size)
        return hit;
    return -1;
}

/* At most this many neighbouring entries are joined into one contiguous run:
 * 256 pages, more than the largest ring area or indirect table (512 KiB). */
#define VQD_IOTLB_MAX_RUN 256

/* Translate iova for an access needing `perm`: the host pointer, and in
 * *room the bytes from there contiguous in both spaces with that perm
 * (joining up to VQD_IOTLB_MAX_RUN entries while *room < want; a mirror's
 * entries join on uaddr alone). NULL with
 * *why = VQD_IOTLB_MISS (no entry) or VQD_IOTLB_PERM (*why_perm: the
 * entry's). Caller holds a lock. */
static inline uint8_t *vqd_iotlb_map(const struct vqd_iotlb *t, uint64_t iova, uint64_t want, uint32_t perm,
                                     uint64_t *room, int *why, uint32_t *why_perm)
{
    int i = vqd_iotlb_find(t, iova);
    if (i < 0) {
        *why = VQD_IOTLB_MISS;
        return NULL;
    }
    const struct vqd_iotlb_entry *e = &t->e[i];
    if ((e->perm & perm) != perm) {
        *why = VQD_IOTLB_PERM;
        *why_perm = e->perm;
        return NULL;
    }
    uint64_t off = iova - e->iova;
    uint64_t r = e->size - off;
    for (uint32_t j = (uint32_t)i + 1; r < want && j < t->n && j <= (uint32_t)i + VQD_IOTLB_MAX_RUN; j++) {
        const struct vqd_iotlb_entry *f = &t->e[j];
        if (f->iova != e->iova + e->size || f->uaddr != e->uaddr + e->size
            || (e->host && f->host != e->host + e->size) || (f->perm & perm) != perm)
            break;
        r += f->size;
        e = f;
    }
    *room = r;
    return t->e[i].host + off;
}

#endif
