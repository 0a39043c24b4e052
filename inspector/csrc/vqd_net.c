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
 * §2.7.8 / §2.7.10 through vqd_vq_impl.h (used elements, calls).
 *
 * Guards: each exported path runs its whole burst under one VQD_GUARDED
 * section (vqd_guard.h); a SIGBUS marks every queue of the call broken
 * (they share the memory that shrank) and returns VQD_E_BROKEN. Chains are
 * popped through vqd_pop_one (bounded walks, region-checked addresses); a
 * burst ends after `budget` frames, and a frame spans at most VQD_NET_IOV
 * iovecs per chain.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vqd_net.h"
#include "vqd_vq_impl.h"

#define VQD_BURST 32 /* used elements published per used->idx store in the net paths */

/* Status of delivering one frame into a receive queue. */
enum { DELIVER_OK = 0, DELIVER_STARVED = 1, DELIVER_DROPPED = 2 };

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

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

/* Pop one receive chain into s->rx_iov and point the cursor at its
 * device-writable part. 1 ok, 0 none available, <0 broken. */
static inline int pop_rx(struct vqd_vq *rx, struct vqd_net_scratch *s, struct vqd_elem *e,
                         struct cursor *c, int hdr_len)
{
    int rc = vqd_pop_one(rx, e, s->rx_iov, VQD_NET_IOV);
    if (rc == VQD_E_NOSPACE)
        return vqd_broken(rx, "receive chain needs more than %d iovecs", VQD_NET_IOV);
    if (rc <= 0)
        return rc;
    /* §5.1.6.3.1: receive buffers are device-writable and hold at least the header. */
    if (UNLIKELY(e->in_len < (uint64_t)hdr_len || e->in_len == 0)) {
        vqd_vq_rewind(rx, 1); /* leave the ring as the driver made it, for inspection */
        return vqd_broken(rx, "receive chain of head %u has %llu device-writable bytes, less than the "
                          "%d-byte virtio_net_hdr (VIRTIO 1.2 §5.1.6.3.1)", e->head,
                          (unsigned long long)e->in_len, hdr_len);
    }
    c->iov = s->rx_iov + e->out_num;
    c->n = e->in_num;
    c->i = 0;
    c->off = 0;
    return 1;
}

/* With MRG_RXBUF (§5.1.6.4.2), a frame continues in the next chain: use
 * the current one (e, `written` bytes; one more of *nbufs) and pop the next
 * into e / c, without a header (one more of *popped). pop_rx's status. */
static inline int next_rx_chain(struct vqd_vq *rx, struct vqd_net_scratch *s, struct vqd_elem *e,
                                struct cursor *c, uint64_t written, uint16_t *nbufs, uint16_t *popped)
{
    vqd_fill(rx, e->head, (uint32_t)written);
    (*nbufs)++;
    int rc = pop_rx(rx, s, e, c, 0);
    if (rc > 0)
        (*popped)++;
    return rc;
}

/* Deliver one frame (len bytes from src) to rx (§5.1.6.4). Without
 * MRG_RXBUF the frame must fit one chain (else it is dropped, the chain given
 * back); with it, it spans chains and num_buffers says how many.
 * When rx runs dry mid-frame, every chain taken for it is given back. */
