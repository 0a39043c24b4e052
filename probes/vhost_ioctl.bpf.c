/* vhost_ioctl.bpf.c: the vhost ioctls (include/uapi/linux/vhost.h) with
 * their arguments read from user memory, so that vqscope learns, per
 * process and vhost fd, the memory table, the rings' addresses and the
 * kick/call/backend fds — without QMP.
 *
 * sys_enter_ioctl keeps (fd, cmd, arg) per thread for ioctls of type
 * VHOST_VIRTIO (0xAF); sys_exit_ioctl reads the argument (after the call:
 * VHOST_GET_VRING_BASE's result is there) and sends one record with the
 * return value through the `ioctls` ring buffer (perf buffer without
 * ring buffers). Records that do not fit count in `lost`.
 *
 * Prelude defines: SYSCALL_ARGS_OFF, SYSCALL_RET_OFF, VHOST_VIRTIO,
 * VHOST_SET_MEM_TABLE, MAX_REGIONS, REGION_SIZE, IOCTL_ARG_MAX, IOCTL_ARG_BUF (a power
 * of two above IOCTL_ARG_MAX), NR_CPUS_MAX.
 */

struct ioctl_call {
    u64 arg;
    u32 fd;
    u32 cmd;
};

struct ioctl_rec {
    u64 ts;
    u64 arg;
    s64 ret;
    u32 pid;
    u32 fd;
    u32 cmd;
    u32 len;          /* bytes of data read */
    u8 data[IOCTL_ARG_BUF]; /* the argument as the process sees it after the call */
};

BPF_HASH(calls, u64, struct ioctl_call, 1024);
/* one record per CPU to build in (too big for the 512-byte stack) */
BPF_ARRAY(scratch, struct ioctl_rec, NR_CPUS_MAX);
#if USE_RINGBUF
BPF_RINGBUF_OUTPUT(ioctls, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(ioctls);
#endif

int tracepoint_sys_enter_ioctl(void *args)
{
    u32 cmd = (u32)sc_arg(args, 1);
    if (((cmd >> 8) & 0xff) != VHOST_VIRTIO)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!vqs_pid_ok(id >> 32))
        return 0;
    struct ioctl_call c = {.arg = sc_arg(args, 2), .fd = (u32)sc_arg(args, 0), .cmd = cmd};
    calls.update(&id, &c);
    return 0;
}

int tracepoint_sys_exit_ioctl(void *args)
{
    u64 id = bpf_get_current_pid_tgid();
    struct ioctl_call *c = calls.lookup(&id);
    if (!c)
        return 0;
    u32 z = 0, cpu = bpf_get_smp_processor_id();
    struct ioctl_rec *r = scratch.lookup(&cpu);
    if (!r) {
        calls.delete(&id);
        return 0;
    }
    r->ts = bpf_ktime_get_ns();
    r->arg = c->arg;
    r->pid = id >> 32;
    r->fd = c->fd;
    r->cmd = c->cmd;
    r->ret = 0;
    bpf_probe_read_kernel(&r->ret, sizeof(r->ret), (char *)args + SYSCALL_RET_OFF);
    u32 len = (c->cmd >> 16) & 0x3fff;  /* _IOC_SIZE */
    if (c->cmd == VHOST_SET_MEM_TABLE) {
        /* struct vhost_memory { __u32 nregions; __u32 padding; regions[] } */
        u32 n = 0;
        bpf_probe_read_user(&n, sizeof(n), (void *)c->arg);
        if (n > MAX_REGIONS)
            n = MAX_REGIONS;
        len = 8 + n * REGION_SIZE;
    }
    if ((c->cmd >> 30) == 0)  /* _IOC_NONE: no argument */
        len = 0;
    if (len > IOCTL_ARG_MAX)
        len = IOCTL_ARG_MAX;
    r->len = len;
    if (len > 0 && c->arg) {
        /* Hide len's range from clang so that the mask below is kept: the
         * verifier needs it as the bound of the read into r->data. */
        u64 n = len;
        asm volatile("" : "+r"(n));
        n &= IOCTL_ARG_BUF - 1;
        bpf_probe_read_user(r->data, n, (void *)c->arg);
    }
    calls.delete(&id);
#if USE_RINGBUF
    if (ioctls.ringbuf_output(r, sizeof(*r), 0) != 0) {
        u64 *l = lost.lookup(&z);
        if (l)
            (*l)++;
    }
#else
    ioctls.perf_submit(args, r, sizeof(*r));
#endif
    return 0;
}
