/* Device-side data path of a split virtqueue (VIRTIO 1.2 §2.7) and the
 * virtio-net fast paths (§5.1.6) of vqscope's vhost-user back-end.
 *
 * Memory ordering (the driver runs on another CPU):
 * - avail->idx is loaded with acquire; ring entries and descriptors are read
 *   after it (§2.7.13.3: the driver writes them before the idx).
 * - used elements are written, then used->idx is stored with release
 *   (§2.7.8: the device writes the elements before updating idx), so the
 *   buffers' contents and the elements are visible before the idx.
 * - a full fence separates "publish used->idx" from "read used_event / avail
 *   flags" (§2.7.10 / §2.7.7), and "write avail_event / used flags" from
 *   "re-read avail->idx", to close the lost-notification races.
 * Descriptors are copied once into a local before they are checked and used:
 * the driver may change them under us and we must not read a field twice.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "vqd_datapath.h"
#include "vqd_inflight.h"
#include "vqd_decode.h"

_Static_assert(sizeof(struct vqd_iov) == sizeof(struct iovec), "vqd_iov must match struct iovec");
_Static_assert(sizeof(struct vqd_desc) == 16, "virtq_desc is 16 bytes (§2.7.5)");
_Static_assert(sizeof(struct vqd_event) == 16, "vqd_event is read as <QII by inspector/vqd.py");

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
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

void vqd_vq_set_broken(struct vqd_vq *vq, const char *reason)
{
    if (vq->broken)
        return; /* keep the first reason: later ones are consequences */
    vq->broken = 1;
    snprintf(vq->reason, sizeof(vq->reason), "%s", reason);
}

__attribute__((format(printf, 2, 3))) static int broken(struct vqd_vq *vq, const char *fmt, ...)
{
    if (!vq->broken) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(vq->reason, sizeof(vq->reason), fmt, ap);
        va_end(ap);
        vq->broken = 1;
    }
    return VQD_E_BROKEN;
}

/* ------------------------------------------------------------------------
 * SIGBUS guard (see vqd_datapath.h, "Faults").
 *
 * guard_env is the innermost armed sigjmp_buf of this thread (NULL: not in a
 * guarded section); guard_addr the si_addr of its last guarded fault. They
 * are initial-exec TLS so that the handler reads them without
 * __tls_get_addr (which may allocate for a dlopen'ed module: not
 * async-signal-safe). sigsetjmp does not save the signal mask (no syscall per
 * burst): the handler runs with SA_NODEFER, so SIGBUS is never left blocked
 * when it jumps out.
 */
#define VQD_TLS __attribute__((tls_model("initial-exec")))
static __thread sigjmp_buf *guard_env VQD_TLS;
static __thread uintptr_t guard_addr VQD_TLS;
static struct sigaction guard_prev; /* the SIGBUS action before ours */
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;

