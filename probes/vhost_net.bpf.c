/* vhost_net.bpf.c: vhost-net handlers and the state of each
 * struct vhost_virtqueue at every hit (drivers/vhost/vhost.c, net.c).
 *
 * No struct copies: every offset is a prelude #define taken from the
 * running kernel's BTF by probes/vhost_net.py (VQ_*_OFF/_SIZE: members of
 * struct vhost_virtqueue; POLL_*: struct vhost_poll; WORK_FN_OFF: struct
 * vhost_work; DEV_*: struct vhost_dev; NET_*: struct vhost_net). Argument
 * positions are ARG_* (source positions; a clone whose positions cannot be
 * trusted is not attached). HANDLE_TX_KICK_ADDR/HANDLE_RX_KICK_ADDR are the
 * kick handlers' addresses from /proc/kallsyms (which vhost_poll is a
 * virtqueue's kick poll).
 *
 * The device IOTLB (drivers/vhost/iotlb.c): every add/del/reset of a
 * struct vhost_iotlb goes to user space as a struct iotlb_op through
 * `iotlb_ops` (probes/iotlb.py mirrors them); the first handler run of a
 * vring whose vq->iotlb is set walks that IOTLB's map list once (at most
 * IOTLB_WALK_MAX maps) so maps inserted before the probes attached are
 * known too. HAVE_IOTLB_BTF 0: the kernel's BTF lacks struct vhost_iotlb
 * (no walk, no vq->iotlb). IOTLB_* / MAP_* offsets are BTF's.
 *
 * Over 600 lines: one BCC program (BCC compiles one text; the IOTLB part
 * shares snap(), the maps and the pid filter), mostly attach-point stubs.
 */

