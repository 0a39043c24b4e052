/* libFuzzer harness of the back-end's data path (inspector/csrc/vqd_vq.c,
 * vqd_net.c, vqd_evlog.c and vqd_inflight.c; vqd_guard.c is linked but no
 * fault happens) over random ring memory: two vqs (a TX/RX pair), split
 * (§2.7) or packed (§2.8, vqd_pvq.c), whose rings, descriptors, buffers and
 * inflight area come from the input, driven by a short script of data-path
 * calls (pop, push, fill, flush, notify, notification on/off, rewind, the
 * net loopback and tap paths).
 *
 * Build (make fuzz does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *         -Iinspector/csrc fuzz/fuzz_datapath.c inspector/csrc/vqd_*.c -o build/fuzz/fuzz_datapath
 *
 * The caller's side of the contract is kept (as inspector/devices/net.py
 * keeps it): ring areas lie inside guest memory and are aligned, only popped
 * heads are pushed, a rewind gives back at most what was popped and not
 * used. Everything the driver writes is random.
 *
 * Input: a header of DP_HDR_LEN bytes (missing bytes read as 0), then guest
 * memory bytes; little-endian fields.
 *
 *   0  u8   size_code   size = 1 << ((size_code & 7) + 8 * ((size_code & 0xf8) == 0x88))
 *   1  u8   flags       bit 0/1: EVENT_IDX on vq 0/1; bit 2: MRG_RXBUF; bit 3:
 *                       12-byte virtio_net_hdr (else 10); bit 4: inflight
 *                       tracking on vq 0 (packed: VIRTIO_F_IN_ORDER on both);
 *                       bit 5: reject_zero_len; bit 6: a 4-entry event log on
 *                       each vq; bit 7: packed rings
 *   3  u8   packed: the size is size - (v % size) when v is odd (any size)
 *   2  u8   nregions    (v % 4) + 1
 *   4  u16  last_avail_idx of vq 0, 6: of vq 1 (packed: bits 0-14 modulo the
 *                  size, bit 15 the wrap counter; next_used the same)
 *   8  regions[4]: u64 gpa, u32 size (& 0xfff0 when the top byte is 0xa5,
 *                  else & 0xff0: a multiple of 16, so the buffer, which ends
 *                  where the region ends, starts 16-aligned), u32 mem_off
 *  72  area[2][3] u32 (desc, avail, used of vq 0 then vq 1; packed: desc,
 *                  driver and device event suppression): region
 *                  v % nregions, offset (v >> 2) % (room + 1), aligned down
 *  96  ops[24]: op = b & 15, arg = b >> 4 (see run_op)
 * 120  u32 inflight area mem_off
 * 128  guest memory bytes (each region filled from mem_off, repeating)
 *
 * Checked beyond the sanitizers: every popped iovec lies inside one
 * region's buffer and the iovecs add up to the element's lengths, heads are
 * below the queue size (split; packed: a chain takes 1..size slots), a
 * broken queue stays broken (every later call
 * returns VQD_E_BROKEN) with a NUL-terminated, non-empty reason, and
 * used_pending never exceeds the queue size.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vqd_vq.h"
#include "vqd_pvq.h"
#include "vqd_evlog.h"
#include "vqd_net.h"
#include "vqd_inflight.h"
#include "fuzz_input.h"

#define DP_HDR_LEN 128
#define DP_OPS 24
#define DP_IOV 64

/* as in fuzz_decoder.c */
const char *__asan_default_options(void)
{
    return "quarantine_size_mb=4:max_malloc_fill_size=0:allocator_release_to_os_interval_ms=-1";
}

struct side {
    struct vqd_vq vq;
    struct vqd_evlog log;
    struct vqd_event ev[4];
    struct vqd_elem elems[8];
    struct vqd_iov iov[DP_IOV];
    uint32_t pending[VQD_MAX_QUEUE_SIZE]; /* popped heads not yet used */
    uint32_t pending_len[VQD_MAX_QUEUE_SIZE];
    uint32_t pending_ndescs[VQD_MAX_QUEUE_SIZE]; /* packed: ring slots of each */
    uint32_t npending;
    struct vqd_pused pused[VQD_MAX_QUEUE_SIZE];
    int last_iov;                         /* iovecs of the last pop, for op 13 */
};