static void guard_handler(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *env = guard_env;
    if (env && si->si_code > 0) {
        /* A fault of this thread inside a guarded section (si_code > 0: the
         * kernel's, not a kill(2)): abandon the section. */
        guard_env = NULL;
        guard_addr = (uintptr_t)si->si_addr;
        siglongjmp(*env, 1);
    }
    /* Not ours: chain to the previous handler, or take the default action. */
    if ((guard_prev.sa_flags & SA_SIGINFO) && guard_prev.sa_sigaction) {
        guard_prev.sa_sigaction(sig, si, uc);
        return;
    }
    if (!(guard_prev.sa_flags & SA_SIGINFO) && guard_prev.sa_handler != SIG_DFL
        && guard_prev.sa_handler != SIG_IGN) {
        guard_prev.sa_handler(sig);
        return;
    }
    /* SIG_DFL (SIG_IGN cannot stop a fault): restore it; a faulting access
     * re-executes and dumps core, a sent signal is raised again. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
    if (si->si_code <= 0)
        raise(sig);
}

/* Install the SIGBUS handler if it is not the current one (idempotent; call
 * it before servicing a queue: a handler installed after ours, e.g. Python's
 * faulthandler, is kept and chained to). 0, or -errno. */
int vqd_guard_install(void)
{
    struct sigaction cur, sa;
    int rc = 0;
    pthread_mutex_lock(&guard_lock);
    if (sigaction(SIGBUS, NULL, &cur) < 0) {
        rc = -errno;
    } else if (!((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == guard_handler)) {
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = guard_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        guard_prev = cur;
        if (sigaction(SIGBUS, &sa, NULL) < 0)
            rc = -errno;
    }
    pthread_mutex_unlock(&guard_lock);
    return rc;
}

/* Host address of the calling thread's last guarded fault (0: none). */
uint64_t vqd_guard_fault_addr(void)
{
    return guard_addr;
}

/* Run `call` (an int expression) into rc with SIGBUS guarded; on a fault run
 * `on_fault` instead (rc is then whatever on_fault sets). Nests. */
#define GUARDED(rc, call, on_fault)                                          \
    do {                                                                     \
        sigjmp_buf env_;                                                     \
        sigjmp_buf *const prev_ = guard_env;                                 \
        if (sigsetjmp(env_, 0)) {                                            \
            guard_env = prev_;                                               \
            on_fault;                                                        \
        } else {                                                             \
            guard_env = &env_;                                               \
            __atomic_signal_fence(__ATOMIC_SEQ_CST);                         \
            (rc) = (call);                                                   \
            __atomic_signal_fence(__ATOMIC_SEQ_CST);                         \
            guard_env = prev_;                                               \
        }                                                                    \
    } while (0)

/* Mark vq broken after a guarded fault, naming the guest-physical address
 * and region (vq's region table maps host addresses back). */
static int fault_broken(struct vqd_vq *vq)
{
    uintptr_t a = guard_addr;
    if (!vq)
        return VQD_E_BROKEN;
    for (int i = 0; i < vq->nregions; i++) {
        const struct vqd_region *r = &vq->regions[i];
        if (a >= (uintptr_t)r->host && a - (uintptr_t)r->host < r->size)
            return broken(vq, "SIGBUS at guest-physical %#llx (region %d, %#llx+%#llx): the "
                          "front-end shrank its memory after SET_MEM_TABLE (memfd truncated?)",
                          (unsigned long long)(r->gpa + (a - (uintptr_t)r->host)), i,
                          (unsigned long long)r->gpa, (unsigned long long)r->size);
    }
    return broken(vq, "SIGBUS at host address %#llx: the front-end shrank its memory after "
                  "SET_MEM_TABLE (memfd truncated?)", (unsigned long long)a);
}

int vqd_snapshot_guarded(const struct vqd_region *regions, int nr_regions,
                         const struct vqd_region *valid, int nr_valid,
                         uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t size, int32_t last_avail_idx, uint32_t max_descs,
                         struct vqd_snap_out *out)
{
    int rc;
    GUARDED(rc, vqd_snapshot(regions, nr_regions, valid, nr_valid, desc, avail, used, size,
                             last_avail_idx, max_descs, out),
            rc = VQD_E_FAULT);
    return rc;
}

/* ------------------------------------------------------------------------
 * Event log (single producer: the vq's worker; single consumer: the drain).
 */

int vqd_evlog_init(struct vqd_evlog *log, struct vqd_event *buf, uint32_t capacity)
{
    if (!log || !buf || capacity == 0 || (capacity & (capacity - 1)))
        return VQD_E_INVAL;
    memset(log, 0, sizeof(*log));
    log->ev = buf;
    log->mask = capacity - 1;
    return VQD_OK;
}

static inline uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Append one event, or count it in dropped when the log is full; never
 * blocks. *now is the event's time: 0 means "read the clock" (a vDSO
 * clock_gettime, ~30 ns here, the main cost) and the value read is left
 * there, so the calls and suppressed calls that end one burst on several
 * queues share one reading. */
static inline void ev_record(struct vqd_vq *vq, uint32_t kind, uint32_t value, uint64_t *now)
{
    struct vqd_evlog *l = vq->evlog;
    if (!l)
        return;
    uint64_t h = __atomic_load_n(&l->head, __ATOMIC_RELAXED);
    if (UNLIKELY(h - l->tail_cache > l->mask)) {
        /* Looks full: see how far the consumer got. Acquire: its reads of
         * the slots it freed are done before we overwrite them. */
        l->tail_cache = __atomic_load_n(&l->tail, __ATOMIC_ACQUIRE);
        if (h - l->tail_cache > l->mask) {
            __atomic_store_n(&l->dropped, l->dropped + 1, __ATOMIC_RELAXED);
            return;
        }
    }
    if (!*now)
        *now = realtime_ns();
    struct vqd_event *e = &l->ev[h & l->mask];
    e->time_ns = *now;
    e->kind = kind;
    e->value = value;
    /* Release: the entry is written before the consumer can see it. */
    __atomic_store_n(&l->head, h + 1, __ATOMIC_RELEASE);
}

/* Events logged and not drained yet (the consumer's view: a lower bound
 * while the producer runs). */
int vqd_vq_events_pending(struct vqd_vq *vq)
{
    struct vqd_evlog *l = vq->evlog;
    if (!l)
        return 0;
    return (int)(__atomic_load_n(&l->head, __ATOMIC_ACQUIRE) - __atomic_load_n(&l->tail, __ATOMIC_RELAXED));
}

/* Copy up to max logged events, oldest first, into out and free their
 * slots; returns how many. One consumer at a time (the caller serialises). */
int vqd_vq_drain_events(struct vqd_vq *vq, struct vqd_event *out, int max)
{
    struct vqd_evlog *l = vq->evlog;
    if (max < 0)
        return VQD_E_INVAL;
    if (!l)
        return 0;
    uint64_t t = __atomic_load_n(&l->tail, __ATOMIC_RELAXED);
    uint64_t h = __atomic_load_n(&l->head, __ATOMIC_ACQUIRE);
    uint64_t n = h - t;
    if (n > (uint64_t)max)
        n = (uint64_t)max;
    /* At most two runs: up to the end of the array, then from its start. */
    uint64_t first = (t & l->mask) + n > (uint64_t)l->mask + 1 ? (uint64_t)l->mask + 1 - (t & l->mask) : n;
    memcpy(out, &l->ev[t & l->mask], first * sizeof(*out));
    memcpy(out + first, &l->ev[0], (n - first) * sizeof(*out));
    __atomic_store_n(&l->tail, t + n, __ATOMIC_RELEASE);
    return (int)n;
}

/* Events lost because the log was full, since the log was initialised. */
uint64_t vqd_vq_events_dropped(struct vqd_vq *vq)
{
    return vq->evlog ? __atomic_load_n(&vq->evlog->dropped, __ATOMIC_RELAXED) : 0;
}

/* §2.7.10 / §2.7.7.2: "notify if the new used index has just passed
 * used_event", i.e. event lies in [old, new). */
int vqd_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

static inline uint16_t *used_event_ptr(struct vqd_vq *vq)
{
    return &vq->avail->ring[vq->num]; /* §2.7.6: after ring[Queue Size] */
}

static inline uint16_t *avail_event_ptr(struct vqd_vq *vq)
{
    return (uint16_t *)&vq->used->ring[vq->num]; /* §2.7.8: after ring[Queue Size] */
}

static int vq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *avail, void *used,
                   const struct vqd_region *regions, int nregions, uint16_t last_avail_idx,
                   int event_idx, int call_fd, int kick_fd)
{
    memset(vq, 0, offsetof(struct vqd_vq, reason) + 1);
    vq->call_fd = call_fd;
    vq->kick_fd = kick_fd;
    vq->num = num;
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    vq->regions = regions;
    vq->nregions = nregions;
    vq->event_idx = !!event_idx;
    vq->last_avail_idx = vq->shadow_avail_idx = last_avail_idx;
    /* §2.7: Queue Size is a power of two, at most 32768 (we mask indices). */
    if (num == 0 || (num & (num - 1)) || num > VQD_MAX_QUEUE_SIZE)
        return broken(vq, "queue size %u is not a power of two in 1..32768 (VIRTIO 1.2 §2.7)", num);
    if (!desc || !avail || !used)
        return broken(vq, "a ring area is outside guest memory");
    /* §2.7: alignment of descriptor table 16, driver area 2, device area 4. */
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return broken(vq, "misaligned ring areas desc=%p avail=%p used=%p (VIRTIO 1.2 §2.7 alignment)",
                      desc, avail, used);
    /* The device's used index continues from what the ring holds (e.g. after
     * a front-end reconnect); last_avail_idx comes from SET_VRING_BASE. */
    vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    vq->signalled_used = vq->used_idx;
    vq->signalled_used_valid = 0;
    vq->notify_enabled = 1;
    return VQD_OK;
}