#define RD(dst, base, F)                                                        \
    do {                                                                        \
        u64 __v = 0;                                                            \
        bpf_probe_read_kernel(&__v, F##_SIZE, (char *)(base) + F##_OFF);        \
        dst = __v;                                                              \
    } while (0)

struct vq_state {
    u64 desc;      /* user addresses in the owner's mm */
    u64 avail;
    u64 used;
    u64 time;      /* bpf_ktime_get_ns() of the last hit */
    u64 acked_features; /* vq->acked_features: EVENT_IDX decides used_event/avail_event */
    u64 iotlb;     /* vq->iotlb: the device IOTLB (0: addresses are not IOVAs) */
    u32 num;
    u32 owner;     /* the owner's pid (vhost worker "vhost-<pid>") */
    u16 last_avail_idx;
    u16 avail_idx;
    u16 last_used_idx;
    u16 used_flags;
    u16 signalled_used;
    u8 signalled_used_valid;
    u8 pad;
    s16 index;     /* position in dev->vqs, -1 unknown */
    s16 notify_enabled; /* -1 unknown, else the last vhost_{enable,disable}_notify */
};

struct run {
    u64 vq;
    u64 ts;
};

struct sig {
    u64 vq;
    u32 signalled;
    u32 pad;
};

BPF_HASH(vq_state, u64, struct vq_state, 1024);
BPF_HASH(runs, u64, struct run, 1024);          /* tid -> handler running */
BPF_HASH(sigs, u64, struct sig, 1024);          /* tid -> in vhost_signal */
BPF_HASH(weights, u64, u64, 1024);              /* tid -> vq in vhost_exceeds_weight */
BPF_HASH(kick_ts, u64, u64, 1024);              /* vq -> first kick not yet handled */
BPF_HASH(used_ts, u64, u64, 1024);              /* vq -> last used update not yet signalled */

static __always_inline u64 parm(struct pt_regs *ctx, int n)
{
    switch (n) {
    case 0: return PT_REGS_PARM1(ctx);
    case 1: return PT_REGS_PARM2(ctx);
    case 2: return PT_REGS_PARM3(ctx);
    case 3: return PT_REGS_PARM4(ctx);
    case 4: return PT_REGS_PARM5(ctx);
    default: return 0;
    }
}

/* The owner of the current vhost worker: "vhost-<pid>" (a kthread on 6.1,
 * a thread of the owner from 6.4), else the current process. */
static __always_inline u32 owner_pid(void)
{
    char comm[16] = {};
    bpf_get_current_comm(&comm, sizeof(comm));
    if (comm[0] != 'v' || comm[1] != 'h' || comm[2] != 'o' || comm[3] != 's' || comm[4] != 't' ||
        comm[5] != '-')
        return bpf_get_current_pid_tgid() >> 32;
    u32 pid = 0;
#pragma unroll
    for (int i = 6; i < 16; i++) {
        char c = comm[i];
        if (c < '0' || c > '9')
            break;
        pid = pid * 10 + (c - '0');
    }
    return pid;
}

/* Read the vq's fields into vq_state; returns the state (or NULL when the
 * owner is filtered out). */
static __always_inline struct vq_state *snap(u64 vq)
{
    if (!vq)
        return NULL;
    u32 owner = owner_pid();
    if (!vqs_pid_ok(owner))
        return NULL;
    struct vq_state zero = {};
    zero.index = -1;
    zero.notify_enabled = -1;
    struct vq_state *s = vq_state.lookup_or_try_init(&vq, &zero);
    if (!s)
        return NULL;
    s->owner = owner;
    s->time = bpf_ktime_get_ns();
    RD(s->num, vq, VQ_NUM);
    RD(s->desc, vq, VQ_DESC);
    RD(s->avail, vq, VQ_AVAIL);
    RD(s->used, vq, VQ_USED);
    RD(s->last_avail_idx, vq, VQ_LAST_AVAIL_IDX);
    RD(s->avail_idx, vq, VQ_AVAIL_IDX);
    RD(s->last_used_idx, vq, VQ_LAST_USED_IDX);
    RD(s->used_flags, vq, VQ_USED_FLAGS);
    RD(s->signalled_used, vq, VQ_SIGNALLED_USED);
    RD(s->signalled_used_valid, vq, VQ_SIGNALLED_USED_VALID);
    RD(s->acked_features, vq, VQ_ACKED_FEATURES);
#if HAVE_IOTLB_BTF
    RD(s->iotlb, vq, VQ_IOTLB);
#endif
    if (s->index < 0) {
        u64 dev = 0, vqs = 0;
        int nvqs = 0;
        RD(dev, vq, VQ_DEV);
        if (dev) {
            RD(vqs, dev, DEV_VQS);
            RD(nvqs, dev, DEV_NVQS);
        }
#pragma unroll
        for (int i = 0; i < MAX_VQS; i++) {
            u64 p = 0;
            if (i >= nvqs || !vqs)
                break;
            bpf_probe_read_kernel(&p, sizeof(p), (char *)vqs + 8 * i);
            if (p == vq) {
                s->index = i;
                break;
            }
        }
    }
    return s;
}

static __always_inline s16 qidx(struct vq_state *s)
{
    return s ? s->index : -1;
}

static __always_inline void emit(void *ctx, u64 vq, struct vq_state *s, u16 kind, u64 value)
{
    vqs_emit_pid(ctx, vq, kind, qidx(s), value, s ? s->owner : 0);
}

/* ---- the device IOTLB ------------------------------------------------------ */

struct iotlb_op {
    u64 ts;
    u64 iotlb;     /* struct vhost_iotlb * */
    u64 start;
    u64 last;
    u64 addr;
    u32 perm;
    u32 op;        /* IOTLB_OP_* */
    u32 limit;     /* iotlb->limit, iotlb->flags (0 without BTF) */
    u32 flags;
};

#if USE_RINGBUF
BPF_RINGBUF_OUTPUT(iotlb_ops, IOTLB_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(iotlb_ops);
#endif
BPF_PERCPU_ARRAY(iotlb_lost, u64, 1);
BPF_HASH(iotlb_walked, u64, u8, 1024);   /* IOTLBs whose map list was walked */

static __always_inline void iotlb_emit(void *ctx, u32 op, u64 iotlb, u64 start, u64 last, u64 addr, u32 perm)
{
    struct iotlb_op r = {};
    r.ts = bpf_ktime_get_ns();
    r.op = op;
    r.iotlb = iotlb;
    r.start = start;
    r.last = last;
    r.addr = addr;
    r.perm = perm;
#if HAVE_IOTLB_BTF
    RD(r.limit, iotlb, IOTLB_LIMIT);
    RD(r.flags, iotlb, IOTLB_FLAGS);
#endif
#if USE_RINGBUF
    if (iotlb_ops.ringbuf_output(&r, sizeof(r), 0) != 0) {
        u32 z = 0;
        u64 *l = iotlb_lost.lookup(&z);
        if (l)
            (*l)++;
    }
#else
    iotlb_ops.perf_submit(ctx, &r, sizeof(r));
#endif
}

/* Once per IOTLB: its maps as they are now (list order: oldest first),
 * at most IOTLB_WALK_MAX of them. */
static __always_inline void iotlb_walk(void *ctx, u64 iotlb)
{
#if HAVE_IOTLB_BTF
    u8 one = 1;
    if (!iotlb || iotlb_walked.lookup(&iotlb))
        return;
    iotlb_walked.update(&iotlb, &one);
    u64 head = iotlb + IOTLB_LIST_OFF, node = 0;
    bpf_probe_read_kernel(&node, sizeof(node), (void *)head);   /* list_head.next */
    for (int i = 0; i < IOTLB_WALK_MAX; i++) {
        if (!node || node == head)
            return;
        u64 map = node - MAP_LINK_OFF, start = 0, last = 0, addr = 0;
        u32 perm = 0;
        RD(start, map, MAP_START);
        RD(last, map, MAP_LAST);
        RD(addr, map, MAP_ADDR);
        RD(perm, map, MAP_PERM);
        iotlb_emit(ctx, IOTLB_OP_SEEN, iotlb, start, last, addr, perm);
        bpf_probe_read_kernel(&node, sizeof(node), (void *)node);
    }
    if (node && node != head)
        iotlb_emit(ctx, IOTLB_OP_WALK_TRUNCATED, iotlb, 0, 0, 0, 0);
#endif
}

#if HAVE_KPROBE_VHOST_IOTLB_ADD_RANGE_CTX
/* vhost_iotlb_add_range_ctx(iotlb, start, last, addr, perm, opaque) */
int kprobe_vhost_iotlb_add_range_ctx(struct pt_regs *ctx)
{
    if (!vqs_pid_ok(bpf_get_current_pid_tgid() >> 32))
        return 0;
    iotlb_emit(ctx, IOTLB_OP_ADD, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx),
               PT_REGS_PARM4(ctx), (u32)PT_REGS_PARM5(ctx));
    return 0;
}
#endif
#if HAVE_KPROBE_VHOST_IOTLB_ADD_RANGE
/* vhost_iotlb_add_range(iotlb, start, last, addr, perm) (kernels without the _ctx variant) */
int kprobe_vhost_iotlb_add_range(struct pt_regs *ctx)
{
    if (!vqs_pid_ok(bpf_get_current_pid_tgid() >> 32))
        return 0;
    iotlb_emit(ctx, IOTLB_OP_ADD, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx),
               PT_REGS_PARM4(ctx), (u32)PT_REGS_PARM5(ctx));
    return 0;
}
#endif
#if HAVE_KPROBE_VHOST_IOTLB_DEL_RANGE
/* vhost_iotlb_del_range(iotlb, start, last) */
int kprobe_vhost_iotlb_del_range(struct pt_regs *ctx)
{
    if (!vqs_pid_ok(bpf_get_current_pid_tgid() >> 32))
        return 0;
    iotlb_emit(ctx, IOTLB_OP_DEL, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), 0, 0);
    return 0;
}
#endif
#if HAVE_KPROBE_VHOST_IOTLB_RESET
/* vhost_iotlb_reset(iotlb): every map goes (vhost_iotlb_free, device cleanup) */
int kprobe_vhost_iotlb_reset(struct pt_regs *ctx)
{
    u64 iotlb = PT_REGS_PARM1(ctx);
    iotlb_walked.delete(&iotlb);
    if (!vqs_pid_ok(bpf_get_current_pid_tgid() >> 32))
        return 0;
    iotlb_emit(ctx, IOTLB_OP_RESET, iotlb, 0, 0, 0, 0);
    return 0;
}
#endif