struct ctx {
    struct vqd_region regions[4];
    int nregions;
    int hdr_len, mrg, packed;
    struct side s[2];
    int devnull, pipe_r, pipe_w;
    const uint8_t *mem;
    size_t mem_len;
};

static struct vqd_net_scratch scratch; /* 96 KiB: one, reused */
static struct ctx c;
static struct tailbuf region_buf[4], inflight_buf[4];

static void check_iov(const struct vqd_iov *iov)
{
    for (int i = 0; i < c.nregions; i++) {
        const struct vqd_region *r = &c.regions[i];
        if (iov->base >= r->host && iov->len <= r->size
            && (uint64_t)(iov->base - r->host) <= r->size - iov->len)
            return;
    }
    FUZZ_CHECK(!"iovec outside every region");
}

static void check_broken(const struct vqd_vq *vq)
{
    if (vq->broken) {
        size_t n = strnlen(vq->reason, sizeof vq->reason);
        FUZZ_CHECK(n > 0 && n < sizeof vq->reason);
    }
    FUZZ_CHECK(vq->used_pending <= vq->num);
}

/* A call on a queue broken before it must return VQD_E_BROKEN. */
#define EXPECT_BROKEN(was_broken, rc) FUZZ_CHECK(!(was_broken) || (rc) == VQD_E_BROKEN)

static void do_pop(struct side *sd, int max_elems, int max_iov)
{
    struct vqd_vq *vq = &sd->vq;
    int was = vq->broken;
    int got = (c.packed ? vqd_pvq_pop : vqd_vq_pop)(vq, sd->elems, max_elems, sd->iov, max_iov);
    EXPECT_BROKEN(was, got);
    FUZZ_CHECK(got <= max_elems);
    int used_iov = 0;
    for (int e = 0; e < got; e++) {
        const struct vqd_elem *el = &sd->elems[e];
        if (c.packed)
            FUZZ_CHECK(el->head <= 0xFFFF && el->ndescs >= 1 && el->ndescs <= vq->num);
        else
            FUZZ_CHECK(el->head < vq->num);
        FUZZ_CHECK(el->iov_idx == (uint32_t)used_iov);
        uint64_t out = 0, in = 0;
        for (uint32_t k = 0; k < el->out_num + el->in_num; k++) {
            const struct vqd_iov *v = &sd->iov[el->iov_idx + k];
            check_iov(v);
            if (k < el->out_num)
                out += v->len;
            else
                in += v->len;
        }
        FUZZ_CHECK(out == el->out_len && in == el->in_len);
        used_iov += el->out_num + el->in_num;
        FUZZ_CHECK(used_iov <= max_iov);
        sd->last_iov = used_iov;
        if (sd->npending < vq->num) {
            sd->pending[sd->npending] = el->head;
            sd->pending_len[sd->npending] = (uint32_t)el->in_len;
            sd->pending_ndescs[sd->npending] = el->ndescs;
            sd->npending++;
        }
    }
}

