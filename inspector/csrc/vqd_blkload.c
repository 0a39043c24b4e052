/* The driver side of a virtio-blk requestq under load: `vqscope load blk`'s
 * data path (vqd_blkload.h has the contract). One job in one file (a little
 * over 600 lines): split and packed rings are two short ring back ends of
 * the same request loop, sharing its private state.
 *
 * Spec, split rings: §2.7.5 (descriptors, chains), §2.7.13 (supplying buffers: the
 * driver writes descriptors and avail ring entries, then avail->idx after a
 * write barrier, §2.7.13.3; then, after a full barrier, decides whether to
 * kick from VRING_USED_F_NO_NOTIFY or, with VIRTIO_F_EVENT_IDX, avail_event,
 * §2.7.13.4 / §2.7.10), §2.7.14 (receiving used buffers: used->idx is read
 * with acquire before the elements and the buffers), §2.7.7 (used buffer
 * notification suppression: VRING_AVAIL_F_NO_INTERRUPT or used_event),
 * §5.2.6 (the request: struct virtio_blk_outhdr, data, status byte).
 * Packed rings (§2.8): a chain is written at the next available slots with
 * AVAIL/USED bits from the avail wrap counter, the head's flags last with
 * release (§2.8.6, §2.8.21); used descriptors are those whose AVAIL and
 * USED bits both equal the used wrap counter (§2.8.9), read with acquire;
 * kicks follow the device's event suppression area and calls are asked
 * for in the driver's (§2.8.10, with EVENT_IDX as RING_EVENT_FLAGS_DESC).
 *
 * Waiting: after a used-ring poll finds nothing new, the engine polls again
 * `spin` times (cpu_relax between), then arms the call (used_event =
 * last_used_idx with EVENT_IDX, else clears VRING_AVAIL_F_NO_INTERRUPT),
 * re-checks used->idx after a full fence (the device may have used an entry
 * before it saw the arming), and sleeps in poll() on the call eventfd for at
 * most 50 ms (and on the vhost-user socket: a back-end that hangs up ends
 * the run). While it is busy, calls stay disarmed (used_event is left
 * behind; NO_INTERRUPT set), so a back-end that honours suppression sends
 * none. On 2 shared cores a long spin takes the CPU the back-end needs, so
 * the default spin is short (inspector/datapath/blkload.py).
 *
 * Latency: clock_gettime(CLOCK_MONOTONIC) once per batch of submissions and
 * once per reap; each completion's latency goes into its direction's
 * log-linear histogram (16 buckets per power of two: at most 1/16 relative
 * error).
 *
 * Verify pattern (per 512-byte sector; vqd_blkload_pattern): word 0 the
 * sector number, word 1 the seed, words 2..63 a splitmix64 hash of both plus
 * k times the golden ratio constant: a sector written at another offset, by
 * another seed, or not at all does not match.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vqd_blkload.h"
#include "vqd_guard.h"
#include "vqd_vq.h"

#define WAIT_MS 50
#define GOLDEN 0x9E3779B97F4A7C15ULL

_Static_assert(sizeof(struct virtio_blk_outhdr) == VIRTIO_BLK_REQ_HDR_SIZE, "virtio_blk_outhdr is 16 bytes");

enum { PHASE_TIMED, PHASE_FILL, PHASE_DRAIN };

static int bl_fail(struct vqd_blkload *bl, int rc, const char *fmt, ...)
{
    if (!bl->broken || rc == VQD_E_INVAL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(bl->reason, sizeof(bl->reason), fmt, ap);
        va_end(ap);
    }
    if (rc == VQD_E_BROKEN)
        bl->broken = 1;
    return rc;
}

static int bl_fault(struct vqd_blkload *bl)
{
    uintptr_t a = (uintptr_t)vqd_guard_fault_addr(), m = (uintptr_t)bl->mem;
    if (a >= m && a - m < bl->mem_size)
        return bl_fail(bl, VQD_E_BROKEN, "SIGBUS at guest-physical %#llx: the guest memory shrank",
                       (unsigned long long)(a - m));
    return bl_fail(bl, VQD_E_BROKEN, "SIGBUS at host address %#llx", (unsigned long long)a);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Is [gpa, gpa + len) inside guest memory? */