int vqd_vq_init(struct vqd_vq *vq, uint32_t num, void *desc, void *avail, void *used,
                const struct vqd_region *regions, int nregions, uint16_t last_avail_idx,
                int event_idx, int call_fd, int kick_fd)
{
    int rc;
    GUARDED(rc, vq_init(vq, num, desc, avail, used, regions, nregions, last_avail_idx, event_idx,
                        call_fd, kick_fd),
            rc = fault_broken(vq));
    return rc;
}

/* Entries the driver made available beyond last_avail_idx (refreshing the
 * shadow), or VQD_E_BROKEN when avail->idx moved more than Queue Size ahead
 * (§2.7.6: the driver cannot have more than Queue Size buffers available). */
static inline int avail_count(struct vqd_vq *vq)
{
    uint16_t a = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(a - vq->last_avail_idx);
    if (UNLIKELY(n > vq->num))
        return broken(vq, "avail->idx %u is %u entries ahead of last_avail_idx %u, more than "
                      "the queue size %u (VIRTIO 1.2 §2.7.6)", a, n, vq->last_avail_idx, vq->num);
    vq->shadow_avail_idx = a;
    if (UNLIKELY(vq->inflight != NULL)) {
        /* heads to hand back after a restart count too, and together they
         * still cannot exceed Queue Size (a hostile inflight area could) */
        uint32_t pending = vqd_inflight_pending(vq);
        if (UNLIKELY(n + pending > vq->num))
            return broken(vq, "%u entries available and %u heads in flight (inflight area): more than "
                          "the queue size %u (VIRTIO 1.2 §2.7.6)", n, pending, vq->num);
        return (int)(n + pending);
    }
    return n;
}

int vqd_vq_avail_count(struct vqd_vq *vq)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    GUARDED(rc, avail_count(vq), rc = fault_broken(vq));
    return rc;
}

/* Find the region holding gpa; returns the host pointer and, in *room, the
 * bytes left in that region from gpa. NULL when no region holds it. */
static inline uint8_t *gpa_map(const struct vqd_vq *vq, uint64_t gpa, uint64_t *room)
{
    const struct vqd_region *r = vq->regions;
    for (int i = 0; i < vq->nregions; i++) {
        if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size) {
            uint64_t off = gpa - r[i].gpa;
            *room = r[i].size - off;
            return r[i].host + off;
        }
    }
    return NULL;
}

