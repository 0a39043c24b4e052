/* eventfd.bpf.c: kicks and calls as they happen.
 *
 * From user space (every kernel): syscalls:sys_enter_write / sys_enter_read
 * / sys_exit_read on the eventfds of interest, filtered here by (tgid, fd)
 * in the `watched` map that Python fills (fds from vhost-user
 * SET_VRING_KICK/CALL, the vhost ioctls, or /proc/PID/fdinfo), and uprobes
 * on libc's eventfd_write/eventfd_read.
 * In the kernel (where kprobes exist): eventfd_signal[_mask],
 * ioeventfd_write (KVM: a kick), irqfd_wakeup (KVM: an interrupt
 * injected, a call), vhost_poll_wakeup (vhost woken by a kick eventfd).
 *
 * Prelude defines: SYSCALL_ARGS_OFF, SYSCALL_RET_OFF (from the tracepoints'
 * format files), C_* counter indexes, EV_* event kinds, HAVE_* per attach
 * point, KIND_*, SIDE_*, KERNEL_KEY_MIN.
 */

struct watch_key {
    u32 tgid;
    u32 fd;
};

struct watch_val {
    u64 key;     /* Python's id for (device, queue) */
    s16 queue;
    u8 side;     /* SIDE_DEVICE (back-end: reads kicks, writes calls) | SIDE_DRIVER */
    u8 kind;     /* KIND_UNKNOWN (decided by side and direction) | KIND_KICK | KIND_CALL */
};

struct pending_read {
    u64 buf;
    struct watch_val w;
};

BPF_HASH(watched, struct watch_key, struct watch_val, 4096);
BPF_HASH(reads, u64, struct pending_read, 4096);

static __always_inline struct watch_val *lookup_fd(u32 fd)
{
    struct watch_key k = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd};
    return watched.lookup(&k);
}

/* The kind of a watched fd: explicit, or the one its side uses in this
 * direction (a device reads kicks and writes calls, a driver the reverse). */
static __always_inline int fd_kind(struct watch_val *w, int is_write)
{
    if (w->kind != KIND_UNKNOWN)
        return w->kind;
    if (w->side == SIDE_DEVICE)
        return is_write ? KIND_CALL : KIND_KICK;
    return is_write ? KIND_KICK : KIND_CALL;
}

int tracepoint_sys_enter_write(void *args)
{
    struct watch_val *w = lookup_fd((u32)sc_arg(args, 0));
    if (!w)
        return 0;
    u64 value = 0;
    bpf_probe_read_user(&value, sizeof(value), (void *)sc_arg(args, 1));
    vqs_count(w->key, C_WRITES, 1);
    if (fd_kind(w, 1) == KIND_KICK) {
        vqs_count(w->key, C_KICKS, 1);
        vqs_emit(args, w->key, EV_KICK, w->queue, value);
    } else {
        vqs_count(w->key, C_CALLS, 1);
        vqs_emit(args, w->key, EV_CALL, w->queue, value);
    }
    return 0;
}

int tracepoint_sys_enter_read(void *args)
{
    struct watch_val *w = lookup_fd((u32)sc_arg(args, 0));
    if (!w)
        return 0;
    struct pending_read p = {.buf = sc_arg(args, 1), .w = *w};
    u64 tid = bpf_get_current_pid_tgid();
    reads.update(&tid, &p);
    return 0;
}

int tracepoint_sys_exit_read(void *args)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct pending_read *p = reads.lookup(&tid);
    if (!p)
        return 0;
    long ret = 0;
    bpf_probe_read_kernel(&ret, sizeof(ret), (char *)args + SYSCALL_RET_OFF);
    if (ret == 8) {
        u64 value = 0;
        bpf_probe_read_user(&value, sizeof(value), (void *)p->buf);
        vqs_count(p->w.key, C_READS, 1);
        if (fd_kind(&p->w, 0) == KIND_KICK) {
            vqs_count(p->w.key, C_KICKS_READ, value);
            vqs_emit(args, p->w.key, EV_KICK, p->w.queue, value);
        } else {
            vqs_count(p->w.key, C_CALLS_READ, value);
            vqs_emit(args, p->w.key, EV_CALL, p->w.queue, value);
        }
    }
    reads.delete(&tid);
    return 0;
}

/* libc's eventfd_write(int fd, eventfd_t value) / eventfd_read(int fd,
 * eventfd_t *value): counted apart (the write/read tracepoints see the
 * same operation as a syscall). */
int uprobe_eventfd_write(struct pt_regs *ctx)
{
    struct watch_val *w = lookup_fd((u32)PT_REGS_PARM1(ctx));
    if (w)
        vqs_count(w->key, C_LIBC_EVENTFD_WRITE, 1);
    return 0;
}

int uprobe_eventfd_read(struct pt_regs *ctx)
{
    struct watch_val *w = lookup_fd((u32)PT_REGS_PARM1(ctx));
    if (w)
        vqs_count(w->key, C_LIBC_EVENTFD_READ, 1);
    return 0;
}

/* In-kernel signalling, keyed by the kernel object's address (>=
 * KERNEL_KEY_MIN): eventfd_signal_mask(ctx, n, mask) / eventfd_signal(ctx,
 * n) — vhost's calls, KVM's irqfd/ioeventfd plumbing; the pid filter
 * applies to the signalling task (vhost's worker, a vCPU thread):
 * count_signal counts one signalling of the object at `key` in counter idx
 * when that task passes it. */
static __always_inline int count_signal(u64 key, int idx)
{
    if (vqs_pid_ok(bpf_get_current_pid_tgid() >> 32))
        vqs_count(key, idx, 1);
    return 0;
}

#if HAVE_KPROBE_EVENTFD_SIGNAL_MASK
int kprobe_eventfd_signal_mask(struct pt_regs *ctx)
{
    return count_signal(PT_REGS_PARM1(ctx), C_SIGNALS);
}
#endif
#if HAVE_KPROBE_EVENTFD_SIGNAL
int kprobe_eventfd_signal(struct pt_regs *ctx)
{
    return count_signal(PT_REGS_PARM1(ctx), C_SIGNALS);
}
#endif
#if HAVE_KPROBE_IOEVENTFD_WRITE
/* ioeventfd_write(vcpu, struct kvm_io_device *this, gpa_t addr, int len, const void *val) */
int kprobe_ioeventfd_write(struct pt_regs *ctx)
{
    return count_signal(PT_REGS_PARM2(ctx), C_KVM_KICKS);
}
#endif
#if HAVE_KPROBE_IRQFD_WAKEUP
/* irqfd_wakeup(wait_queue_entry_t *wait, unsigned mode, int sync, void *key) */
int kprobe_irqfd_wakeup(struct pt_regs *ctx)
{
    vqs_count(PT_REGS_PARM1(ctx), C_KVM_CALLS, 1);
    return 0;
}
#endif
#if HAVE_KPROBE_VHOST_POLL_WAKEUP
/* vhost_poll_wakeup(wait_queue_entry_t *wait, unsigned mode, int sync, void *key) */
int kprobe_vhost_poll_wakeup(struct pt_regs *ctx)
{
    vqs_count(PT_REGS_PARM1(ctx), C_VHOST_WAKEUPS, 1);
    return 0;
}
#endif
