/* The SIGBUS guard of every C entry point that touches guest memory.
 *
 * Faults: a front-end may shrink the memory behind a region after
 * SET_MEM_TABLE (ftruncate of its memfd); touching the lost pages raises
 * SIGBUS. vqd_guard_install() installs a process-wide SIGBUS handler (once;
 * faults outside our guarded sections go to the handler that was there
 * before, or the default action). Every exported function that touches guest
 * memory runs its body under VQD_GUARDED below, a thread-local sigsetjmp
 * (one per call, i.e. per burst, not per descriptor): a SIGBUS there jumps
 * back, the queue(s) of the call are marked broken with the faulting
 * guest-physical address (vqd_fault_broken, vqd_vq.c), and the call returns
 * VQD_E_BROKEN; vqd_snapshot_guarded returns the decoder family's
 * VQD_SNAP_E_FAULT. Nothing in a guarded section takes a lock or allocates,
 * so abandoning it is safe; writes it did to the (hostile) ring may be
 * partial.
 */
#ifndef VQD_GUARD_H
#define VQD_GUARD_H

#include <setjmp.h>
#include <stdint.h>
#include "vqd_ring.h"

struct vqd_snap_out; /* vqd_decode.h */

/* CDEF BEGIN */
int vqd_guard_install(void);
uint64_t vqd_guard_fault_addr(void);
int vqd_snapshot_guarded(const struct vqd_region *regions, int nr_regions,
                         const struct vqd_region *valid, int nr_valid,
                         uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t size, int32_t last_avail_idx, uint32_t max_descs,
                         struct vqd_snap_out *out);
/* CDEF END */

/* The innermost armed sigjmp_buf of this thread (NULL: not in a guarded
 * section); vqd_guard.c says why it is initial-exec TLS. */
#define VQD_TLS __attribute__((tls_model("initial-exec")))
extern __thread sigjmp_buf *vqd_guard_env VQD_TLS VQD_INTERNAL;

/* Run `call` (an int expression) into rc with SIGBUS guarded; on a fault run
 * `on_fault` instead (rc is then whatever on_fault sets). Nests. */
#define VQD_GUARDED(rc, call, on_fault)                                      \
    do {                                                                     \
        sigjmp_buf env_;                                                     \
        sigjmp_buf *const prev_ = vqd_guard_env;                             \
        if (sigsetjmp(env_, 0)) {                                            \
            vqd_guard_env = prev_;                                           \
            on_fault;                                                        \
        } else {                                                             \
            vqd_guard_env = &env_;                                           \
            __atomic_signal_fence(__ATOMIC_SEQ_CST);                         \
            (rc) = (call);                                                   \
            __atomic_signal_fence(__ATOMIC_SEQ_CST);                         \
            vqd_guard_env = prev_;                                           \
        }                                                                    \
    } while (0)

#endif