/* ---- handlers ---------------------------------------------------------- */

static __always_inline void handler_enter(struct pt_regs *ctx, u64 vq, int from_kick, int count_run)
{
    struct vq_state *s = snap(vq);
    if (!s)
        return;
    iotlb_walk(ctx, s->iotlb);
    u64 now = bpf_ktime_get_ns();
    if (from_kick) {
        u64 *k = kick_ts.lookup(&vq);
        if (k) {
            vqs_hist(vq, H_KICK_TO_HANDLER_NS, now - *k);
            kick_ts.delete(&vq);
        }
    }
    if (!count_run)
        return;
    u64 tid = bpf_get_current_pid_tgid();
    struct run r = {.vq = vq, .ts = now};
    runs.update(&tid, &r);
    vqs_count(vq, C_HANDLER_RUNS, 1);
    emit(ctx, vq, s, EV_HANDLER_START, s->last_avail_idx);
}

static __always_inline void handler_return(struct pt_regs *ctx)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct run *r = runs.lookup(&tid);
    if (!r)
        return;
    u64 vq = r->vq, d = bpf_ktime_get_ns() - r->ts;
    runs.delete(&tid);
    vqs_hist(vq, H_HANDLER_RUN_NS, d);
    struct vq_state *s = snap(vq);
    emit(ctx, vq, s, EV_HANDLER_END, d);
}

