/* The device IOTLB (vqd_iotlb.h): a sorted, bounded array of disjoint
 * IOVA ranges under a writer-preferring rwlock. Changes are O(n) moves of a
 * few thousand 40-byte entries at most, run by the connection's thread;
 * the data paths only look up (vqd_iotlb_map, binary search). */
#include <stdlib.h>
#include <string.h>

#include "vqd_iotlb.h"

struct vqd_iotlb *vqd_iotlb_new(uint32_t capacity)
{
    if (capacity == 0 || capacity > (1u << 20))
        return NULL;
    struct vqd_iotlb *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->e = calloc(capacity, sizeof(*t->e));
    if (!t->e) {
        free(t);
        return NULL;
    }
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    /* An invalidation must not wait behind an endless stream of bursts. */
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&t->lock, &a);
    pthread_rwlockattr_destroy(&a);
    t->cap = capacity;
    t->rng = 0x9e3779b9u;
    return t;
}

void vqd_iotlb_free(struct vqd_iotlb *t)
{
    if (!t)
        return;
    pthread_rwlock_destroy(&t->lock);
    free(t->e);
    free(t);
}

static void remove_at(struct vqd_iotlb *t, uint32_t i)
{
    memmove(&t->e[i], &t->e[i + 1], (t->n - i - 1) * sizeof(*t->e));
    t->n--;
    t->generation++;
}

/* First index whose entry ends after iova (the insertion point's neighbour). */
static uint32_t lower_bound(const struct vqd_iotlb *t, uint64_t iova)
{
    uint32_t lo = 0, hi = t->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->e[mid].iova + (t->e[mid].size - 1) < iova)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int vqd_iotlb_update(struct vqd_iotlb *t, uint64_t iova, uint64_t size, uint64_t uaddr, uint8_t *host,
                     uint32_t perm, struct vqd_iotlb_entry *conflict)
{
    if (size == 0 || size - 1 > UINT64_MAX - iova || size - 1 > UINT64_MAX - uaddr
        || perm < VQD_ACCESS_RO || perm > VQD_ACCESS_RW)
        return VQD_IOTLB_E_ARG;
    int rc;
    pthread_rwlock_wrlock(&t->lock);
    uint32_t i = lower_bound(t, iova);
    if (i < t->n && t->e[i].iova <= iova + (size - 1)) {
        /* e[i] ends at or after iova and starts at or before our end: overlap */
        const struct vqd_iotlb_entry *o = &t->e[i];
        if (o->iova == iova && o->size == size && o->uaddr == uaddr && o->perm == perm && o->host == host) {
            rc = VQD_IOTLB_SAME;
        } else {
            if (conflict)
                *conflict = *o;
            rc = VQD_IOTLB_E_OVERLAP;
        }
        pthread_rwlock_unlock(&t->lock);
        return rc;
    }
    if (t->n == t->cap) {
        /* Full: evict one entry (not the neighbour we insert before, to keep i valid). */
        t->rng ^= t->rng << 13;
        t->rng ^= t->rng >> 17;
        t->rng ^= t->rng << 5;
        uint32_t v = t->rng % t->n;
        remove_at(t, v);
        t->evictions++;
        if (v < i)
            i--;
    }
    memmove(&t->e[i + 1], &t->e[i], (t->n - i) * sizeof(*t->e));
    t->e[i] = (struct vqd_iotlb_entry){.iova = iova, .size = size, .uaddr = uaddr, .host = host, .perm = perm};
    t->n++;
    __atomic_fetch_add(&t->updates, 1, __ATOMIC_RELEASE);
    pthread_rwlock_unlock(&t->lock);
    return VQD_IOTLB_ADDED;
}

int vqd_iotlb_invalidate(struct vqd_iotlb *t, uint64_t iova, uint64_t last)
{
    if (last < iova)
        return VQD_IOTLB_E_ARG;
    int removed = 0;
    /* The write lock waits for every burst holding the read lock: once this
     * returns, no data path uses the removed entries. Entries overlapping
     * the range go whole (as the kernel's vhost_iotlb_del_range does). */
    pthread_rwlock_wrlock(&t->lock);
    uint32_t i = lower_bound(t, iova);
    while (i < t->n && t->e[i].iova <= last) {
        remove_at(t, i);
        removed++;
    }
    if (removed)
        t->invalidations++;
    else
        t->invalidations_unmapped++;
    pthread_rwlock_unlock(&t->lock);
    return removed;
}

void vqd_iotlb_flush(struct vqd_iotlb *t)
{
    pthread_rwlock_wrlock(&t->lock);
    if (t->n)
        t->generation++;
    t->n = 0;
    pthread_rwlock_unlock(&t->lock);
}

int vqd_iotlb_copy(struct vqd_iotlb *t, struct vqd_iotlb_entry *out, int max, struct vqd_iotlb_stats *st)
{
    pthread_rwlock_rdlock(&t->lock);
    int n = (int)t->n;
    if (out && max > 0)
        memcpy(out, t->e, (size_t)(n < max ? n : max) * sizeof(*out));
    if (st) {
        st->entries = t->n;
        st->capacity = t->cap;
        st->updates = __atomic_load_n(&t->updates, __ATOMIC_RELAXED);
        st->invalidations = t->invalidations;
        st->invalidations_unmapped = t->invalidations_unmapped;
        st->evictions = t->evictions;
        st->generation = t->generation;
    }
    pthread_rwlock_unlock(&t->lock);
    return n;
}

/* For the connection's thread (ring areas): the bytes contiguous from iova
 * with perm (>= len means the whole range translates), the first entry in
 * *first (its host + (iova - first->iova) is where iova lives); or
 * VQD_IOTLB_MISS / VQD_IOTLB_PERM (*first then the entry refusing perm). */
int64_t vqd_iotlb_lookup(struct vqd_iotlb *t, uint64_t iova, uint64_t len, uint32_t perm,
                         struct vqd_iotlb_entry *first)
{
    int why = 0;
    uint32_t why_perm = 0;
    uint64_t room = 0;
    int64_t rc;
    pthread_rwlock_rdlock(&t->lock);
    (void)vqd_iotlb_map(t, iova, len, perm, &room, &why, &why_perm);   /* NULL in a mirror: see why */
    int i = vqd_iotlb_find(t, iova);
    if (i >= 0 && first)
        *first = t->e[i];
    if (why)
        rc = why;
    else
        rc = room > INT64_MAX ? INT64_MAX : (int64_t)room;
    pthread_rwlock_unlock(&t->lock);
    return rc;
}
