/* The SIGBUS guard (see vqd_guard.h, "Faults"): the process-wide handler,
 * its installation, the address of the last guarded fault, and the guarded
 * wrapper of the snapshot decoder (vqd_decode.c).
 *
 * Spec: none of its own. It keeps the hostile-memory rule of every other
 * file (VIRTIO 1.2 §2.7: guest memory is the driver's; here, memory the
 * vhost-user front-end shrank after SET_MEM_TABLE) from killing the process.
 *
 * Guards: this file is the guard. The handler is async-signal-safe: it
 * reads initial-exec TLS only, and jumps out or chains; everything it
 * abandons (a VQD_GUARDED section) takes no lock and allocates nothing.
 *
 * vqd_guard_env is the innermost armed sigjmp_buf of this thread (NULL: not
 * in a guarded section); guard_addr the si_addr of its last guarded fault.
 * They are initial-exec TLS so that the handler reads them without
 * __tls_get_addr (which may allocate for a dlopen'ed module: not
 * async-signal-safe). sigsetjmp does not save the signal mask (no syscall per
 * burst): the handler runs with SA_NODEFER, so SIGBUS is never left blocked
 * when it jumps out.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

#include "vqd_guard.h"
#include "vqd_decode.h"

_Static_assert(VQD_SNAP_E_FAULT > VQD_SNAP_E_ARG, "VQD_SNAP_E_FAULT follows the decoder's own statuses");

__thread sigjmp_buf *vqd_guard_env VQD_TLS;
static __thread uintptr_t guard_addr VQD_TLS;
static struct sigaction guard_prev; /* the SIGBUS action before ours */
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;

static void guard_handler(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *env = vqd_guard_env;
    if (env && si->si_code > 0) {
        /* A fault of this thread inside a guarded section (si_code > 0: the
         * kernel's, not a kill(2)): abandon the section. */
        vqd_guard_env = NULL;
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

/* vqd_snapshot (vqd_decode.h) under the guard: its VQD_SNAP_* status, or
 * VQD_SNAP_E_FAULT when the memory faulted (vqd_guard_fault_addr() says
 * where; the output is then partial and must not be used). */
int vqd_snapshot_guarded(const struct vqd_region *regions, int nr_regions,
                         const struct vqd_region *valid, int nr_valid,
                         uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t size, int32_t last_avail_idx, uint32_t max_descs,
                         struct vqd_snap_out *out)
{
    int rc;
    /* A handler installed since (faulthandler, a host program's own) would
     * take the fault instead of the guard: put ours back on top first (one
     * sigaction look-up when it still is; chained to for other faults). */
    vqd_guard_install();
    VQD_GUARDED(rc, vqd_snapshot(regions, nr_regions, valid, nr_valid, desc, avail, used, size,
                                 last_avail_idx, max_descs, out),
                rc = VQD_SNAP_E_FAULT);
    return rc;
}