/* vq of a kick work: vq->poll.work */
#define KICK_WORK_VQ(work) ((u64)(work) - POLL_WORK_OFF - VQ_POLL_OFF)

#if HAVE_KPROBE_HANDLE_TX_KICK
int kprobe_handle_tx_kick(struct pt_regs *ctx)
{
    handler_enter(ctx, KICK_WORK_VQ(PT_REGS_PARM1(ctx)), 1, !INNER_TX);
    return 0;
}
#endif
#if HAVE_KPROBE_HANDLE_RX_KICK
int kprobe_handle_rx_kick(struct pt_regs *ctx)
{
    handler_enter(ctx, KICK_WORK_VQ(PT_REGS_PARM1(ctx)), 1, !INNER_RX);
    return 0;
}
#endif
#if HAVE_KPROBE_HANDLE_TX_NET
int kprobe_handle_tx_net(struct pt_regs *ctx)
{
    /* work is net->poll[VHOST_NET_VQ_TX].work */
    handler_enter(ctx, PT_REGS_PARM1(ctx) - NET_POLL_TX_WORK_OFF + NET_VQ_TX_OFF, 0, !INNER_TX);
    return 0;
}
#endif
#if HAVE_KPROBE_HANDLE_RX_NET
int kprobe_handle_rx_net(struct pt_regs *ctx)
{
    handler_enter(ctx, PT_REGS_PARM1(ctx) - NET_POLL_RX_WORK_OFF + NET_VQ_RX_OFF, 0, !INNER_RX);
    return 0;
}
#endif
#if HAVE_KPROBE_HANDLE_TX
int kprobe_handle_tx(struct pt_regs *ctx)
{
    handler_enter(ctx, PT_REGS_PARM1(ctx) + NET_VQ_TX_OFF, 0, 1);
    return 0;
}
#endif
#if HAVE_KPROBE_HANDLE_RX
int kprobe_handle_rx(struct pt_regs *ctx)
{
    handler_enter(ctx, PT_REGS_PARM1(ctx) + NET_VQ_RX_OFF, 0, 1);
    return 0;
}
#endif
#if HAVE_KRETPROBE_HANDLE_TX_KICK || HAVE_KRETPROBE_HANDLE_RX_KICK || HAVE_KRETPROBE_HANDLE_TX_NET || \
    HAVE_KRETPROBE_HANDLE_RX_NET || HAVE_KRETPROBE_HANDLE_TX || HAVE_KRETPROBE_HANDLE_RX
int kretprobe_handler(struct pt_regs *ctx)
{
    handler_return(ctx);
    return 0;
}
#endif

/* ---- used ring, signalling ------------------------------------------------ */

/* A signalling scope: vhost_signal(dev, vq), or
 * vhost_add_used_and_signal_n(), into which GCC may inline vhost_signal
 * (Debian 6.1 does: vhost-net's calls never enter the out-of-line copy).
 * A nested scope on the same vq restarts it; its return concludes it. */
static __always_inline void signal_enter(u64 vq)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct sig g = {.vq = vq};
    sigs.update(&tid, &g);
    vqs_count(vq, C_SIGNALS, 1);
}

#if HAVE_KPROBE_VHOST_ADD_USED_AND_SIGNAL_N
/* vhost_add_used_and_signal_n(dev, vq, heads, count) */
int kprobe_vhost_add_used_and_signal_n(struct pt_regs *ctx)
{
    u64 vq = parm(ctx, ARG_VQ_VHOST_ADD_USED_AND_SIGNAL_N);
    struct vq_state *s = snap(vq);
    if (!s)
        return 0;
    u64 count = (u32)parm(ctx, ARG_COUNT_VHOST_ADD_USED_AND_SIGNAL_N);
    u64 now = bpf_ktime_get_ns();
    used_ts.update(&vq, &now);
    vqs_count(vq, C_USED_ADDED, count);
    emit(ctx, vq, s, EV_USED_ADD, count);
#if HAVE_KRETPROBE_VHOST_ADD_USED_AND_SIGNAL_N
    signal_enter(vq);
#endif
    return 0;
}
#endif