static int deliver(struct vqd_vq *rx, struct cursor *src, uint64_t len, int swap_mac,
                   int hdr_len, int mrg_rxbuf, struct vqd_net_scratch *s)
{
    struct vqd_elem e;
    struct cursor c = {0};
    uint8_t *nb_lo, *nb_hi, eth[12];
    uint64_t left = len, written;
    uint16_t nbufs = 0, popped = 0;
    int rc;

    rc = pop_rx(rx, s, &e, &c, hdr_len);
    if (rc <= 0)
        return rc < 0 ? rc : DELIVER_STARVED;
    popped = 1;
    write_rx_hdr(&c, hdr_len, &nb_lo, &nb_hi);
    written = hdr_len;
    if (swap_mac && len >= 12) {
        /* Loopback: the reply goes back to the sender, destination <-> source. */
        uint8_t sw[12];
        cursor_read(src, eth, 12);
        memcpy(sw, eth + 6, 6);
        memcpy(sw + 6, eth, 6);
        uint64_t k = cursor_write(&c, sw, 12);
        written += k;
        if (UNLIKELY(k < 12)) {
            /* the header bytes spill into the next chain: rare, take the slow path */
            if (!mrg_rxbuf)
                goto too_big;
            uint64_t rest = 12 - k;
            const uint8_t *p = sw + k;
            while (rest) {
                rc = next_rx_chain(rx, s, &e, &c, written, &nbufs, &popped);
                if (rc <= 0)
                    goto undo;
                written = cursor_write(&c, p, rest);
                p += written;
                rest -= written;
            }
        }
        left -= 12;
    }
    while (left) {
        if (cursor_done(&c)) {
            if (!mrg_rxbuf)
                goto too_big;
            /* §5.1.6.4.2: with MRG_RXBUF, continue in the next chain; only the
             * first one carries the header. */
            rc = next_rx_chain(rx, s, &e, &c, written, &nbufs, &popped);
            if (rc <= 0)
                goto undo;
            written = 0;
            continue;
        }
        struct vqd_iov *d = &c.iov[c.i];
        struct vqd_iov *sv = &src->iov[src->i];
        uint64_t k = d->len - c.off;
        uint64_t sk = sv->len - src->off;
        if (k > sk)
            k = sk;
        if (k > left)
            k = left;
        /* memmove: the driver may alias its RX buffer onto its TX buffer
         * (found by fuzz/fuzz_datapath.c); guest memory is its to alias */
        memmove(d->base + c.off, sv->base + src->off, k);
        c.off += k;
        if (c.off == d->len) {
            c.i++;
            c.off = 0;
        }
        src->off += k;
        if (src->off == sv->len) {
            src->i++;
            src->off = 0;
        }
        written += k;
        left -= k;
    }
    vqd_fill(rx, e.head, (uint32_t)written);
    nbufs++;
    /* §5.1.6.4: num_buffers (le16) = chains used; 1 without MRG_RXBUF. */
    if (nb_lo)
        *nb_lo = (uint8_t)nbufs;
    if (nb_hi)
        *nb_hi = (uint8_t)(nbufs >> 8);
    rx->packets++;
    rx->bytes += len;
    return DELIVER_OK;

undo:
    /* Give back the chains taken for this frame and forget their elements. */
    rx->used_pending -= nbufs;
    vqd_vq_rewind(rx, popped);
    if (rc < 0)
        return rc;
    return DELIVER_STARVED;

too_big:
    rx->used_pending -= nbufs;
    vqd_vq_rewind(rx, popped);
    rx->drops++;
    return DELIVER_DROPPED;
}

/* Publish a queue's pending used elements and notify; *now as for vqd_ev_record. */
static inline void flush_notify(struct vqd_vq *vq, int *dirty, uint64_t *now)
{
    if (*dirty) {
        vqd_flush(vq);
        vqd_notify(vq, now);
        *dirty = 0;
    }
}

/* Pop one transmit chain into s->tx_iov: 1 popped, 0 none available, <0
 * status (a chain of more than VQD_NET_IOV iovecs breaks the queue). */
static inline int pop_tx(struct vqd_vq *tx, struct vqd_elem *te, struct vqd_net_scratch *s)
{
    int rc = vqd_pop_one(tx, te, s->tx_iov, VQD_NET_IOV);
    if (UNLIKELY(rc == VQD_E_NOSPACE))
        rc = vqd_broken(tx, "transmit chain needs more than %d iovecs", VQD_NET_IOV);
    return rc;
}

/* A cursor at the frame of a transmit chain popped by pop_tx: §5.1.6.2,
 * each transmit chain is a virtio_net_hdr then the frame, all
 * device-readable. */
static inline struct cursor tx_frame(struct vqd_net_scratch *s, const struct vqd_elem *te, int hdr_len)
{
    struct cursor src = {s->tx_iov, (int)te->out_num, 0, 0};
    cursor_skip(&src, hdr_len);
    return src;
}

