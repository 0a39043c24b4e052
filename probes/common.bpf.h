/* common.bpf.h: what every vqscope probe program shares (pasted after the
 * generated #define prelude, before NAME.bpf.c).
 *
 * Prelude defines used here: NCOUNTERS, STREAM, USE_RINGBUF, RINGBUF_PAGES,
 * FILTER_PIDS, MAX_PIDS.
 *
 * - counters: per key (a vhost_virtqueue address, or a device/queue id),
 *   u64 c[NCOUNTERS], per CPU (no atomics on the hot path; Python sums).
 * - hists: log2 histograms keyed (key, hist id, slot).
 * - events: the optional stream (ring buffer, or perf buffer without one),
 *   and lost: records that did not fit.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

struct vqs_counters {
    u64 c[NCOUNTERS];
};

struct vqs_hist_key {
    u64 key;
    u32 hist;
    u32 slot;
};

struct vqs_event {
    u64 ts;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 key;
    u64 value;
    u32 pid;     /* tgid */
    u16 kind;    /* EV_* */
    s16 queue;
};

BPF_PERCPU_HASH(counters, u64, struct vqs_counters, 4096);
BPF_HASH(hists, struct vqs_hist_key, u64, 8192);
BPF_HASH(pid_filter, u32, u8, MAX_PIDS);
BPF_PERCPU_ARRAY(lost, u64, 1);

#if STREAM
#if USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif
#endif

static __always_inline int vqs_pid_ok(u32 tgid)
{
#if FILTER_PIDS
    return pid_filter.lookup(&tgid) != NULL;
#else
    return 1;
#endif
}

static __always_inline void vqs_count(u64 key, int idx, u64 n)
{
    struct vqs_counters zero = {};
    struct vqs_counters *c = counters.lookup_or_try_init(&key, &zero);
    if (c && idx >= 0 && idx < NCOUNTERS)
        c->c[idx] += n;
}

static __always_inline void vqs_hist(u64 key, u32 hist, u64 value)
{
    struct vqs_hist_key hk = {.key = key, .hist = hist, .slot = bpf_log2l(value)};
    hists.atomic_increment(hk);
}

/* One stream record; pid: the process it is about (a vhost worker emits
 * for its owner). */
static __always_inline void vqs_emit_pid(void *ctx, u64 key, u16 kind, s16 queue, u64 value, u32 pid)
{
#if STREAM
    struct vqs_event e = {};
    e.ts = bpf_ktime_get_ns();
    e.key = key;
    e.value = value;
    e.pid = pid;
    e.kind = kind;
    e.queue = queue;
#if USE_RINGBUF
    if (events.ringbuf_output(&e, sizeof(e), 0) != 0) {
        u32 z = 0;
        u64 *l = lost.lookup(&z);
        if (l)
            (*l)++;
    }
#else
    events.perf_submit(ctx, &e, sizeof(e));
#endif
#endif
}

static __always_inline void vqs_emit(void *ctx, u64 key, u16 kind, s16 queue, u64 value)
{
    vqs_emit_pid(ctx, key, kind, queue, value, bpf_get_current_pid_tgid() >> 32);
}

#ifdef SYSCALL_ARGS_OFF
/* Argument i of a syscalls:sys_enter_* tracepoint record (offset from the
 * tracepoint's format file). */
static __always_inline u64 sc_arg(void *args, int i)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)args + SYSCALL_ARGS_OFF + 8 * i);
    return v;
}
#endif