/* Map [addr, addr + len) to iovecs, one per region it touches (clamped at
 * region ends, like libvhost-user's vu_gpa_to_va). */
static inline int map_range(struct vqd_vq *vq, uint64_t addr, uint32_t len,
                            struct vqd_iov *iov, int *n, int max_iov)
{
    uint64_t left = len;
    while (left) {
        uint64_t room;
        uint8_t *p = gpa_map(vq, addr, &room);
        if (UNLIKELY(!p))
            return broken(vq, "buffer %#llx+%#x (at %#llx) is outside guest memory "
                          "(VIRTIO 1.2 §2.7.5: addr is a guest-physical address)",
                          (unsigned long long)(addr - (len - left)), len, (unsigned long long)addr);
        if (UNLIKELY(*n >= max_iov))
            return VQD_E_NOSPACE;
        uint64_t chunk = left < room ? left : room;
        iov[*n].base = p;
        iov[*n].len = chunk;
        (*n)++;
        addr += chunk;
        left -= chunk;
    }
    return VQD_OK;
}

/* Walk the chain starting at head and map it into iov[0..max_iov).
 * Bounded: at most num descriptors of the ring, or of the indirect table. */
static int map_chain(struct vqd_vq *vq, uint16_t head, struct vqd_elem *e,
                     struct vqd_iov *iov, int max_iov)
{
    const struct vqd_desc *table = vq->desc;
    uint32_t max = vq->num, i = head, walked = 0;
    int n = 0, rc, indirect = 0;
    uint64_t out_len = 0, in_len = 0;
    uint32_t out_num = 0, in_num = 0;
    struct vqd_desc d;

    memcpy(&d, &table[i], sizeof(d));
    if (d.flags & VRING_DESC_F_INDIRECT) {
        /* §2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT. */
        if (d.flags & VRING_DESC_F_NEXT)
            return broken(vq, "descriptor %u has both VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT "
                          "(VIRTIO 1.2 §2.7.5.3.1)", i);
        /* §2.7.5.3: the table is len / 16 descriptors. */
        if (d.len == 0 || d.len % sizeof(struct vqd_desc))
            return broken(vq, "indirect descriptor %u has length %u, not a non-zero multiple of 16 "
                          "(VIRTIO 1.2 §2.7.5.3)", i, d.len);
        if (d.len / sizeof(struct vqd_desc) > VQD_MAX_QUEUE_SIZE)
            return broken(vq, "indirect table of descriptor %u has %u entries, more than 32768",
                          i, (unsigned)(d.len / sizeof(struct vqd_desc)));
        uint64_t room;
        const uint8_t *t = gpa_map(vq, d.addr, &room);
        if (!t || room < d.len)
            return broken(vq, "indirect table %#llx+%#x of descriptor %u is outside guest memory "
                          "or crosses a region end", (unsigned long long)d.addr, d.len, i);
        table = (const struct vqd_desc *)t;
        max = d.len / sizeof(struct vqd_desc);
        indirect = 1;
        i = 0;
        memcpy(&d, &table[0], sizeof(d));
    }
    for (;;) {
        /* A chain longer than its table means a loop (§2.7.5.2: the driver
         * MUST NOT create a chain longer than the Queue Size). */
        if (UNLIKELY(++walked > max))
            return broken(vq, "descriptor chain from head %u loops: more than %u descriptors%s",
                          head, max, indirect ? " in its indirect table" : "");
        if (UNLIKELY(d.flags & VRING_DESC_F_INDIRECT))
            return broken(vq, indirect
                          ? "nested indirect descriptor %u in the table of head %u "
                            "(VIRTIO 1.2 §2.7.5.3.1: only one table per descriptor)"
                          : "indirect descriptor %u inside the chain of head %u (only a chain's "
                            "head may be indirect here)", i, head);
        if (UNLIKELY(d.len == 0 && vq->reject_zero_len))
            return broken(vq, "descriptor %u of head %u has length 0 (zero-sized buffers are "
                          "refused, as QEMU's virtqueue_map_desc does)", i, head);
        int start = n;
        if (d.flags & VRING_DESC_F_WRITE) {
            in_len += d.len;
        } else {
            /* §2.7.4.2: device-readable descriptors come before device-writable ones. */
            if (UNLIKELY(in_num))
                return broken(vq, "device-readable descriptor %u after a device-writable one in "
                              "the chain of head %u (VIRTIO 1.2 §2.7.4.2)", i, head);
            out_len += d.len;
        }
        rc = map_range(vq, d.addr, d.len, iov, &n, max_iov);
        if (UNLIKELY(rc))
            return rc;
        if (d.flags & VRING_DESC_F_WRITE)
            in_num += n - start;
        else
            out_num += n - start;
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        /* §2.7.5.2: next indexes the same table. */
        if (UNLIKELY(d.next >= max))
            return broken(vq, "descriptor %u of head %u has next %u >= %s size %u (VIRTIO 1.2 §2.7.5)",
                          i, head, d.next, indirect ? "indirect table" : "queue", max);
        i = d.next;
        memcpy(&d, &table[i], sizeof(d));
    }
    if (UNLIKELY(out_len > UINT32_MAX || in_len > UINT32_MAX))
        return broken(vq, "chain of head %u is longer than 4 GiB", head);
    e->head = head;
    e->out_num = out_num;
    e->in_num = in_num;
    e->out_len = out_len;
    e->in_len = in_len;
    return n;
}