static inline int in_mem(const struct vqd_blkload *bl, uint64_t gpa, uint64_t len)
{
    return gpa <= bl->mem_size && len <= bl->mem_size - gpa;
}

static inline uint64_t xorshift64s(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static inline uint64_t splitmix64(uint64_t z)
{
    z += GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void vqd_blkload_pattern(uint8_t *buf, uint64_t sector, uint32_t nsectors, uint64_t seed)
{
    for (uint32_t s = 0; s < nsectors; s++, sector++) {
        uint64_t w[VIRTIO_BLK_SECTOR_SIZE / 8];
        uint64_t h = splitmix64(sector ^ (seed << 32 | seed >> 32));
        w[0] = sector;
        w[1] = seed;
        for (uint32_t k = 2; k < VIRTIO_BLK_SECTOR_SIZE / 8; k++)
            w[k] = h + k * GOLDEN;
        memcpy(buf + (uint64_t)s * VIRTIO_BLK_SECTOR_SIZE, w, sizeof(w));
    }
}

static inline uint32_t bucket_of(uint64_t v)
{
    if (v < VQD_BL_HIST_SUB)
        return (uint32_t)v;
    uint32_t msb = 63 - (uint32_t)__builtin_clzll(v);
    return (msb - 3) * VQD_BL_HIST_SUB + (uint32_t)((v >> (msb - 4)) & (VQD_BL_HIST_SUB - 1));
}

uint64_t vqd_blkload_bucket_low(uint32_t b)
{
    if (b < VQD_BL_HIST_SUB)
        return b;
    if (b >= VQD_BL_HIST_BUCKETS || b / VQD_BL_HIST_SUB > 60)
        return UINT64_MAX;
    return (uint64_t)(VQD_BL_HIST_SUB + b % VQD_BL_HIST_SUB) << (b / VQD_BL_HIST_SUB - 1);
}

static inline uint8_t *host(const struct vqd_blkload *bl, uint64_t gpa)
{
    return bl->mem + gpa;
}

static inline uint16_t *used_event_ptr(struct vqd_blkload *bl)
{
    return &bl->avail_->ring[bl->num]; /* §2.7.6: after ring[Queue Size] */
}

static inline uint16_t *avail_event_ptr(struct vqd_blkload *bl)
{
    return (uint16_t *)&bl->used_->ring[bl->num]; /* §2.7.8: after ring[Queue Size] */
}

static int bl_init(struct vqd_blkload *bl)
{
    uint32_t n = bl->num;
    if (!bl->mem || !bl->slots)
        return bl_fail(bl, VQD_E_INVAL, "no guest memory or no slots");
    if (n == 0 || n > VQD_MAX_QUEUE_SIZE || (!bl->packed && (n & (n - 1))))
        return bl_fail(bl, VQD_E_INVAL, "queue size %u is not %s up to %u (§2.7, §2.8)", n,
                       bl->packed ? "between 1 and" : "a power of two", VQD_MAX_QUEUE_SIZE);
    uint64_t avail_len = bl->packed ? sizeof(struct vqd_pevent) : 6 + 2ULL * n;
    uint64_t used_len = bl->packed ? sizeof(struct vqd_pevent) : 6 + 8ULL * n;
    if (!in_mem(bl, bl->desc_gpa, 16ULL * n) || (bl->desc_gpa & 15) || !in_mem(bl, bl->avail_gpa, avail_len)
        || (bl->avail_gpa & (bl->packed ? 3 : 1)) || !in_mem(bl, bl->used_gpa, used_len) || (bl->used_gpa & 3))
        return bl_fail(bl, VQD_E_INVAL, "ring areas desc %#llx avail %#llx used %#llx (size %u) are not "
                       "aligned inside the %#llx bytes of guest memory", (unsigned long long)bl->desc_gpa,
                       (unsigned long long)bl->avail_gpa, (unsigned long long)bl->used_gpa, n,
                       (unsigned long long)bl->mem_size);
    if (bl->bs == 0 || bl->bs % VIRTIO_BLK_SECTOR_SIZE)
        return bl_fail(bl, VQD_E_INVAL, "bs %u is not a positive multiple of %u", bl->bs, VIRTIO_BLK_SECTOR_SIZE);
    if (bl->seg_size < VIRTIO_BLK_SECTOR_SIZE)
        return bl_fail(bl, VQD_E_INVAL, "seg_size %u is below %u", bl->seg_size, VIRTIO_BLK_SECTOR_SIZE);
    uint32_t seg = bl->seg_size < bl->bs ? bl->seg_size : bl->bs;
    uint32_t nseg = (bl->bs + seg - 1) / seg;
    uint32_t d = 2 + nseg;
    if (bl->iodepth == 0 || bl->iodepth > VQD_BL_MAX_SLOTS || (uint64_t)bl->iodepth * d > n)
        return bl_fail(bl, VQD_E_INVAL, "iodepth %u x %u descriptors per request does not fit queue size %u "
                       "(max %u slots)", bl->iodepth, d, n, VQD_BL_MAX_SLOTS);
    if (bl->read_pct > 100 || bl->pattern > VQD_BL_RANDOM)
        return bl_fail(bl, VQD_E_INVAL, "read_pct %u / pattern %u out of range", bl->read_pct, bl->pattern);
    uint64_t spb = bl->bs / VIRTIO_BLK_SECTOR_SIZE;
    if (bl->region_blocks == 0 || bl->region_blocks > (UINT64_MAX - bl->region_sector) / spb)
        return bl_fail(bl, VQD_E_INVAL, "region of %llu blocks at sector %llu is empty or overflows",
                       (unsigned long long)bl->region_blocks, (unsigned long long)bl->region_sector);
    for (uint32_t i = 0; i < bl->iodepth; i++) {
        struct vqd_bl_slot *s = &bl->slots[i];
        if (!in_mem(bl, s->hdr_gpa, VIRTIO_BLK_REQ_HDR_SIZE) || !in_mem(bl, s->status_gpa, 1)
            || !in_mem(bl, s->data_gpa, bl->bs))
            return bl_fail(bl, VQD_E_INVAL, "slot %u (header %#llx, status %#llx, data %#llx+%u) is not in "
                           "guest memory", i, (unsigned long long)s->hdr_gpa,
                           (unsigned long long)s->status_gpa, (unsigned long long)s->data_gpa, bl->bs);
    }
    if (bl->packed && (bl->avail_idx >= n || bl->last_used_idx >= n))
        return bl_fail(bl, VQD_E_INVAL, "packed positions avail %u / used %u are not below queue size %u",
                       bl->avail_idx, bl->last_used_idx, n);
    bl->descs_per_slot = d;
    bl->desc_ = (struct vqd_desc *)host(bl, bl->desc_gpa);
    bl->avail_ = (struct vqd_avail *)host(bl, bl->avail_gpa);
    bl->used_ = (struct vqd_used *)host(bl, bl->used_gpa);
    bl->pdesc_ = (struct vqd_pdesc *)host(bl, bl->desc_gpa);
    bl->drv_event_ = (struct vqd_pevent *)host(bl, bl->avail_gpa);
    bl->dev_event_ = (struct vqd_pevent *)host(bl, bl->used_gpa);
    bl->added_ = 0;
    /* Split: each slot's fixed chain: header (readable), data segments, status (writable). */
    for (uint32_t i = 0; i < bl->iodepth; i++) {
        struct vqd_bl_slot *s = &bl->slots[i];
        s->in_flight = 0;
        bl->free_[bl->iodepth - 1 - i] = i;
        if (bl->packed)
            continue;
        struct vqd_desc *c = &bl->desc_[i * d];
        uint16_t base = (uint16_t)(i * d);
        c[0] = (struct vqd_desc){s->hdr_gpa, VIRTIO_BLK_REQ_HDR_SIZE, VRING_DESC_F_NEXT, (uint16_t)(base + 1)};
        for (uint32_t k = 0; k < nseg; k++) {
            uint32_t len = bl->bs - k * seg < seg ? bl->bs - k * seg : seg;
            c[1 + k] = (struct vqd_desc){s->data_gpa + (uint64_t)k * seg, len, VRING_DESC_F_NEXT,
                                         (uint16_t)(base + 2 + k)};
        }
        c[d - 1] = (struct vqd_desc){s->status_gpa, 1, VRING_DESC_F_WRITE, 0};
    }
    bl->nfree_ = bl->iodepth;
    bl->in_flight = 0;
    bl->broken = 0;
    bl->reason[0] = 0;
    bl->rng_ = splitmix64(bl->seed ^ bl->region_sector) | 1;
    bl->cursor_ = bl->fill_cursor_ = 0;
    bl->kicked_idx_ = bl->avail_idx;
    return VQD_OK;
}

int vqd_blkload_init(struct vqd_blkload *bl, uint32_t *free_stack)
{
    int rc;
    bl->free_ = free_stack;
    if (!free_stack)
        return bl_fail(bl, VQD_E_INVAL, "no free-slot stack");
    VQD_GUARDED(rc, bl_init(bl), rc = bl_fault(bl));
    return rc;
}

static inline int bit_get(const uint8_t *map, uint64_t b)
{
    return map[b >> 3] >> (b & 7) & 1;
}

/* §2.8.6 / §2.8.21: write slot `id`'s chain at the next available slots,
 * each descriptor's AVAIL/USED bits from the wrap counter of its own slot;
 * the head's flags last, with release, so that the device sees the chain
 * whole once it sees the head (§2.8.11: one chain is published at a time). */
static inline void make_available_packed(struct vqd_blkload *bl, const struct vqd_bl_slot *s, uint32_t id,
                                         int is_read)
{
    uint32_t d = bl->descs_per_slot, seg = bl->seg_size < bl->bs ? bl->seg_size : bl->bs;
    uint16_t head = bl->avail_idx, head_flags = 0;
    for (uint32_t k = 0; k < d; k++) {
        struct vqd_pdesc *pd = &bl->pdesc_[bl->avail_idx];
        uint16_t fl = bl->avail_wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
        if (k == 0) {
            pd->addr = s->hdr_gpa;
            pd->len = VIRTIO_BLK_REQ_HDR_SIZE;
        } else if (k == d - 1) {
            pd->addr = s->status_gpa;
            pd->len = 1;
            fl |= VRING_DESC_F_WRITE;
        } else {
            uint32_t off = (k - 1) * seg;
            pd->addr = s->data_gpa + off;
            pd->len = bl->bs - off < seg ? bl->bs - off : seg;
            fl |= is_read ? VRING_DESC_F_WRITE : 0;
        }
        pd->id = (uint16_t)id;
        fl |= k < d - 1 ? VRING_DESC_F_NEXT : 0;
        if (k == 0)
            head_flags = fl;
        else
            __atomic_store_n(&pd->flags, fl, __ATOMIC_RELAXED);
        if (++bl->avail_idx == bl->num) {
            bl->avail_idx = 0;
            bl->avail_wrap ^= 1;
        }
    }
    __atomic_store_n(&bl->pdesc_[head].flags, head_flags, __ATOMIC_RELEASE);
    bl->added_ += d;
}

/* Put one request for block `block` on the ring (not yet published). */
static inline void submit(struct vqd_blkload *bl, uint64_t block, int is_read, int fill, uint64_t t)
{
    uint32_t i = bl->free_[--bl->nfree_];
    struct vqd_bl_slot *s = &bl->slots[i];
    uint32_t d = bl->descs_per_slot;
    uint16_t head = (uint16_t)(i * d);
    s->sector = bl->region_sector + block * (bl->bs / VIRTIO_BLK_SECTOR_SIZE);
    s->type = is_read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
    s->fill = (uint8_t)fill;
    s->check = is_read && bl->verify && (!bl->written || bit_get(bl->written, block));
    struct virtio_blk_outhdr h = {s->type, 0, s->sector};
    memcpy(host(bl, s->hdr_gpa), &h, sizeof(h));
    if (!is_read && bl->verify)
        vqd_blkload_pattern(host(bl, s->data_gpa), s->sector, bl->bs / VIRTIO_BLK_SECTOR_SIZE, bl->seed);
    *host(bl, s->status_gpa) = 0xFF; /* not a status: the device did not write it */
    s->submit_ns = t;
    if (bl->packed) {
        make_available_packed(bl, s, i, is_read);
    } else {
        for (uint32_t k = 1; k < d - 1; k++)
            bl->desc_[head + k].flags = VRING_DESC_F_NEXT | (is_read ? VRING_DESC_F_WRITE : 0);
        __atomic_store_n(&bl->avail_->ring[bl->avail_idx & (bl->num - 1)], head, __ATOMIC_RELAXED);
        bl->avail_idx++;
    }
    s->in_flight = 1;
    bl->in_flight++;
    bl->submitted++;
}

/* Publish avail->idx and kick if the device asked for it (§2.7.13.3-4). */
static inline void publish(struct vqd_blkload *bl)
{
    int need;
    if (bl->packed) {   /* §2.8.10: the device's event suppression area */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint16_t flags = __atomic_load_n(&bl->dev_event_->flags, __ATOMIC_RELAXED) & 3;
        uint16_t off_wrap = __atomic_load_n(&bl->dev_event_->off_wrap, __ATOMIC_RELAXED);
        if (flags == RING_EVENT_FLAGS_DESC && bl->event_idx) {   /* as Linux's virtqueue_kick_prepare_packed */
            uint16_t off = off_wrap & RING_EVENT_OFF_MASK, now = bl->avail_idx;
            if ((off_wrap >> RING_EVENT_WRAP_SHIFT) != bl->avail_wrap)
                off = (uint16_t)(off - bl->num);
            need = vqd_need_event(off, now, (uint16_t)(now - bl->added_));
        } else {
            need = flags != RING_EVENT_FLAGS_DISABLE;
        }
        bl->added_ = 0;
        goto kick;
    }
    __atomic_store_n(&bl->avail_->idx, bl->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (bl->event_idx)
        need = vqd_need_event(__atomic_load_n(avail_event_ptr(bl), __ATOMIC_RELAXED), bl->avail_idx,
                              bl->kicked_idx_);
    else
        need = !(__atomic_load_n(&bl->used_->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
    bl->kicked_idx_ = bl->avail_idx;
kick:
    if (need && bl->kick_fd >= 0) {
        uint64_t one = 1;
        if (write(bl->kick_fd, &one, sizeof(one)) == sizeof(one))
            bl->kicks++;
    } else {
        bl->kicks_suppressed++;
    }
}

static void verify_read(struct vqd_blkload *bl, const struct vqd_bl_slot *s)
{
    const uint8_t *data = host(bl, s->data_gpa);
    uint8_t want[VIRTIO_BLK_SECTOR_SIZE];
    for (uint32_t k = 0; k < bl->bs / VIRTIO_BLK_SECTOR_SIZE; k++) {
        const uint8_t *got = data + (uint64_t)k * VIRTIO_BLK_SECTOR_SIZE;
        vqd_blkload_pattern(want, s->sector + k, 1, bl->seed);
        if (LIKELY(!memcmp(got, want, sizeof(want)))) {
            bl->verified_sectors++;
            continue;
        }
        if (!bl->mismatched_sectors++) {
            bl->first_mismatch_sector = s->sector + k;
            for (uint32_t w = 0; w < sizeof(want) / 8; w++) {
                uint64_t g, x;
                memcpy(&g, got + 8 * w, 8);
                memcpy(&x, want + 8 * w, 8);
                if (g != x) {
                    bl->mismatch_got = g;
                    bl->mismatch_want = x;
                    break;
                }
            }
        }
    }
}

/* Complete slot `s` (id `id`) with used length `len` at time `t`; `where`
 * names the used entry for a report. Returns 0, or VQD_E_BROKEN for a len
 * beyond the chain. */
static int complete_one(struct vqd_blkload *bl, struct vqd_bl_slot *s, uint32_t id, uint32_t len, uint64_t t,
                        const char *where, uint32_t at)
{
    int is_read = s->type == VIRTIO_BLK_T_IN;
    uint32_t writable = (is_read ? bl->bs : 0) + 1;
    if (len > writable)
        return bl_fail(bl, VQD_E_BROKEN, "%s[%u]: id %u has len %u, more than the %u bytes its chain lets the "
                       "device write (§2.7.8.1, §2.8.9)", where, at, id, len, writable);
    if (len < writable)
        bl->used_len_short++;
    uint8_t status = __atomic_load_n(host(bl, s->status_gpa), __ATOMIC_RELAXED);
    int ok = status == VIRTIO_BLK_S_OK;
    if (ok)
        bl->status_ok++;
    else if (status == VIRTIO_BLK_S_IOERR)
        bl->status_ioerr++;
    else if (status == VIRTIO_BLK_S_UNSUPP)
        bl->status_unsupp++;
    else
        bl->status_other++;
    uint64_t block = (s->sector - bl->region_sector) / (bl->bs / VIRTIO_BLK_SECTOR_SIZE);
    if (is_read) {
        bl->reads++;
        if (ok) {
            bl->bytes_read += bl->bs;
            if (s->check)
                verify_read(bl, s);
            else if (bl->verify)
                bl->unverified_reads++;
        }
    } else {
        bl->writes++;
        bl->fills += s->fill;
        if (ok) {
            bl->bytes_written += bl->bs;
            if (bl->written)
                bl->written[block >> 3] |= (uint8_t)(1u << (block & 7));
        }
    }
    uint64_t lat = t > s->submit_ns ? t - s->submit_ns : 0;
    struct vqd_bl_lat *l = &bl->lat[!is_read];
    l->hist[bucket_of(lat)]++;
    l->n++;
    l->sum_ns += lat;
    if (lat < l->min_ns)
        l->min_ns = lat;
    if (lat > l->max_ns)
        l->max_ns = lat;
    s->in_flight = 0;
    bl->free_[bl->nfree_++] = (uint32_t)(s - bl->slots);
    bl->in_flight--;
    bl->completed++;
    return 0;
}

/* Split: take the used elements published since last_used_idx, each
 * checked (§2.7.8) before it is believed. Returns how many, or VQD_E_BROKEN. */
static int reap_split(struct vqd_blkload *bl, uint64_t t)
{
    uint16_t uidx = __atomic_load_n(&bl->used_->idx, __ATOMIC_ACQUIRE);
    uint16_t pending = (uint16_t)(uidx - bl->last_used_idx);
    if (!pending)
        return 0;
    if (pending > bl->in_flight)
        return bl_fail(bl, VQD_E_BROKEN, "used->idx %u is %u entries past the last used %u, but only %u "
                       "requests are in flight (§2.7.8)", uidx, pending, bl->last_used_idx, bl->in_flight);
    uint32_t d = bl->descs_per_slot;
    for (uint16_t n = 0; n < pending; n++) {
        uint16_t at = bl->last_used_idx & (bl->num - 1);
        uint32_t id = __atomic_load_n(&bl->used_->ring[at].id, __ATOMIC_RELAXED);
        uint32_t len = __atomic_load_n(&bl->used_->ring[at].len, __ATOMIC_RELAXED);
        struct vqd_bl_slot *s = id % d == 0 && id / d < bl->iodepth ? &bl->slots[id / d] : NULL;
        if (!s || !s->in_flight)
            return bl_fail(bl, VQD_E_BROKEN, "used->ring[%u] (used idx %u) has id %u, which is not the head "
                           "of a request in flight (heads are multiples of %u below %u)", at,
                           bl->last_used_idx, id, d, bl->iodepth * d);
        if (complete_one(bl, s, id, len, t, "used->ring", at) < 0)
            return VQD_E_BROKEN;
        bl->last_used_idx++;
    }
    return pending;
}

/* Packed: take the used descriptors from next used slot on (§2.8.9: AVAIL
 * and USED both equal to the used wrap counter), each checked before it is
 * believed; a used buffer's chain took descs_per_slot slots (§2.8.21).
 * Bounded: each one completes a request in flight. Returns how many. */
static int reap_packed(struct vqd_blkload *bl, uint64_t t)
{
    int n = 0;
    for (;;) {
        uint16_t at = bl->last_used_idx;
        struct vqd_pdesc *pd = &bl->pdesc_[at];
        uint16_t fl = __atomic_load_n(&pd->flags, __ATOMIC_ACQUIRE);
        if (!!(fl & VIRTQ_DESC_F_AVAIL) != bl->used_wrap || !!(fl & VIRTQ_DESC_F_USED) != bl->used_wrap)
            return n;
        uint32_t id = __atomic_load_n(&pd->id, __ATOMIC_RELAXED);
        uint32_t len = __atomic_load_n(&pd->len, __ATOMIC_RELAXED);
        struct vqd_bl_slot *s = id < bl->iodepth ? &bl->slots[id] : NULL;
        if (!s || !s->in_flight)
            return bl_fail(bl, VQD_E_BROKEN, "used descriptor at slot %u (wrap %u) has buffer id %u, which is "
                           "not a request in flight (ids are below %u)", at, bl->used_wrap, id, bl->iodepth);
        if (complete_one(bl, s, id, len, t, "packed used descriptor", at) < 0)
            return VQD_E_BROKEN;
        uint32_t next = (uint32_t)at + bl->descs_per_slot;
        if (next >= bl->num) {
            next -= bl->num;
            bl->used_wrap ^= 1;
        }
        bl->last_used_idx = (uint16_t)next;
        n++;
    }
}

static inline int reap(struct vqd_blkload *bl, uint64_t t)
{
    return bl->packed ? reap_packed(bl, t) : reap_split(bl, t);
}

/* Is anything used that reap has not taken (after the arming's fence)? */
static inline int has_used(struct vqd_blkload *bl)
{
    if (bl->packed) {
        uint16_t fl = __atomic_load_n(&bl->pdesc_[bl->last_used_idx].flags, __ATOMIC_ACQUIRE);
        return !!(fl & VIRTQ_DESC_F_AVAIL) == bl->used_wrap && !!(fl & VIRTQ_DESC_F_USED) == bl->used_wrap;
    }
    return __atomic_load_n(&bl->used_->idx, __ATOMIC_ACQUIRE) != bl->last_used_idx;
}

/* The next block not yet written (fill phase), or -1 when none is left. */
static inline int64_t next_hole(struct vqd_blkload *bl)
{
    while (bl->fill_cursor_ < bl->region_blocks) {
        uint64_t b = bl->fill_cursor_++;
        if (!bit_get(bl->written, b))
            return (int64_t)b;
    }
    return -1;
}

static inline void arm_calls(struct vqd_blkload *bl, int on)
{
    if (bl->packed) {   /* §2.8.10: the driver's event suppression area */
        if (on && bl->event_idx) {
            __atomic_store_n(&bl->drv_event_->off_wrap,
                             (uint16_t)(bl->last_used_idx | bl->used_wrap << RING_EVENT_WRAP_SHIFT), __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_RELEASE);
        }
        __atomic_store_n(&bl->drv_event_->flags, on ? (bl->event_idx ? RING_EVENT_FLAGS_DESC : RING_EVENT_FLAGS_ENABLE)
                         : RING_EVENT_FLAGS_DISABLE, __ATOMIC_RELAXED);
        return;
    }
    if (bl->event_idx) {
        if (on)
            __atomic_store_n(used_event_ptr(bl), bl->last_used_idx, __ATOMIC_RELAXED);
    } else {
        __atomic_store_n(&bl->avail_->flags, on ? 0 : VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
    }
}

static int bl_run(struct vqd_blkload *bl, uint64_t run_ns)
{
    uint64_t start = now_ns(), t = start, deadline = start + run_ns, progress = start;
    int phase = PHASE_TIMED;
    /* Each run counts afresh: every "out" field from submitted to elapsed_ns. */
    memset(&bl->submitted, 0, offsetof(struct vqd_blkload, elapsed_ns) - offsetof(struct vqd_blkload, submitted));
    bl->lat[0].min_ns = bl->lat[1].min_ns = UINT64_MAX;
    uint32_t idle = 0;
    arm_calls(bl, 0);
    while (!bl->broken) {
        if (phase != PHASE_DRAIN && __atomic_load_n(&bl->stop, __ATOMIC_RELAXED))
            phase = PHASE_DRAIN;
        if (phase == PHASE_TIMED && (t >= deadline || (bl->max_ios && bl->submitted >= bl->max_ios)))
            phase = bl->fill && bl->written ? PHASE_FILL : PHASE_DRAIN;
        uint32_t added = 0;
        while (bl->nfree_ && phase != PHASE_DRAIN) {
            if (phase == PHASE_FILL) {
                int64_t hole = next_hole(bl);
                if (hole < 0) {
                    phase = PHASE_DRAIN;
                    break;
                }
                submit(bl, (uint64_t)hole, 0, 1, t);
            } else {
                uint64_t block;
                if (bl->pattern == VQD_BL_RANDOM) {
                    block = (xorshift64s(&bl->rng_) >> 11) % bl->region_blocks;
                } else {
                    block = bl->cursor_;
                    bl->cursor_ = bl->cursor_ + 1 < bl->region_blocks ? bl->cursor_ + 1 : 0;
                }
                int is_read = bl->read_pct == 100 ? 1 : bl->read_pct == 0
                    ? 0 : (int)((xorshift64s(&bl->rng_) >> 11) % 100 < bl->read_pct);
                submit(bl, block, is_read, 0, t);
                if (bl->max_ios && bl->submitted >= bl->max_ios)
                    phase = PHASE_DRAIN;
            }
            added++;
        }
        if (added)
            publish(bl);
        if (phase == PHASE_DRAIN && !bl->in_flight)
            break;
        t = now_ns();
        int got = reap(bl, t);
        if (got < 0)
            break;
        if (got) {
            idle = 0;
            progress = t;
            continue;
        }
        if (added || ++idle <= bl->spin) {
            cpu_relax();
            continue;
        }
        idle = 0;
        if (bl->in_flight && t - progress > bl->stall_ns) {
            bl_fail(bl, VQD_E_BROKEN, "the back-end completed nothing for %.1f s with %u request(s) in flight "
                    "(%s %u, %s %u)", (t - progress) / 1e9, bl->in_flight,
                    bl->packed ? "next avail slot" : "avail->idx", bl->avail_idx,
                    bl->packed ? "next used slot" : "used->idx", bl->packed ? bl->last_used_idx
                    : __atomic_load_n(&bl->used_->idx, __ATOMIC_RELAXED));
            break;
        }
        arm_calls(bl, 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (!has_used(bl)) {
            int ms = WAIT_MS;
            if (phase == PHASE_TIMED && deadline - t < (uint64_t)WAIT_MS * 1000000ULL)
                ms = (int)((deadline - t) / 1000000ULL) + 1;
            struct pollfd p[2] = {{bl->call_fd, POLLIN, 0}, {bl->conn_fd, POLLRDHUP, 0}};
            bl->sleeps++;
            if (poll(p, 2, ms) > 0) {
                uint64_t v;
                if ((p[0].revents & POLLIN) && read(bl->call_fd, &v, sizeof(v)) == sizeof(v))
                    bl->calls += v;
                if (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
                    bl_fail(bl, VQD_E_BROKEN, "the back-end closed the vhost-user connection with %u "
                            "request(s) in flight", bl->in_flight);
                    break;
                }
            }
        }
        arm_calls(bl, 0);
        t = now_ns();
    }
    /* Leave the ring as a plain driver expects it: calls wanted. */
    arm_calls(bl, 1);
    bl->elapsed_ns = now_ns() - start;
    return bl->broken ? VQD_E_BROKEN : VQD_OK;
}

int vqd_blkload_run(struct vqd_blkload *bl, uint64_t run_ns)
{
    int rc;
    if (!bl->desc_)
        return bl_fail(bl, VQD_E_INVAL, "vqd_blkload_run before vqd_blkload_init");
    VQD_GUARDED(rc, bl_run(bl, run_ns), rc = bl_fault(bl));
    return rc;
}