#if HAVE_KPROBE_VHOST_SIGNAL
/* vhost_signal(dev, vq): signals vq->call_ctx when vhost_notify() says so. */
int kprobe_vhost_signal(struct pt_regs *ctx)
{
    u64 vq = parm(ctx, ARG_VQ_VHOST_SIGNAL);
    if (!snap(vq))
        return 0;
    signal_enter(vq);
    return 0;
}
#endif

#if HAVE_KRETPROBE_VHOST_SIGNAL || HAVE_KRETPROBE_VHOST_ADD_USED_AND_SIGNAL_N
int kretprobe_signal(struct pt_regs *ctx)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct sig *g = sigs.lookup(&tid);
    if (!g)
        return 0;
    u64 vq = g->vq;
    u32 signalled = g->signalled;
    sigs.delete(&tid);
    struct vq_state *s = snap(vq);
    if (!s)
        return 0;
    if (signalled) {
        vqs_count(vq, C_CALLS, 1);
        emit(ctx, vq, s, EV_CALL, s->last_used_idx);
    } else {
#if !HAVE_KRETPROBE_VHOST_NOTIFY
        vqs_count(vq, C_CALLS_SUPPRESSED, 1);
        emit(ctx, vq, s, EV_CALL_SUPPRESSED, s->last_used_idx);
#endif
    }
    return 0;
}
#endif

/* eventfd_signal[_mask](ctx, ...) inside vhost_signal: the call itself. */
static __always_inline void on_eventfd_signal(struct pt_regs *ctx)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct sig *g = sigs.lookup(&tid);
    if (!g)
        return;
    g->signalled = 1;
    u64 vq = g->vq;
    u64 *t = used_ts.lookup(&vq);
    if (t) {
        vqs_hist(vq, H_USED_TO_CALL_NS, bpf_ktime_get_ns() - *t);
        used_ts.delete(&vq);
    }
}
#if HAVE_KPROBE_EVENTFD_SIGNAL_MASK
int kprobe_eventfd_signal_mask(struct pt_regs *ctx)
{
    on_eventfd_signal(ctx);
    return 0;
}
#endif
#if HAVE_KPROBE_EVENTFD_SIGNAL
int kprobe_eventfd_signal(struct pt_regs *ctx)
{
    on_eventfd_signal(ctx);
    return 0;
}
#endif

#if HAVE_KPROBE_VHOST_NOTIFY
int kprobe_vhost_notify(struct pt_regs *ctx)
{
    snap(parm(ctx, ARG_VQ_VHOST_NOTIFY));
    return 0;
}
#endif
#if HAVE_KRETPROBE_VHOST_NOTIFY
/* vhost_notify() returned false: the driver suppressed this call
 * (VRING_AVAIL_F_NO_INTERRUPT or used_event; VIRTIO 1.2 §2.7.10). The vq is
 * the one vhost_signal() is working on in this thread. */
int kretprobe_vhost_notify(struct pt_regs *ctx)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct sig *g = sigs.lookup(&tid);
    if (!g || PT_REGS_RC(ctx) & 0xff)
        return 0;
    u64 vq = g->vq;
    struct vq_state *s = snap(vq);
    if (!s)
        return 0;
    vqs_count(vq, C_CALLS_SUPPRESSED, 1);
    emit(ctx, vq, s, EV_CALL_SUPPRESSED, s->last_used_idx);
    return 0;
}
#endif

/* ---- notifications ------------------------------------------------------ */

/* vhost_{enable,disable}_notify(dev, vq): kicks asked for again / suppressed. */
static __always_inline void notify_change(struct pt_regs *ctx, u64 vq, int enable)
{
    struct vq_state *s = snap(vq);
    if (!s)
        return;
    s->notify_enabled = enable;
    vqs_count(vq, enable ? C_NOTIFY_ENABLES : C_NOTIFY_DISABLES, 1);
    emit(ctx, vq, s, enable ? EV_NOTIFY_ENABLE : EV_NOTIFY_DISABLE, 0);
}
#if HAVE_KPROBE_VHOST_ENABLE_NOTIFY
int kprobe_vhost_enable_notify(struct pt_regs *ctx)
{
    notify_change(ctx, parm(ctx, ARG_VQ_VHOST_ENABLE_NOTIFY), 1);
    return 0;
}
#endif
#if HAVE_KPROBE_VHOST_DISABLE_NOTIFY
int kprobe_vhost_disable_notify(struct pt_regs *ctx)
{
    notify_change(ctx, parm(ctx, ARG_VQ_VHOST_DISABLE_NOTIFY), 0);
    return 0;
}
#endif