static int net_loopback(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                        int budget, int spin, struct vqd_net_scratch *s)
{
    int done = 0, idle = 0, tx_dirty = 0, rx_dirty = 0, status = VQD_OK;
    s->rx_starved = 0;
    if (tx->broken || rx->broken)
        return VQD_E_BROKEN;
    if (hdr_len != 10 && hdr_len != 12)
        return VQD_E_INVAL;
    while (done < budget) {
        struct vqd_elem te;
        int rc = pop_tx(tx, &te, s);
        if (UNLIKELY(rc < 0)) {
            status = rc;
            break;
        }
        if (rc == 0) {
            if (done == 0 && idle++ < spin) {
                cpu_relax();
                continue;
            }
            break;
        }
        uint64_t frame_len = te.out_len >= (uint64_t)hdr_len ? te.out_len - hdr_len : 0;
        if (UNLIKELY(te.out_len <= (uint64_t)hdr_len)) {
            tx->drops++;
        } else {
            struct cursor src = tx_frame(s, &te, hdr_len);
            rc = deliver(rx, &src, frame_len, 1, hdr_len, mrg_rxbuf, s);
            if (UNLIKELY(rc < 0)) {
                vqd_vq_rewind(tx, 1);
                status = rc;
                break;
            }
            if (rc == DELIVER_STARVED) {
                /* No receive buffer (or too few for the frame, or RX stalled):
                 * the frame is lost on the receive side, as a NIC (and tun
                 * under vhost-net) drops it; the TX buffer goes back. */
                rx->drops++;
                s->rx_starved = 1;
            }
            if (rc == DELIVER_OK)
                rx_dirty = 1;
            /* transmitted, whatever became of it on the receive side */
            tx->packets++;
            tx->bytes += frame_len;
        }
        vqd_fill(tx, te.head, 0); /* §2.7.8: the device wrote nothing into a TX buffer */
        tx_dirty = 1;
        done++;
        if ((done & (VQD_BURST - 1)) == 0) {
            /* Hand buffers back in bursts so the driver can refill while we copy. */
            vqd_flush(rx);
            vqd_flush(tx);
        }
    }
    /* RX first: the frames are there before TX completions tell the driver.
     * Both events of this burst carry one clock reading. */
    uint64_t now = 0;
    flush_notify(rx, &rx_dirty, &now);
    flush_notify(tx, &tx_dirty, &now);
    if (status < 0)
        return status;
    return done;
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

/* A burst on one queue and the tap (tap TX, tap RX): clear the scratch's
 * out flag *stopped, then run step until it stops, fails or `budget`
 * frames are done. used->idx is published every VQD_BURST frames, so that
 * the driver can reuse buffers before the burst ends, and at the end, with
 * a call if anything was used. Returns the burst's status if it failed,
 * else the frames done. step is a constant at both call sites: inlined. */
static inline __attribute__((always_inline)) int
single_burst(struct vqd_vq *vq, int *stopped, burst_step_fn step, int tap_fd, int hdr_len,
             int mrg_rxbuf, int budget, struct vqd_net_scratch *s)
{
    int done = 0, dirty = 0, status = VQD_OK;
    *stopped = 0;
    if (vq->broken)
        return VQD_E_BROKEN;
    while (done < budget) {
        int rc = step(vq, tap_fd, hdr_len, mrg_rxbuf, s);
        if (rc < 0) {
            status = rc;
            break;
        }
        if (rc == STEP_STOP)
            break;
        if (rc == STEP_USED)
            dirty = 1;
        if ((++done & (VQD_BURST - 1)) == 0)
            vqd_flush(vq);
    }
    uint64_t now = 0;
    flush_notify(vq, &dirty, &now);
    return status < 0 ? status : done;
}

/* One frame from tx to the tap, without its virtio_net_hdr (the tap has no
 * IFF_VNET_HDR). A frame the tap refuses (other than EAGAIN) is dropped and
 * its chain used all the same. */
static inline int tap_tx_step(struct vqd_vq *tx, int tap_fd, int hdr_len, int mrg_rxbuf,
                              struct vqd_net_scratch *s)
{
    struct vqd_elem te;
    int rc = pop_tx(tx, &te, s);
    if (rc <= 0)
        return rc; /* 0: STEP_STOP */
    if (te.out_len <= (uint64_t)hdr_len) {
        tx->drops++;
    } else {
        struct cursor src = tx_frame(s, &te, hdr_len);
        struct vqd_iov *first = &s->tx_iov[src.i];
        uint8_t *saved_base = first->base;
        uint64_t saved_len = first->len;
        first->base += src.off;
        first->len -= src.off;
        ssize_t w;
        do
            w = writev(tap_fd, (const struct iovec *)first, (int)te.out_num - src.i);
        while (w < 0 && errno == EINTR);
        first->base = saved_base;
        first->len = saved_len;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            vqd_vq_rewind(tx, 1);
            s->tx_blocked = 1;
            return STEP_STOP;
        }
        if (w < 0) {
            /* e.g. EIO while the interface is down: the frame is lost. */
            tx->drops++;
            s->err = errno;
        } else {
            tx->packets++;
            tx->bytes += te.out_len - hdr_len;
        }
    }
    vqd_fill(tx, te.head, 0);
    return STEP_USED;
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

/* One frame from the tap into rx (a frame read but not delivered, because
 * rx ran dry, waits in s->buf for the next burst). */
static inline int tap_rx_step(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf,
                              struct vqd_net_scratch *s)
{
    if (UNLIKELY(rx->fault & VQD_FAULT_STALL))
        return tap_rx_discard(rx, tap_fd, s);
    if (s->pending_len == 0) {
        /* Read from the tap only when RX has a buffer: otherwise the frame
         * stays queued in the kernel (which drops on its own limits). */
        if (rx->shadow_avail_idx == rx->last_avail_idx) {
            int n = vqd_avail_count(rx);
            if (n < 0)
                return n;
            if (n == 0) {
                s->rx_starved = 1;
                return STEP_STOP;
            }
        }
        ssize_t r = tap_read(tap_fd, s);
        if (r <= 0)
            return (int)r;
        s->pending_len = (uint32_t)r;
    }
    struct vqd_iov one = {s->buf, s->pending_len};
    struct cursor src = {&one, 1, 0, 0};
    int rc = deliver(rx, &src, s->pending_len, 0, hdr_len, mrg_rxbuf, s);
    if (rc == DELIVER_STARVED) {
        s->rx_starved = 1;
        return STEP_STOP;
    }
    if (rc < 0)
        return rc;
    s->pending_len = 0;
    return rc == DELIVER_OK ? STEP_USED : STEP_DONE;
}

static int net_tap_tx(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget,
                      struct vqd_net_scratch *s)
{
    return single_burst(tx, &s->tx_blocked, tap_tx_step, tap_fd, hdr_len, 0, budget, s);
}

static int net_tap_rx(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                      struct vqd_net_scratch *s)
{
    return single_burst(rx, &s->rx_starved, tap_rx_step, tap_fd, hdr_len, mrg_rxbuf, budget, s);
}

/* The exported net paths: one sigsetjmp per burst. A fault marks every
 * queue of the call broken (they share the memory that shrank). */
int vqd_net_loopback(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                     int budget, int spin, struct vqd_net_scratch *s)
{
    int rc;
    VQD_GUARDED(rc, net_loopback(tx, rx, hdr_len, mrg_rxbuf, budget, spin, s),
                (vqd_fault_broken(tx), rc = vqd_fault_broken(rx)));
    return rc;
}

int vqd_net_tap_tx(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget, struct vqd_net_scratch *s)
{
    int rc;
    VQD_GUARDED(rc, net_tap_tx(tx, tap_fd, hdr_len, budget, s), rc = vqd_fault_broken(tx));
    return rc;
}

int vqd_net_tap_rx(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                   struct vqd_net_scratch *s)
{
    int rc;
    VQD_GUARDED(rc, net_tap_rx(rx, tap_fd, hdr_len, mrg_rxbuf, budget, s), rc = vqd_fault_broken(rx));
    return rc;
}