/* Pop one chain into iov; 1 popped, 0 none available, <0 error. */
static inline int pop_one(struct vqd_vq *vq, struct vqd_elem *e, struct vqd_iov *iov, int max_iov)
{
    if (UNLIKELY(vq->broken))
        return VQD_E_BROKEN;
    if (UNLIKELY(vq->inflight != NULL)) {
        /* After a restart, heads still in flight go first (vqd_inflight.c). */
        int h = vqd_inflight_next_resubmit(vq);
        if (h >= 0) {
            int rc = map_chain(vq, (uint16_t)h, e, iov, max_iov);
            if (UNLIKELY(rc < 0))
                return rc;
            vqd_inflight_popped(vq, (uint16_t)h, 1);
            return 1;
        }
    }
    if (vq->shadow_avail_idx == vq->last_avail_idx) {
        int n = avail_count(vq);
        if (n <= 0)
            return n;
    }
    /* §2.7.6: ring[last_avail_idx mod Queue Size] is the next head. */
    uint16_t head = __atomic_load_n(&vq->avail->ring[vq->last_avail_idx & (vq->num - 1)],
                                    __ATOMIC_RELAXED);
    if (UNLIKELY(head >= vq->num))
        return broken(vq, "avail->ring[%u] holds head %u >= queue size %u (VIRTIO 1.2 §2.7.6)",
                      vq->last_avail_idx & (vq->num - 1), head, vq->num);
    int rc = map_chain(vq, head, e, iov, max_iov);
    if (UNLIKELY(rc < 0))
        return rc;
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_popped(vq, head, 0);
    vq->last_avail_idx++;
    return 1;
}

static int vq_pop(struct vqd_vq *vq, struct vqd_elem *elems, int max_elems,
                  struct vqd_iov *iov, int max_iov)
{
    int got = 0, used_iov = 0;
    if (vq->broken)
        return VQD_E_BROKEN;
    if (max_elems < 0 || max_iov < 0)
        return VQD_E_INVAL;
    while (got < max_elems) {
        int rc = pop_one(vq, &elems[got], iov + used_iov, max_iov - used_iov);
        if (rc == VQD_E_NOSPACE) {
            if (got == 0)
                return VQD_E_NOSPACE; /* this chain alone does not fit */
            break;                    /* leave it for the next call */
        }
        if (rc < 0)
            return got ? got : rc; /* hand back what was popped; broken is latched */
        if (rc == 0)
            break;
        elems[got].iov_idx = used_iov;
        used_iov += elems[got].out_num + elems[got].in_num;
        got++;
    }
    return got;
}

int vqd_vq_pop(struct vqd_vq *vq, struct vqd_elem *elems, int max_elems,
               struct vqd_iov *iov, int max_iov)
{
    int rc;
    GUARDED(rc, vq_pop(vq, elems, max_elems, iov, max_iov), rc = fault_broken(vq));
    return rc;
}

/* Copy between iovecs of popped chains and a caller's buffer, under the
 * SIGBUS guard (the Python side of the data path: the net paths copy inside
 * their own guarded bursts). to_guest: buf -> iov, else iov -> buf. At most
 * len bytes; returns the bytes copied, or VQD_E_BROKEN with vq marked broken
 * when the memory behind an iovec was truncated (the fault's guest-physical
 * address in the reason). */
static int64_t iov_copy(const struct vqd_iov *iov, int n, uint8_t *buf, uint64_t len, int to_guest)
{
    uint64_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        uint64_t k = iov[i].len < len - done ? iov[i].len : len - done;
        if (to_guest)
            memmove(iov[i].base, buf + done, k);
        else
            memmove(buf + done, iov[i].base, k);
        done += k;
    }
    return (int64_t)done;
}

int64_t vqd_vq_copy_iov(struct vqd_vq *vq, const struct vqd_iov *iov, int n, uint8_t *buf,
                        uint64_t len, int to_guest)
{
    int64_t rc;
    if (n < 0)
        return VQD_E_INVAL;
    GUARDED(rc, iov_copy(iov, n, buf, len, to_guest), rc = fault_broken(vq));
    return rc;
}

/* Give back the last n popped (not yet used) chains, like vu_queue_rewind. */
int vqd_vq_rewind(struct vqd_vq *vq, int n)
{
    if (UNLIKELY(vq->inflight != NULL)) {
        vqd_inflight_rewind(vq, n);
        return VQD_OK;
    }
    vq->last_avail_idx -= (uint16_t)n;
    return VQD_OK;
}

/* Write one used element after the pending ones; not visible to the driver
 * until vqd_vq_flush. */