/* ---- weight ------------------------------------------------------------- */

#if HAVE_KPROBE_VHOST_EXCEEDS_WEIGHT
/* vhost_exceeds_weight(vq, pkts, total_len) */
int kprobe_vhost_exceeds_weight(struct pt_regs *ctx)
{
    u64 vq = parm(ctx, ARG_VQ_VHOST_EXCEEDS_WEIGHT);
    u64 tid = bpf_get_current_pid_tgid();
    weights.update(&tid, &vq);
    return 0;
}
#endif
#if HAVE_KRETPROBE_VHOST_EXCEEDS_WEIGHT
int kretprobe_vhost_exceeds_weight(struct pt_regs *ctx)
{
    u64 tid = bpf_get_current_pid_tgid();
    u64 *p = weights.lookup(&tid);
    if (!p)
        return 0;
    u64 vq = *p;
    weights.delete(&tid);
    if (!(PT_REGS_RC(ctx) & 0xff))
        return 0;
    struct vq_state *s = snap(vq);
    if (!s)
        return 0;
    vqs_count(vq, C_WEIGHT_EXCEEDED, 1);
    emit(ctx, vq, s, EV_WEIGHT_EXCEEDED, 0);
    return 0;
}
#endif

/* ---- kicks -------------------------------------------------------------- */

static __always_inline int is_kick_fn(u64 fn)
{
    return fn && (fn == HANDLE_TX_KICK_ADDR || fn == HANDLE_RX_KICK_ADDR);
}

#if HAVE_KPROBE_VHOST_POLL_WAKEUP
/* vhost_poll_wakeup(wait, mode, sync, key): a kick when the poll is a
 * virtqueue's (its work runs handle_{tx,rx}_kick) and the wake-up's poll
 * bits match the poll's mask (what vhost_poll_wakeup itself checks). */
int kprobe_vhost_poll_wakeup(struct pt_regs *ctx)
{
    u64 poll = PT_REGS_PARM1(ctx) - POLL_WAIT_OFF;
    u64 fn = 0, mask = 0;
    RD(fn, poll, POLL_WORK_FN);
    if (!is_kick_fn(fn))
        return 0;
    RD(mask, poll, POLL_MASK);
    if (!((u64)PT_REGS_PARM4(ctx) & mask))
        return 0;
    u64 vq = poll - VQ_POLL_OFF;
    struct vq_state *s = snap(vq);
    if (!s)
        return 0;
    u64 now = bpf_ktime_get_ns();
    kick_ts.insert(&vq, &now);  /* the first kick not yet handled */
    vqs_count(vq, C_KICKS, 1);
    emit(ctx, vq, s, EV_KICK, 1);
    return 0;
}
#endif

static __always_inline void work_queued(struct pt_regs *ctx, u64 work)
{
    u64 fn = 0;
    RD(fn, work, WORK_FN);
    if (!is_kick_fn(fn))
        return;
    u64 vq = KICK_WORK_VQ(work);
    if (!snap(vq))
        return;
    vqs_count(vq, C_WORKS_QUEUED, 1);
#if !HAVE_KPROBE_VHOST_POLL_WAKEUP
    u64 now = bpf_ktime_get_ns();
    kick_ts.insert(&vq, &now);
#endif
}
#if HAVE_KPROBE_VHOST_WORK_QUEUE
/* vhost_work_queue(dev, work) (up to 6.4) */
int kprobe_vhost_work_queue(struct pt_regs *ctx)
{
    work_queued(ctx, PT_REGS_PARM2(ctx));
    return 0;
}
#endif
#if HAVE_KPROBE_VHOST_VQ_WORK_QUEUE
/* vhost_vq_work_queue(vq, work) (6.5+) */
int kprobe_vhost_vq_work_queue(struct pt_regs *ctx)
{
    work_queued(ctx, PT_REGS_PARM2(ctx));
    return 0;
}
#endif
