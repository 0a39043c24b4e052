/* The layout-dependent half of virtio-net's fast paths (vqd_net.c),
 * compiled once per ring layout: vqd_net.c includes it twice, with
 *   FN(x)     the name of this copy's function x (x_split, x_packed),
 *   OP(x)     the layout's step x: pop_one, fill, flush, notify, mark,
 *             undo, giveback, has_avail (vqd_net.c defines them over vqd_vq_impl.h
 *             and vqd_pvq_impl.h),
 *   VQ_MARK   the type OP(mark) returns (a position to give chains back to).
 * So a burst pays no per-frame branch on the layout: the exported paths
 * pick a copy once per call. No include guard: included twice on purpose;
 * without FN (the build includes every header once) it is empty.
 */
#ifdef FN

/* Pop one receive chain into s->rx_iov and point the cursor at its
 * device-writable part. 1 ok, 0 none available, <0 broken. */
static inline int FN(pop_rx)(struct vqd_vq *rx, struct vqd_net_scratch *s, struct vqd_elem *e,
                         struct cursor *c, int hdr_len)
{
    VQ_MARK m = OP(mark)(rx);
    int rc = OP(pop_one)(rx, e, s->rx_iov, VQD_NET_IOV);
    if (rc == VQD_E_NOSPACE)
        return vqd_broken(rx, "receive chain needs more than %d iovecs", VQD_NET_IOV);
    if (rc <= 0)
        return rc;
    /* §5.1.6.3.1: receive buffers are device-writable and hold at least the header. */
    if (UNLIKELY(e->in_len < (uint64_t)hdr_len || e->in_len == 0)) {
        OP(undo)(rx, &m, 1); /* leave the ring as the driver made it, for inspection */
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
static inline int FN(next_rx_chain)(struct vqd_vq *rx, struct vqd_net_scratch *s, struct vqd_elem *e,
                                struct cursor *c, uint64_t written, uint16_t *nbufs, uint16_t *popped)
{
    OP(fill)(rx, e, (uint32_t)written);
    (*nbufs)++;
    int rc = FN(pop_rx)(rx, s, e, c, 0);
    if (rc > 0)
        (*popped)++;
    return rc;
}

/* Deliver one frame (len bytes from src) to rx (§5.1.6.4). Without
 * MRG_RXBUF the frame must fit one chain (else it is dropped, the chain given
 * back); with it, it spans chains and num_buffers says how many.
 * When rx runs dry mid-frame, every chain taken for it is given back. */
static int FN(deliver)(struct vqd_vq *rx, struct cursor *src, uint64_t len, int swap_mac,
                   int hdr_len, int mrg_rxbuf, struct vqd_net_scratch *s)
{
    struct vqd_elem e;
    struct cursor c = {0};
    uint8_t *nb_lo, *nb_hi, eth[12];
    uint64_t left = len, written;
    uint16_t nbufs = 0, popped = 0;
    int rc;
    VQ_MARK mark = OP(mark)(rx);

    rc = FN(pop_rx)(rx, s, &e, &c, hdr_len);
    if (rc <= 0)
        return rc < 0 ? rc : DELIVER_STARVED;
    popped = 1;
    write_rx_hdr(&c, hdr_len, &nb_lo, &nb_hi);
    written = hdr_len;
    if (swap_mac && len >= 12 && LIKELY(src->i < src->n && c.i < c.n
                                        && src->iov[src->i].len - src->off >= 12
                                        && c.iov[c.i].len - c.off >= 12)) {
        /* Loopback, the common case: both MACs contiguous on both sides.
         * Straight from the transmit buffer into the receive buffer through
         * registers: a stack copy read back at another width defeats store
         * forwarding and waits for every older store (the previous frame's
         * receive buffer writes) to reach the cache. All loads before the
         * stores: a driver's aliased buffers give garbage, never overruns. */
        const uint8_t *sp = src->iov[src->i].base + src->off;
        uint8_t *dp = c.iov[c.i].base + c.off;
        uint32_t dst_hi, src_hi;
        uint16_t dst_lo, src_lo;
        memcpy(&dst_hi, sp, 4);
        memcpy(&dst_lo, sp + 4, 2);
        memcpy(&src_hi, sp + 6, 4);
        memcpy(&src_lo, sp + 10, 2);
        memcpy(dp, &src_hi, 4);
        memcpy(dp + 4, &src_lo, 2);
        memcpy(dp + 6, &dst_hi, 4);
        memcpy(dp + 10, &dst_lo, 2);
        cursor_skip(src, 12);
        cursor_skip(&c, 12);
        written += 12;
        left -= 12;
    } else if (swap_mac && len >= 12) {
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
                rc = FN(next_rx_chain)(rx, s, &e, &c, written, &nbufs, &popped);
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
            rc = FN(next_rx_chain)(rx, s, &e, &c, written, &nbufs, &popped);
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
    OP(fill)(rx, &e, (uint32_t)written);
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
    OP(undo)(rx, &mark, popped);
    if (rc < 0)
        return rc;
    return DELIVER_STARVED;

too_big:
    OP(undo)(rx, &mark, popped);
    rx->drops++;
    return DELIVER_DROPPED;
}

/* Publish a queue's pending used elements and notify; *now as for vqd_ev_record. */
static inline void FN(flush_notify)(struct vqd_vq *vq, int *dirty, uint64_t *now)
{
    if (*dirty) {
        OP(flush)(vq);
        OP(notify)(vq, now);
        *dirty = 0;
    }
}

/* Pop one transmit chain into s->tx_iov: 1 popped, 0 none available, <0
 * status (a chain of more than VQD_NET_IOV iovecs breaks the queue). */
static inline int FN(pop_tx)(struct vqd_vq *tx, struct vqd_elem *te, struct vqd_net_scratch *s)
{
    int rc = OP(pop_one)(tx, te, s->tx_iov, VQD_NET_IOV);
    if (UNLIKELY(rc == VQD_E_NOSPACE))
        rc = vqd_broken(tx, "transmit chain needs more than %d iovecs", VQD_NET_IOV);
    te->iov_idx = 0;
    return rc;
}

/* Pop up to `want` transmit chains into te[] (their iovecs one after the
 * other in s->tx_iov, te[k].iov_idx where each starts; tm[k] the position
 * before chain k, to give chains back) and prefetch each frame's first
 * bytes, so the copies that follow overlap their cache misses instead of
 * taking them one after the other. Returns the chains popped; *status
 * gets a pop's failure (the chains before it are popped and valid). A chain
 * that does not fit the iovecs left waits for the next batch; one that does
 * not fit an empty scratch breaks the queue, as pop_tx. */
static inline int FN(pop_tx_batch)(struct vqd_vq *tx, struct vqd_elem *te, VQ_MARK *tm, int want,
                                   int hdr_len, struct vqd_net_scratch *s, int *status)
{
    int n = 0, used_iov = 0;
    while (n < want) {
        tm[n] = OP(mark)(tx);
        int rc = OP(pop_one)(tx, &te[n], s->tx_iov + used_iov, VQD_NET_IOV - used_iov);
        if (rc == VQD_E_NOSPACE && n)
            break;
        if (UNLIKELY(rc == VQD_E_NOSPACE))
            rc = vqd_broken(tx, "transmit chain needs more than %d iovecs", VQD_NET_IOV);
        if (rc < 0)
            *status = rc;
        if (rc <= 0)
            break;
        te[n].iov_idx = (uint32_t)used_iov;
        if (LIKELY(te[n].out_num)) {
            const struct vqd_iov *v = &s->tx_iov[used_iov];
            /* the frame starts after the header: in the same iovec or the next */
            if (v->len > (uint64_t)hdr_len)
                __builtin_prefetch(v->base + hdr_len, 0, 3);
            else if (te[n].out_num > 1)
                __builtin_prefetch(v[1].base, 0, 3);
        }
        used_iov += (int)(te[n].out_num + te[n].in_num);
        if (n++ == 0)
            OP(prefetch_tx)(tx, want - 1);
    }
    return n;
}

/* Loopback: batches of transmit chains (pop_tx_batch), each frame
 * delivered to rx, both queues flushed per batch. When tx runs dry the
 * frames done so far are published and the driver called (if it wants)
 * before up to `spin` empty polls for its next burst: staying here while
 * the driver answers saves a return to Python per burst; `budget` frames
 * and `spin` idle polls bound the call, so faults, stop and snapshots are
 * served between calls as before. */
static int FN(net_loopback)(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                        int budget, int spin, struct vqd_net_scratch *s)
{
    int done = 0, idle = 0, tx_dirty = 0, rx_dirty = 0, status = VQD_OK;
    s->rx_starved = 0;
    if (tx->broken)
        return VQD_E_BROKEN;
    if (hdr_len != 10 && hdr_len != 12)
        return VQD_E_INVAL;
    /* A broken RX breaks only itself: TX goes on, its frames lost on the
     * receive side (counted in rx->drops, as with no buffer). */
    int rx_dead = rx->broken;
    while (done < budget && status == VQD_OK) {
        struct vqd_elem te[VQD_BURST];
        VQ_MARK tm[VQD_BURST];
        int want = budget - done < VQD_BURST ? budget - done : VQD_BURST;
        int n = FN(pop_tx_batch)(tx, te, tm, want, hdr_len, s, &status);
        if (n == 0) {
            if (status != VQD_OK || idle++ >= spin)
                break;
            if (done) {
                /* the driver gets this burst's frames before we wait for its next one */
                uint64_t now = 0;
                FN(flush_notify)(rx, &rx_dirty, &now);
                FN(flush_notify)(tx, &tx_dirty, &now);
            }
            cpu_relax();
            continue;
        }
        idle = 0;
        /* this batch's receive buffers and the next one's: those have a
         * whole round trip of the driver's to arrive */
        OP(prefetch_rx)(rx, n + VQD_BURST);
        for (int k = 0; k < n; k++) {
            uint64_t out_len = te[k].out_len;
            uint64_t frame_len = out_len > (uint64_t)hdr_len ? out_len - hdr_len : 0;
            if (UNLIKELY(out_len <= (uint64_t)hdr_len)) {
                tx->drops++;
            } else if (UNLIKELY(rx_dead)) {
                rx->drops++;
                tx->packets++;
                tx->bytes += frame_len;
            } else {
                struct cursor src = tx_frame(s, &te[k], hdr_len);
                int rc = FN(deliver)(rx, &src, frame_len, 1, hdr_len, mrg_rxbuf, s);
                if (UNLIKELY(rc < 0)) {
                    /* RX broke (its reason latched): this frame is lost there, TX goes on */
                    rx_dead = 1;
                    rx->drops++;
                }
                if (rc == DELIVER_STARVED && UNLIKELY(rx->iotlb != NULL) && vqd_vq_iotlb_waiting(rx)) {
                    /* RX's next buffer waits for an IOTLB UPDATE (a miss, not a
                     * missing buffer): chains k.. go back untouched and TX waits
                     * with it (the worker sends the miss; the UPDATE wakes it). */
                    OP(giveback)(tx, &tm[k], n - k);
                    status = 1;
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
            OP(fill)(tx, &te[k], 0); /* §2.7.8 / §2.8.4: the device wrote nothing into a TX buffer */
            tx_dirty = 1;
            done++;
        }
        /* Hand buffers back a batch at a time so the driver can refill while we copy. */
        OP(flush)(rx);
        OP(flush)(tx);
    }
    /* RX first: the frames are there before TX completions tell the driver.
     * Both events of this burst carry one clock reading. */
    uint64_t now = 0;
    FN(flush_notify)(rx, &rx_dirty, &now);
    FN(flush_notify)(tx, &tx_dirty, &now);
    if (status < 0)
        return status;
    return done;
}

/* A burst on one queue and the tap (tap TX, tap RX): clear the scratch's
 * out flag *stopped, then run step until it stops, fails or `budget`
 * frames are done. used->idx is published every VQD_BURST frames, so that
 * the driver can reuse buffers before the burst ends, and at the end, with
 * a call if anything was used. Returns the burst's status if it failed,
 * else the frames done. step is a constant at both call sites: inlined. */
static inline __attribute__((always_inline)) int
FN(single_burst)(struct vqd_vq *vq, int *stopped, burst_step_fn step, int tap_fd, int hdr_len,
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
            OP(flush)(vq);
    }
    uint64_t now = 0;
    FN(flush_notify)(vq, &dirty, &now);
    return status < 0 ? status : done;
}

/* One frame from tx to the tap, without its virtio_net_hdr (the tap has no
 * IFF_VNET_HDR). A frame the tap refuses (other than EAGAIN) is dropped and
 * its chain used all the same. */
static inline int FN(tap_tx_step)(struct vqd_vq *tx, int tap_fd, int hdr_len, int mrg_rxbuf,
                              struct vqd_net_scratch *s)
{
    struct vqd_elem te;
    VQ_MARK tm = OP(mark)(tx);
    int rc = FN(pop_tx)(tx, &te, s);
    if (rc <= 0)
        return rc; /* 0: STEP_STOP */
    if (te.out_len <= (uint64_t)hdr_len) {
        tx->drops++;
    } else {
        struct cursor src = tx_frame(s, &te, hdr_len);
        struct vqd_iov *first = &src.iov[src.i];
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
            OP(undo)(tx, &tm, 1);
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
    OP(fill)(tx, &te, 0);
    return STEP_USED;
}

/* One frame from the tap into rx (a frame read but not delivered, because
 * rx ran dry, waits in s->buf for the next burst). */
static inline int FN(tap_rx_step)(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf,
                              struct vqd_net_scratch *s)
{
    if (UNLIKELY(rx->fault & VQD_FAULT_STALL))
        return tap_rx_discard(rx, tap_fd, s);
    if (s->pending_len == 0) {
        /* Read from the tap only when RX has a buffer: otherwise the frame
         * stays queued in the kernel (which drops on its own limits). */
        int n = OP(has_avail)(rx);
        if (n < 0)
            return n;
        if (n == 0) {
            s->rx_starved = 1;
            return STEP_STOP;
        }
        ssize_t r = tap_read(tap_fd, s);
        if (r <= 0)
            return (int)r;
        s->pending_len = (uint32_t)r;
    }
    struct vqd_iov one = {s->buf, s->pending_len};
    struct cursor src = {&one, 1, 0, 0};
    int rc = FN(deliver)(rx, &src, s->pending_len, 0, hdr_len, mrg_rxbuf, s);
    if (rc == DELIVER_STARVED) {
        s->rx_starved = 1;
        return STEP_STOP;
    }
    if (rc < 0)
        return rc;
    s->pending_len = 0;
    return rc == DELIVER_OK ? STEP_USED : STEP_DONE;
}

static int FN(net_tap_tx)(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget,
                      struct vqd_net_scratch *s)
{
    return FN(single_burst)(tx, &s->tx_blocked, FN(tap_tx_step), tap_fd, hdr_len, 0, budget, s);
}

static int FN(net_tap_rx)(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                      struct vqd_net_scratch *s)
{
    return FN(single_burst)(rx, &s->rx_starved, FN(tap_rx_step), tap_fd, hdr_len, mrg_rxbuf, budget, s);
}

#endif /* FN */