static inline void fill(struct vqd_vq *vq, uint32_t head, uint32_t len)
{
    struct vqd_used_elem *u = &vq->used->ring[(uint16_t)(vq->used_idx + vq->used_pending) & (vq->num - 1)];
    u->id = head;   /* §2.7.8: id is the head of the used chain */
    u->len = len;   /* §2.7.8: bytes written into the device-writable part */
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_filled(vq, vq->used_pending, head);
    vq->used_pending++;
}

int vqd_vq_fill(struct vqd_vq *vq, uint32_t head, uint32_t len)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    if (head >= vq->num || vq->used_pending >= vq->num)
        return VQD_E_INVAL;
    int rc;
    GUARDED(rc, (fill(vq, head, len), VQD_OK), rc = fault_broken(vq));
    return rc;
}

/* Publish the pending used elements with one release store of used->idx. */
static inline void flush(struct vqd_vq *vq)
{
    uint16_t old = vq->used_idx, new_idx;
    if (!vq->used_pending)
        return;
    new_idx = (uint16_t)(old + vq->used_pending);
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_pre_publish(vq, vq->used_pending);
    /* §2.7.8 / §2.7.13.4 mirror: elements (and buffer data) before idx. */
    __atomic_store_n(&vq->used->idx, new_idx, __ATOMIC_RELEASE);
    if (UNLIKELY(vq->inflight != NULL))
        vqd_inflight_post_publish(vq, vq->used_pending, new_idx);
    vq->used_idx = new_idx;
    vq->used_pending = 0;
    /* If the index just ran past signalled_used (16-bit wrap), the stored
     * value no longer says anything about [old, new): forget it. */
    if (UNLIKELY((int16_t)(new_idx - vq->signalled_used) < (uint16_t)(new_idx - old)))
        vq->signalled_used_valid = 0;
}

int vqd_vq_flush(struct vqd_vq *vq)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    int n = vq->used_pending, rc;
    GUARDED(rc, (flush(vq), n), rc = fault_broken(vq));
    return rc;
}

static int push(struct vqd_vq *vq, const uint32_t *heads, const uint32_t *lens, int n)
{
    for (int i = 0; i < n; i++)
        fill(vq, heads[i], lens[i]);
    flush(vq);
    return n;
}

int vqd_vq_push(struct vqd_vq *vq, const uint32_t *heads, const uint32_t *lens, int n)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    if (n < 0 || n > (int)vq->num - vq->used_pending)
        return VQD_E_INVAL;
    for (int i = 0; i < n; i++)
        if (heads[i] >= vq->num)
            return VQD_E_INVAL;
    int rc;
    GUARDED(rc, push(vq, heads, lens, n), rc = fault_broken(vq));
    return rc;
}

/* Does the driver want a used buffer notification now? Updates
 * signalled_used. §2.7.10 (no EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT) and
 * §2.7.7.2 / §2.7.10 (EVENT_IDX: used_event). */
static int should_notify(struct vqd_vq *vq)
{
    uint16_t old, new_idx;
    int valid;
    /* used->idx must be visible before we read what the driver asked for. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vq->event_idx)
        return !(__atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
    valid = vq->signalled_used_valid;
    vq->signalled_used_valid = 1;
    old = vq->signalled_used;
    new_idx = vq->signalled_used = vq->used_idx;
    return !valid || vqd_need_event(__atomic_load_n(used_event_ptr(vq), __ATOMIC_RELAXED), new_idx, old);
}

static inline int write_call(struct vqd_vq *vq, uint64_t *now)
{
    uint64_t one = 1;
    if (vq->call_fd >= 0) {
        ssize_t w;
        do
            w = write(vq->call_fd, &one, sizeof(one));
        while (w < 0 && errno == EINTR);
        /* EAGAIN: the counter is saturated, the driver has a call pending. */
    }
    vq->calls++;
    ev_record(vq, VQD_EV_CALL, vq->used_idx, now);
    return 1;
}

/* Call the driver if it wants it, else count (and log) a suppressed call;
 * *now as for ev_record. */
static inline int notify(struct vqd_vq *vq, uint64_t *now)
{
    if (vq->broken)
        return VQD_E_BROKEN;
    if (!should_notify(vq)) {
        vq->calls_suppressed++;
        ev_record(vq, VQD_EV_CALL_SUPPRESSED, vq->used_idx, now);
        return 0;
    }
    return write_call(vq, now);
}

int vqd_vq_should_notify(struct vqd_vq *vq)
{
    int rc;
    GUARDED(rc, should_notify(vq), rc = fault_broken(vq));
    return rc;
}

int vqd_vq_notify(struct vqd_vq *vq)
{
    uint64_t now = 0;
    int rc;
    GUARDED(rc, notify(vq, &now), rc = fault_broken(vq));
    return rc;
}

