/* virtio-net's fast paths (VIRTIO 1.2 §5.1.6) over the device-side vqs of
 * vqd_vq.c: loopback (TX frames delivered to RX with the MACs swapped; a
 * frame RX has no buffer for is dropped and counted in the RX vq's drops, as
 * a NIC does), tap transmit and tap receive, each a burst per call. Frames are copied between
 * iovecs with a cursor; the virtio_net_hdr is skipped on transmit and
 * written (all zero but num_buffers) on receive.
 *
 * Spec: §5.1.6 (device operation), §5.1.6.1 (virtio_net_hdr), §5.1.6.2
 * (transmit: header then frame, device-readable), §5.1.6.3.1 / §5.1.6.4 /
 * §5.1.6.4.2 (receive buffers, num_buffers, VIRTIO_NET_F_MRG_RXBUF), and
 * §2.7.8 / §2.7.10 through vqd_vq_impl.h (used elements, calls), §2.8.9 /
 * §2.8.10 through vqd_pvq_impl.h (used descriptors, calls).
 *
 * Ring layouts: the layout-dependent half (popping chains, using them,
 * publishing and calling, giving chains back) is vqd_net_tmpl.h, compiled
 * twice below: over the split ring's steps (vqd_vq_impl.h) and over the
 * packed ring's (vqd_pvq_impl.h). The exported paths pick the copy once per
 * burst from the queue (pdesc set: packed); frames never branch on it.
 *
 * Guards: each exported path runs its whole burst under one VQD_GUARDED
 * section (vqd_guard.h); a SIGBUS marks every queue of the call broken
 * (they share the memory that shrank) and returns VQD_E_BROKEN. Chains are
 * popped through vqd_pop_one / vqd_ppop (bounded walks, region-checked
 * addresses); a burst ends after `budget` frames, and a frame spans at most
 * VQD_NET_IOV iovecs per chain.
 *
 * Speed (loopback under dpdk-testpmd, 64-byte frames, measured with per-phase
 * cycle counts and perf annotate): the cost is memory the driver's CPU wrote
 * last (its descriptors, the header line of an mbuf it transmitted from), so
 * a batch of transmit chains is popped first and the frames, receive buffers
 * and used-ring lines of the batch are prefetched (for writing where we
 * write: PREFETCHW) before the copies; prefetches are hints on addresses
 * mapped through the region table, and pop still checks everything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <sys/uio.h>
#include <unistd.h>

#include "vqd_net.h"
#include "vqd_pvq_impl.h"
#include "vqd_vq_impl.h"

#define VQD_BURST 32 /* frames per batch: transmit chains popped together, used elements published */

/* Status of delivering one frame into a receive queue. */
enum { DELIVER_OK = 0, DELIVER_STARVED = 1, DELIVER_DROPPED = 2 };

/* A cursor over an iovec array. */
struct cursor {
    struct vqd_iov *iov;
    int n, i;
    uint64_t off;
};

static inline void cursor_skip(struct cursor *c, uint64_t skip)
{
    while (skip && c->i < c->n) {
        uint64_t room = c->iov[c->i].len - c->off;
        if (skip < room) {
            c->off += skip;
            return;
        }
        skip -= room;
        c->i++;
        c->off = 0;
    }
    /* also step over empty iovecs so that cursor points at a byte */
    while (c->i < c->n && c->off == c->iov[c->i].len) {
        c->i++;
        c->off = 0;
    }
}

/* Copy up to len bytes between buf and the cursor's iovecs: into the
 * iovecs when to_iov, out of them otherwise; returns bytes copied. Callers
 * pass a constant to_iov, so each inlined copy has no branch on it. */