static void run_op(uint8_t b)
{
    int op = b & 15, arg = b >> 4;
    struct side *sd = &c.s[arg & 1];
    struct vqd_vq *vq = &sd->vq;
    int was = vq->broken, rc;

    switch (op) {
    case 0: /* pop up to 1..8 chains into 4 or 64 iovecs */
        do_pop(sd, 1 + ((arg >> 1) & 7), (arg >> 3) ? 4 : DP_IOV);
        break;
    case 1: /* push every popped chain, with the device-writable length */
        if (c.packed) {
            rc = VQD_OK;
            for (uint32_t k = 0; k < sd->npending && rc == VQD_OK; k++)
                rc = vqd_pvq_fill(vq, sd->pending[k], sd->pending_len[k], sd->pending_ndescs[k]);
            if (rc == VQD_OK)
                rc = vqd_pvq_flush(vq);
        } else {
            rc = vqd_vq_push(vq, sd->pending, sd->pending_len, (int)sd->npending);
        }
        EXPECT_BROKEN(was, rc);
        if (rc >= 0)
            sd->npending = 0;
        break;
    case 2: /* fill the oldest popped chain, then flush */
        if (sd->npending) {
            rc = c.packed ? vqd_pvq_fill(vq, sd->pending[0], sd->pending_len[0], sd->pending_ndescs[0])
                          : vqd_vq_fill(vq, sd->pending[0], sd->pending_len[0]);
            EXPECT_BROKEN(was, rc);
            if (rc == VQD_OK) {
                memmove(sd->pending, sd->pending + 1, --sd->npending * sizeof sd->pending[0]);
                memmove(sd->pending_len, sd->pending_len + 1, sd->npending * sizeof sd->pending_len[0]);
                memmove(sd->pending_ndescs, sd->pending_ndescs + 1, sd->npending * sizeof sd->pending_ndescs[0]);
            }
        }
        rc = (c.packed ? vqd_pvq_flush : vqd_vq_flush)(vq);
        EXPECT_BROKEN(was, rc);
        break;
    case 3:
        rc = (c.packed ? vqd_pvq_notify : vqd_vq_notify)(vq);
        EXPECT_BROKEN(was, rc);
        break;
    case 4:
        rc = (c.packed ? vqd_pvq_set_notification : vqd_vq_set_notification)(vq, (arg >> 1) & 1);
        EXPECT_BROKEN(was, rc);
        FUZZ_CHECK(rc < 0 || (uint32_t)rc <= vq->num);
        break;
    case 5:
        rc = (c.packed ? vqd_pvq_avail_count : vqd_vq_avail_count)(vq);
        EXPECT_BROKEN(was, rc);
        FUZZ_CHECK(rc < 0 || (uint32_t)rc <= vq->num);
        break;
    case 6: { /* loopback TX (vq 0) -> RX (vq 1) */
        int was_rx = c.s[1].vq.broken, was_tx = c.s[0].vq.broken;
        rc = vqd_net_loopback(&c.s[0].vq, &c.s[1].vq, c.hdr_len, c.mrg, 1 + arg, 0, &scratch);
        /* a broken TX refuses; a broken RX breaks only itself (TX goes on, frames dropped) */
        FUZZ_CHECK(!was_tx || rc == VQD_E_BROKEN);
        FUZZ_CHECK(!was_rx || c.s[1].vq.broken);
        break;
    }
    case 7:
        rc = vqd_net_tap_tx(vq, c.devnull, c.hdr_len, 1 + (arg >> 1), &scratch);
        EXPECT_BROKEN(was, rc);
        break;
    case 8: { /* a frame of 1..1401 bytes from guest memory on the "tap", then RX */
        size_t len = 1 + (size_t)(arg >> 1) * 200;
        uint8_t frame[1401];
        for (size_t k = 0; k < len; k++)
            frame[k] = c.mem_len ? c.mem[k % c.mem_len] : 0;
        if (write(c.pipe_w, frame, len) < 0)
            break; /* pipe full: keep the frames already queued */
        rc = vqd_net_tap_rx(vq, c.pipe_r, c.hdr_len, c.mrg, 1 + (arg >> 1), &scratch);
        EXPECT_BROKEN(was, rc);
        break;
    }
    case 9: { /* give back up to 1..8 popped chains */
        uint32_t n = 1 + (arg >> 1);
        if (n > sd->npending)
            n = sd->npending;
        if (n && c.packed) {
            uint32_t slots = 0;
            for (uint32_t k = sd->npending - n; k < sd->npending; k++)
                slots += sd->pending_ndescs[k];
            /* the loopback and tap ops pop and use chains this list does not
             * know of: more slots than the ring holds is refused, not obeyed */
            rc = vqd_pvq_rewind(vq, slots);
            FUZZ_CHECK(rc == VQD_OK || (rc == VQD_E_INVAL && slots > vq->num));
            sd->npending -= n;
        } else if (n) {
            vqd_vq_rewind(vq, (int)n);
            sd->npending -= n;
        }
        break;
    }
    case 10: {
        struct vqd_event out[4];
        rc = vqd_vq_drain_events(vq, out, 4);
        FUZZ_CHECK(rc >= 0 && rc <= 4);
        break;
    }
    case 11: /* a head the caller checks against the size (packed: a buffer id over 16 bits) */
        rc = c.packed ? vqd_pvq_fill(vq, 0x10000u + (uint32_t)arg, 1, 1) : vqd_vq_fill(vq, (uint32_t)arg * 37, 1);
        EXPECT_BROKEN(was, rc);
        FUZZ_CHECK(!c.packed || rc < 0);
        break;
    case 12:
        rc = (c.packed ? vqd_pvq_should_notify : vqd_vq_should_notify)(vq);
        FUZZ_CHECK(rc == 0 || rc == 1);
        break;
    case 13: { /* the last pop's iovecs copied out, then back (DeviceQueue.read/write) */
        static uint8_t buf[65536];
        int64_t got = vqd_vq_copy_iov(vq, sd->iov, sd->last_iov, buf, sizeof buf, 0);
        FUZZ_CHECK(got >= 0 && (uint64_t)got <= sizeof buf);
        FUZZ_CHECK(vqd_vq_copy_iov(vq, sd->iov, sd->last_iov, buf, (uint64_t)got, 1) == got);
        break;
    }
    default: /* 14, 15: flush */
        rc = (c.packed ? vqd_pvq_flush : vqd_vq_flush)(vq);
        EXPECT_BROKEN(was, rc);
        break;
    }
    check_broken(&c.s[0].vq);
    check_broken(&c.s[1].vq);
}