/* Enable or disable available buffer notifications (kicks), §2.7.10.
 * Without EVENT_IDX: VRING_USED_F_NO_NOTIFY in used->flags. With EVENT_IDX
 * the driver ignores the flags: enabling writes avail_event =
 * last_avail_idx ("kick me for the next buffer"); disabling leaves it stale,
 * so the driver kicks at most once more until the index wraps (as Linux
 * vhost does). After enabling, returns how many entries are already
 * available (the driver may have added them before seeing the change): the
 * caller must service them instead of sleeping. */
static int set_notification(struct vqd_vq *vq, int enable)
{
    vq->notify_enabled = !!enable;
    if (vq->event_idx) {
        if (enable)
            __atomic_store_n(avail_event_ptr(vq), vq->last_avail_idx, __ATOMIC_RELAXED);
    } else {
        uint16_t f = __atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED);
        f = enable ? (f & ~VRING_USED_F_NO_NOTIFY) : (f | VRING_USED_F_NO_NOTIFY);
        __atomic_store_n(&vq->used->flags, f, __ATOMIC_RELAXED);
    }
    if (!enable)
        return 0;
    /* Our write must be visible before we look at avail->idx again. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return avail_count(vq);
}

int vqd_vq_set_notification(struct vqd_vq *vq, int enable)
{
    int rc;
    if (vq->broken)
        return VQD_E_BROKEN;
    GUARDED(rc, set_notification(vq, enable), rc = fault_broken(vq));
    return rc;
}

/* Read the kick eventfd without blocking (the fd must be O_NONBLOCK) and
 * add its counter to kicks (and log a kick event carrying it); returns the
 * count read. */
int vqd_vq_drain_kick(struct vqd_vq *vq)
{
    uint64_t v = 0;
    ssize_t r;
    if (vq->kick_fd < 0)
        return 0;
    do
        r = read(vq->kick_fd, &v, sizeof(v));
    while (r < 0 && errno == EINTR);
    if (r != sizeof(v))
        return 0;
    vq->kicks += v;
    /* An eventfd counter above 2^32 - 1 would need 4 billion unread kicks. */
    uint64_t now = 0;
    ev_record(vq, VQD_EV_KICK, v > UINT32_MAX ? UINT32_MAX : (uint32_t)v, &now);
    return v > INT32_MAX ? INT32_MAX : (int)v;
}

/* ------------------------------------------------------------------------
 * virtio-net (§5.1.6)
 */

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
    int rc = pop_one(rx, e, s->rx_iov, VQD_NET_IOV);
    if (rc == VQD_E_NOSPACE)
        return broken(rx, "receive chain needs more than %d iovecs", VQD_NET_IOV);
    if (rc <= 0)
        return rc;
    /* §5.1.6.3.1: receive buffers are device-writable and hold at least the header. */
    if (UNLIKELY(e->in_len < (uint64_t)hdr_len || e->in_len == 0)) {
        vqd_vq_rewind(rx, 1); /* leave the ring as the driver made it, for inspection */
        return broken(rx, "receive chain of head %u has %llu device-writable bytes, less than the "
                      "%d-byte virtio_net_hdr (VIRTIO 1.2 §5.1.6.3.1)", e->head,
                      (unsigned long long)e->in_len, hdr_len);
    }
    c->iov = s->rx_iov + e->out_num;
    c->n = e->in_num;
    c->i = 0;
    c->off = 0;
    return 1;
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
                fill(rx, e.head, (uint32_t)written);
                nbufs++;
                rc = pop_rx(rx, s, &e, &c, 0);
                if (rc <= 0)
                    goto undo;
                popped++;
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
            fill(rx, e.head, (uint32_t)written);
            nbufs++;
            rc = pop_rx(rx, s, &e, &c, 0);
            if (rc <= 0)
                goto undo;
            popped++;
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
    fill(rx, e.head, (uint32_t)written);
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

/* Publish a queue's pending used elements and notify; *now as for ev_record. */
static inline void flush_notify(struct vqd_vq *vq, int *dirty, uint64_t *now)
{
    if (*dirty) {
        flush(vq);
        notify(vq, now);
        *dirty = 0;
    }
}

/* One more element done in a single-queue burst: publish used->idx every
 * VQD_BURST elements so the driver can reuse buffers before the burst ends. */
static inline void burst_step(struct vqd_vq *vq, int *done)
{
    if ((++*done & (VQD_BURST - 1)) == 0)
        flush(vq);
}

/* End of a single-queue burst: publish and call if anything was used; the
 * burst's status if it failed, else the elements done. */
