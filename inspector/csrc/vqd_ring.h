/* Split virtqueue structures (VIRTIO 1.2 §2.7) and the region table shared by
 * the decoder (vqd_decode.c) and the back-end data path (vqd_vq.c, vqd_net.c,
 * vqd_inflight.c), and the compiler hints every C file uses.
 * All ring fields are little-endian; vqscope runs on little-endian hosts
 * (x86-64, arm64), so fields are read as native integers.
 */
#ifndef VQD_RING_H
#define VQD_RING_H

#include <stdint.h>
#include <stddef.h>

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1
#define VQD_MAX_QUEUE_SIZE 32768

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
/* A function or variable shared between the C files but not exported from
 * the module (not in any CDEF block either). */
#define VQD_INTERNAL __attribute__((visibility("hidden")))

struct vqd_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vqd_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* [num], then used_event */
};

struct vqd_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vqd_used {
    uint16_t flags;
    uint16_t idx;
    struct vqd_used_elem ring[]; /* [num], then avail_event */
};

/* CDEF BEGIN */
/* One guest memory region: guest-physical [gpa, gpa + size) is readable at
 * host address host. Tables are small; lookups are linear. */
struct vqd_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};
/* CDEF END */

/* Host pointer to [gpa, gpa + len) if the whole range lies inside one region,
 * NULL otherwise (overflow-checked). */
static inline uint8_t *vqd_gpa_to_host(const struct vqd_region *r, int nr, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < nr; i++) {
        if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size) {
            uint64_t off = gpa - r[i].gpa;
            if (len > r[i].size - off)
                return NULL;
            return r[i].host + off;
        }
    }
    return NULL;
}

#endif