/* Host pointer to a ring area of `len` bytes, `align`-aligned, placed by v;
 * NULL when the chosen region cannot hold it. */
static void *place(uint32_t v, uint64_t len, uint64_t align)
{
    const struct vqd_region *r = &c.regions[v % c.nregions];
    if (r->size < len)
        return NULL;
    uint64_t room = r->size - len, off = (v >> 2) % (room + 1);
    /* the host address is aligned (a region's buffer need not be) */
    off -= (uintptr_t)(r->host + off) & (align - 1);
    if (off > room) /* went below the start: take the next aligned one */
        off += align;
    return off <= room ? r->host + off : NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    static int init;
    if (!init) {
        int p[2];
        c.devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (c.devnull < 0 || pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
            abort();
        c.pipe_r = p[0];
        c.pipe_w = p[1];
        init = 1;
    }
    struct hdr h;
    hdr_init(&h, data, n, DP_HDR_LEN);
    c.mem = n > DP_HDR_LEN ? data + DP_HDR_LEN : NULL;
    c.mem_len = n > DP_HDR_LEN ? n - DP_HDR_LEN : 0;

    uint8_t sc = HDR_U8(&h, 0), flags = HDR_U8(&h, 1);
    uint32_t num = 1u << ((sc & 7) + ((sc & 0xf8) == 0x88 ? 8 : 0));
    c.packed = !!(flags & 128);
    if (c.packed && (HDR_U8(&h, 3) & 1))
        num -= HDR_U8(&h, 3) % num; /* §2.8: any size 1..32768 */
    c.nregions = HDR_U8(&h, 2) % 4 + 1;
    c.hdr_len = flags & 8 ? 12 : 10;
    c.mrg = !!(flags & 4);
    for (int i = 0; i < c.nregions; i++) {
        uint32_t sz = HDR_U32(&h, 8 + 16 * i + 8);
        c.regions[i].gpa = HDR_U64(&h, 8 + 16 * i);
        c.regions[i].size = (sz >> 24) == 0xa5 ? sz & 0xfff0 : sz & 0xff0;
        c.regions[i].host = fill_region(&region_buf[i], c.mem, c.mem_len, HDR_U32(&h, 8 + 16 * i + 12),
                                        c.regions[i].size);
    }
    void *areas[2][3];
    int ok = 1;
    for (int q = 0; q < 2; q++) {
        areas[q][0] = place(HDR_U32(&h, 72 + 12 * q), 16 * (uint64_t)num, 16);
        areas[q][1] = place(HDR_U32(&h, 72 + 12 * q + 4), c.packed ? 4 : 6 + 2 * (uint64_t)num,
                            c.packed ? 4 : 2);
        areas[q][2] = place(HDR_U32(&h, 72 + 12 * q + 8), c.packed ? 4 : 6 + 8 * (uint64_t)num, 4);
        ok &= areas[q][0] && areas[q][1] && areas[q][2];
    }
    uint8_t *inflight_area = NULL;
    struct vqd_inflight inf;
    struct vqd_inflight_slot *resubmit = NULL;
    uint16_t *batch = NULL;
    uint32_t *pop_log = NULL;
    if (ok) {
        for (int q = 0; q < 2; q++) {
            struct side *sd = &c.s[q];
            sd->npending = 0;
            sd->last_iov = 0;
            int rc;
            if (c.packed) {
                uint16_t pos = HDR_U16(&h, 4 + 2 * q), slot = (uint16_t)((pos & 0x7fff) % num);
                rc = vqd_pvq_init(&sd->vq, num, areas[q][0], areas[q][1], areas[q][2], sd->pused, c.regions,
                                  c.nregions, slot, pos >> 15, slot, pos >> 15, (flags >> q) & 1, -1, -1);
                sd->vq.in_order = !!(flags & 16);
            } else {
                rc = vqd_vq_init(&sd->vq, num, areas[q][0], areas[q][1], areas[q][2], c.regions,
                                 c.nregions, HDR_U16(&h, 4 + 2 * q), (flags >> q) & 1, -1, -1);
            }
            FUZZ_CHECK(rc == VQD_OK);
            sd->vq.reject_zero_len = !!(flags & 32);
            if (flags & 64) {
                FUZZ_CHECK(vqd_evlog_init(&sd->log, sd->ev, 4) == VQD_OK);
                sd->vq.evlog = &sd->log;
            }
        }
        if ((flags & 16) && !c.packed) {
            uint64_t size = vqd_inflight_queue_size(num);
            inflight_area = fill_region(&inflight_buf[0], c.mem, c.mem_len, HDR_U32(&h, 120), size);
            resubmit = tail(&inflight_buf[1], num * sizeof *resubmit);
            batch = tail(&inflight_buf[2], num * sizeof *batch);
            pop_log = tail(&inflight_buf[3], num * sizeof *pop_log);
            int rc = vqd_inflight_attach(&c.s[0].vq, &inf, inflight_area, size, resubmit, batch, pop_log);
            FUZZ_CHECK(rc == VQD_E_BROKEN || (rc >= 0 && (uint32_t)rc <= num));
            check_broken(&c.s[0].vq);
        }
        for (int k = 0; k < DP_OPS; k++)
            run_op(HDR_U8(&h, 96 + k));
        /* FUZZ_PRINT=1: each vq's end state (tests/unit/test_fuzz_smoke.py
         * checks that the seeds move packets and break where they should) */
        static int print = -1;
        if (print < 0)
            print = getenv("FUZZ_PRINT") != NULL;
        for (int q = 0; print && q < 2; q++)
            fprintf(stderr, "vq%d packets=%llu used_idx=%u broken=%d reason=%s\n", q,
                    (unsigned long long)c.s[q].vq.packets, c.s[q].vq.used_idx, c.s[q].vq.broken,
                    c.s[q].vq.reason);
        /* drain the "tap" for the next input */
        while (read(c.pipe_r, scratch.buf, sizeof scratch.buf) > 0)
            ;
        scratch.pending_len = 0;
    }
    return 0;
}