static inline int burst_end(struct vqd_vq *vq, int *dirty, int status, int done)
{
    uint64_t now = 0;
    flush_notify(vq, dirty, &now);
    return status < 0 ? status : done;
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
        int rc = pop_one(tx, &te, s->tx_iov, VQD_NET_IOV);
        if (UNLIKELY(rc == VQD_E_NOSPACE))
            rc = broken(tx, "transmit chain needs more than %d iovecs", VQD_NET_IOV);
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
        /* §5.1.6.2: each transmit chain is a virtio_net_hdr then the frame,
         * all device-readable. */
        uint64_t frame_len = te.out_len >= (uint64_t)hdr_len ? te.out_len - hdr_len : 0;
        if (UNLIKELY(te.out_len <= (uint64_t)hdr_len)) {
            tx->drops++;
        } else {
            struct cursor src = {s->tx_iov, (int)te.out_num, 0, 0};
            cursor_skip(&src, hdr_len);
            rc = deliver(rx, &src, frame_len, 1, hdr_len, mrg_rxbuf, s);
            if (rc == DELIVER_STARVED) {
                /* Leave the frame on TX until the driver gives RX buffers. */
                vqd_vq_rewind(tx, 1);
                s->rx_starved = 1;
                break;
            }
            if (UNLIKELY(rc < 0)) {
                vqd_vq_rewind(tx, 1);
                status = rc;
                break;
            }
            if (rc == DELIVER_OK) {
                rx_dirty = 1;
                tx->packets++;
                tx->bytes += frame_len;
            }
        }
        fill(tx, te.head, 0); /* §2.7.8: the device wrote nothing into a TX buffer */
        tx_dirty = 1;
        done++;
        if ((done & (VQD_BURST - 1)) == 0) {
            /* Hand buffers back in bursts so the driver can refill while we copy. */
            flush(rx);
            flush(tx);
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

static int net_tap_tx(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget,
                      struct vqd_net_scratch *s)
{
    int done = 0, dirty = 0, status = VQD_OK;
    s->tx_blocked = 0;
    if (tx->broken)
        return VQD_E_BROKEN;
    while (done < budget) {
        struct vqd_elem te;
        int rc = pop_one(tx, &te, s->tx_iov, VQD_NET_IOV);
        if (UNLIKELY(rc == VQD_E_NOSPACE))
            rc = broken(tx, "transmit chain needs more than %d iovecs", VQD_NET_IOV);
        if (rc < 0) {
            status = rc;
            break;
        }
        if (rc == 0)
            break;
        if (te.out_len <= (uint64_t)hdr_len) {
            tx->drops++;
        } else {
            /* Skip the virtio_net_hdr: the tap has no IFF_VNET_HDR. */
            struct cursor src = {s->tx_iov, (int)te.out_num, 0, 0};
            cursor_skip(&src, hdr_len);
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
                break;
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
        fill(tx, te.head, 0);
        dirty = 1;
        burst_step(tx, &done);
    }
    return burst_end(tx, &dirty, status, done);
}

static int net_tap_rx(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                      struct vqd_net_scratch *s)
{
    int done = 0, dirty = 0, status = VQD_OK;
    s->rx_starved = 0;
    if (rx->broken)
        return VQD_E_BROKEN;
    while (done < budget) {
        if (s->pending_len == 0) {
            /* Read from the tap only when RX has a buffer: otherwise the frame
             * stays queued in the kernel (which drops on its own limits). */
            if (rx->shadow_avail_idx == rx->last_avail_idx) {
                int n = avail_count(rx);
                if (n < 0) {
                    status = n;
                    break;
                }
                if (n == 0) {
                    s->rx_starved = 1;
                    break;
                }
            }
            ssize_t r;
            do
                r = read(tap_fd, s->buf, sizeof(s->buf));
            while (r < 0 && errno == EINTR);
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                s->err = errno;
                status = VQD_E_IO;
                break;
            }
            if (r == 0)
                break;
            s->pending_len = (uint32_t)r;
        }
        struct vqd_iov one = {s->buf, s->pending_len};
        struct cursor src = {&one, 1, 0, 0};
        int rc = deliver(rx, &src, s->pending_len, 0, hdr_len, mrg_rxbuf, s);
        if (rc == DELIVER_STARVED) {
            s->rx_starved = 1;
            break;
        }
        if (rc < 0) {
            status = rc;
            break;
        }
        s->pending_len = 0;
        if (rc == DELIVER_OK)
            dirty = 1;
        burst_step(rx, &done);
    }
    return burst_end(rx, &dirty, status, done);
}

/* The exported net paths: one sigsetjmp per burst. A fault marks every
 * queue of the call broken (they share the memory that shrank). */
int vqd_net_loopback(struct vqd_vq *tx, struct vqd_vq *rx, int hdr_len, int mrg_rxbuf,
                     int budget, int spin, struct vqd_net_scratch *s)
{
    int rc;
    GUARDED(rc, net_loopback(tx, rx, hdr_len, mrg_rxbuf, budget, spin, s),
            (fault_broken(tx), rc = fault_broken(rx)));
    return rc;
}

int vqd_net_tap_tx(struct vqd_vq *tx, int tap_fd, int hdr_len, int budget, struct vqd_net_scratch *s)
{
    int rc;
    GUARDED(rc, net_tap_tx(tx, tap_fd, hdr_len, budget, s), rc = fault_broken(tx));
    return rc;
}

int vqd_net_tap_rx(struct vqd_vq *rx, int tap_fd, int hdr_len, int mrg_rxbuf, int budget,
                   struct vqd_net_scratch *s)
{
    int rc;
    GUARDED(rc, net_tap_rx(rx, tap_fd, hdr_len, mrg_rxbuf, budget, s), rc = fault_broken(rx));
    return rc;
}