static inline uint64_t cursor_copy(struct cursor *c, uint8_t *buf, uint64_t len, int to_iov)
{
    uint64_t done = 0;
    while (done < len && c->i < c->n) {
        uint64_t room = c->iov[c->i].len - c->off;
        uint64_t k = len - done < room ? len - done : room;
        if (to_iov)
            memcpy(c->iov[c->i].base + c->off, buf + done, k);
        else
            memcpy(buf + done, c->iov[c->i].base + c->off, k);
        done += k;
        c->off += k;
        if (c->off == c->iov[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return done;
}

static inline uint64_t cursor_read(struct cursor *c, uint8_t *dst, uint64_t len)
{
    return cursor_copy(c, dst, len, 0);
}

static inline uint64_t cursor_write(struct cursor *c, const uint8_t *src, uint64_t len)
{
    return cursor_copy(c, (uint8_t *)src, len, 1);
}

static inline int cursor_done(const struct cursor *c)
{
    return c->i >= c->n;
}

/* Write the virtio_net_hdr (§5.1.6.1) for a received frame: no checksum or
 * GSO offload was offered, so everything is zero but num_buffers, which the
 * caller patches through *nb_lo / *nb_hi once it knows the count. */
static inline int write_rx_hdr(struct cursor *c, int hdr_len, uint8_t **nb_lo, uint8_t **nb_hi)
{
    *nb_lo = *nb_hi = NULL;
    if (LIKELY(c->i < c->n && c->iov[c->i].len - c->off >= (uint64_t)hdr_len)) {
        uint8_t *p = c->iov[c->i].base + c->off;
        memset(p, 0, hdr_len);
        if (hdr_len >= 12) {
            *nb_lo = p + 10;
            *nb_hi = p + 11;
        }
        c->off += hdr_len;
        if (c->off == c->iov[c->i].len) {
            c->i++;
            c->off = 0;
        }
        return 1;
    }
    /* The header straddles iovecs: byte by byte. */
    for (int b = 0; b < hdr_len; b++) {
        while (c->i < c->n && c->off == c->iov[c->i].len) {
            c->i++;
            c->off = 0;
        }
        if (c->i >= c->n)
            return 0;
        uint8_t *p = c->iov[c->i].base + c->off;
        *p = 0;
        if (b == 10)
            *nb_lo = p;
        if (b == 11)
            *nb_hi = p;
        c->off++;
    }
    if (c->i < c->n && c->off == c->iov[c->i].len) {
        c->i++;
        c->off = 0;
    }
    return 1;
}

/* What one step (one frame) of a single-queue burst did, or a negative
 * VQD_E_* status that ends the burst. */
enum {
    STEP_STOP = 0, /* nothing: end the burst (no buffer, no frame, the tap would block) */
    STEP_DONE = 1, /* a frame done without a used element (dropped, its chains given back) */
    STEP_USED = 2, /* a frame done, used element(s) written: publish and call at the end */
};

typedef int (*burst_step_fn)(struct vqd_vq *vq, int tap_fd, int hdr_len, int mrg_rxbuf,
                             struct vqd_net_scratch *s);


/* A cursor at the frame of a transmit chain popped by pop_tx: §5.1.6.2,
 * each transmit chain is a virtio_net_hdr then the frame, all
 * device-readable. */
static inline struct cursor tx_frame(struct vqd_net_scratch *s, const struct vqd_elem *te, int hdr_len)
{
    struct cursor src = {s->tx_iov + te->iov_idx, (int)te->out_num, 0, 0};
    cursor_skip(&src, hdr_len);
    return src;
}

/* One frame from the tap into s->buf: its length (> 0), STEP_STOP when
 * there is none (EAGAIN, or end of file), VQD_E_IO (errno in s->err). */
static ssize_t tap_read(int tap_fd, struct vqd_net_scratch *s)
{
    ssize_t r;
    do
        r = read(tap_fd, s->buf, sizeof(s->buf));
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return STEP_STOP;
        s->err = errno;
        return VQD_E_IO;
    }
    return r == 0 ? STEP_STOP : r;
}

/* A stalled receive vq (VQD_FAULT_STALL): frames still come from the tap
 * and are dropped (counted in rx->drops), the pending one first. */
static int tap_rx_discard(struct vqd_vq *rx, int tap_fd, struct vqd_net_scratch *s)
{
    if (s->pending_len == 0) {
        ssize_t r = tap_read(tap_fd, s);
        if (r <= 0)
            return (int)r;
    }
    s->pending_len = 0;
    rx->drops++;
    return STEP_DONE;
}


/* The split ring's steps for vqd_net_tmpl.h (vqd_vq_impl.h). */
struct split_mark {
    uint16_t used_pending;
};

static inline struct split_mark split_mark(const struct vqd_vq *vq)
{
    struct split_mark m = {vq->used_pending};
    return m;
}

/* Give back the `popped` chains taken since m and forget the used elements
 * written since (not published: used->idx has not moved). */
static inline void split_undo(struct vqd_vq *vq, const struct split_mark *m, int popped)
{
    vq->used_pending = m->used_pending;
    vqd_vq_rewind(vq, popped);
}

/* Give back the `n` chains popped since m, keeping the used elements
 * written since (those of earlier chains). */
static inline void split_giveback(struct vqd_vq *vq, const struct split_mark *m, int n)
{
    (void)m;
    vqd_vq_rewind(vq, n);
}

static inline void split_fill(struct vqd_vq *vq, const struct vqd_elem *e, uint32_t len)
{
    vqd_fill(vq, e->head, len);
}

/* Is a chain available (>0), none (0), or a status (<0)? */
static inline int split_has_avail(struct vqd_vq *vq)
{
    if (vq->shadow_avail_idx != vq->last_avail_idx)
        return 1;
    return vqd_avail_count(vq);
}

/* Prefetch a cache line we are about to write: in exclusive state, so the
 * store does not wait for another CPU (the driver's) to give up its copy.
 * x86 has PREFETCHW only where CPUID says so (AMD's 3DNowPrefetch bit, on
 * Intel since Broadwell); without -mprfchw the compiler turns a write
 * prefetch into a read one, which leaves the line shared. */
static int have_prefetchw;

__attribute__((constructor)) static void detect_prefetchw(void)
{
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (__get_cpuid(0x80000001, &a, &b, &c, &d))
        have_prefetchw = (c >> 8) & 1; /* CPUID.80000001H:ECX.PRFCHW */
#endif
}

static inline void prefetch_w(const void *p)
{
#if defined(__x86_64__) || defined(__i386__)
    if (LIKELY(have_prefetchw)) {
        __asm__ __volatile__("prefetchw %0" : : "m"(*(const char *)p));
        return;
    }
#endif
    __builtin_prefetch(p, 1, 3);
}

/* Prefetch, for writing, the first two cache lines of the receive buffers
 * of the next n chains (and, on the way, their ring entries), so that the
 * frames of a batch are written into lines already on their way instead of
 * one miss after another. A hint only: nothing is consumed or checked here
 * (pop does that); it stops at the first chain that is not a lone direct
 * descriptor, and maps addresses through the region table like pop. */
static inline void prefetch_buf(struct vqd_vq *vq, uint64_t addr)
{
    uint64_t room;
    if (vq->iotlb)
        return;   /* a miss or a refusal is pop's to meet */
    const uint8_t *p = vqd_gpa_map(vq, addr, 64, &room, VQD_ACCESS_WO);
    if (p) {
        prefetch_w(p);
        if (room > 64)
            prefetch_w(p + 64);
    }
}

/* Prefetch, for writing, the used ring's lines of the next n used elements
 * (8 a line): the driver reads them, so they are in its cache. */
static inline void split_prefetch_used(struct vqd_vq *vq, int n)
{
    uint16_t idx = (uint16_t)(vq->used_idx + vq->used_pending);
    for (int k = 0; k < n; k += 8)
        prefetch_w(&vq->used->ring[(uint16_t)(idx + k) & (vq->num - 1)]);
}

static inline void split_prefetch_rx(struct vqd_vq *vq, int n)
{
    split_prefetch_used(vq, n);
    uint16_t idx = vq->last_avail_idx, avail = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    for (int k = 0; k < n && idx != avail; k++, idx++) {
        uint16_t head = vq->avail->ring[idx & (vq->num - 1)];
        if (head >= vq->num || (vq->desc[head].flags & (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT)))
            break;
        prefetch_buf(vq, vq->desc[head].addr);
    }
}

/* A split ring's transmit chains are found through avail->ring (pop
 * follows it); what can be prefetched is where they will be used. */
static inline void split_prefetch_tx(struct vqd_vq *vq, int n)
{
    split_prefetch_used(vq, n);
}

#define split_pop_one vqd_pop
#define split_flush vqd_flush
#define split_notify vqd_notify

/* The packed ring's steps for vqd_net_tmpl.h (vqd_pvq_impl.h). */
static inline struct vqd_pmark packed_mark(const struct vqd_vq *vq)
{
    return vqd_pmark(vq);
}

static inline void packed_undo(struct vqd_vq *vq, const struct vqd_pmark *m, int popped)
{
    vqd_prestore(vq, m);
}

/* Give back the chains popped since m (the read position goes back),
 * keeping the used descriptors pending since (those of earlier chains). */
static inline void packed_giveback(struct vqd_vq *vq, const struct vqd_pmark *m, int n)
{
    (void)n;
    vq->last_avail_idx = m->last_avail_idx;
    vq->avail_wrap_counter = m->avail_wrap_counter;
}

static inline void packed_fill(struct vqd_vq *vq, const struct vqd_elem *e, uint32_t len)
{
    vqd_pfill(vq, (uint16_t)e->head, len, (uint16_t)e->ndescs);
}

static inline int packed_has_avail(struct vqd_vq *vq)
{
    return vqd_pavail(vq);
}

/* Prefetch the descriptor ring's lines of the next n slots (4 descriptors
 * a line): pop reads them in a loop too long for the CPU to run ahead from
 * one line's miss to the next. A hint only; called once a chain was found
 * (an idle poll that prefetched the lines the driver is writing would take
 * them from under it). */
static inline void packed_prefetch_tx(struct vqd_vq *vq, int n)
{
    const struct vqd_pdesc *ring = vq->pdesc;
    uint32_t num = vq->num, slot = vq->last_avail_idx;
    for (int k = 0; k < n; k += 4) {
        __builtin_prefetch(&ring[slot], 0, 3);
        slot += 4;
        while (slot >= num)
            slot -= num;
    }
}

static inline void packed_prefetch_rx(struct vqd_vq *vq, int n)
{
    const struct vqd_pdesc *ring = vq->pdesc;
    uint32_t num = vq->num, slot = vq->last_avail_idx;
    int wrap = vq->avail_wrap_counter;
    for (int k = 0; k < n; k++) {
        uint16_t f = __atomic_load_n(&ring[slot].flags, __ATOMIC_ACQUIRE);
        if (!vqd_pdesc_avail(f, wrap) || (f & (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT)))
            break;
        prefetch_w(&ring[slot]); /* its used descriptor is written here */
        prefetch_buf(vq, ring[slot].addr);
        if (++slot == num) {
            slot = 0;
            wrap ^= 1;
        }
    }
}

#define packed_pop_one vqd_ppop
#define packed_flush vqd_pflush
#define packed_notify vqd_pnotify

#define FN(x) x##_split
#define OP(x) split_##x
#define VQ_MARK struct split_mark
#include "vqd_net_tmpl.h"
#undef FN
#undef OP
#undef VQ_MARK

#define FN(x) x##_packed
#define OP(x) packed_##x
#define VQ_MARK struct vqd_pmark
#include "vqd_net_tmpl.h"
#undef FN
#undef OP
#undef VQ_MARK

/* The exported net paths: the layout's copy, chosen once per burst, and
 * one sigsetjmp per burst. A fault marks every queue of the call broken
 * (they share the memory that shrank). Both queues of a loopback have the
 * layout the driver negotiated (VIRTIO_F_RING_PACKED is per device). */
static int net_loopback(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                        int budget, int spin, struct vqd_net_scratch *s)
{
    if (!tx->pdesc != !rx->pdesc)
        return VQD_E_INVAL;
    if (tx->pdesc)
        return net_loopback_packed(tx, rx, hdr_len, mrg_rxbuf, budget, spin, s);
    return net_loopback_split(tx, rx, hdr_len, mrg_rxbuf, budget, spin, s);
}

int vqd_net_loopback(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                     int budget, int spin, struct vqd_net_scratch *s)
{
    int rc;
    VQD_VQ_GUARDED(tx, rc, net_loopback(tx, rx, hdr_len, mrg_rxbuf, budget, spin, s),
                (vqd_fault_broken(tx), rc = vqd_fault_broken(rx)));
    return rc;
}

int vqd_net_tap_tx(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget, struct vqd_net_scratch *s)
{
    int rc;
    VQD_VQ_GUARDED(tx, rc, (tx->pdesc ? net_tap_tx_packed : net_tap_tx_split)(tx, tap_fd, hdr_len, budget, s),
                rc = vqd_fault_broken(tx));
    return rc;
}

int vqd_net_tap_rx(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                   struct vqd_net_scratch *s)
{
    int rc;
    VQD_VQ_GUARDED(rx, rc, (rx->pdesc ? net_tap_rx_packed : net_tap_rx_split)(rx, tap_fd, hdr_len, mrg_rxbuf,
                                                                     budget, s),
                rc = vqd_fault_broken(rx));
    return rc;
}
