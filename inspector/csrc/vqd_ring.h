/* Split (VIRTIO 1.2 §2.7) and packed (§2.8) virtqueue structures, the packed
 * position arithmetic, and the region table shared by
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

/* Packed rings (§2.8.13; inspector/spec/virtio.py has the same numbers). */
#define VIRTQ_DESC_F_AVAIL (1 << 7)
#define VIRTQ_DESC_F_USED (1 << 15)
#define RING_EVENT_FLAGS_ENABLE 0x0
#define RING_EVENT_FLAGS_DISABLE 0x1
#define RING_EVENT_FLAGS_DESC 0x2   /* only with VIRTIO_RING_F_EVENT_IDX */
#define RING_EVENT_WRAP_SHIFT 15
#define RING_EVENT_OFF_MASK 0x7FFF

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
/* A function or variable shared between the C files but not exported from
 * the module (not in any CDEF block either). */
#define VQD_INTERNAL __attribute__((visibility("hidden")))

/* A spin-wait hint (the net paths and the blk load engine poll rings). */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

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

/* §2.8.13 struct pvirtq_desc: a packed ring's descriptor. */
struct vqd_pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

/* §2.8.13 struct pvirtq_event_suppr: desc = off (bits 0-14) | wrap (bit 15);
 * flags = RING_EVENT_FLAGS_* (bits 0-1). */
struct vqd_pevent {
    uint16_t off_wrap;
    uint16_t flags;
};

/* A position in a packed ring, (slot, wrap counter), as a counter in
 * [0, 2 * size): slot + size * (1 - wrap) (§2.8.1: the wrap counter starts
 * at 1 at slot 0). The C twin of inspector/ring/packed.py's packed_counter;
 * distances between counters are (to - from) mod 2 * size. */
static inline uint32_t vqd_packed_counter(uint32_t slot, int wrap, uint32_t size)
{
    return slot + (wrap ? 0 : size);
}

static inline uint32_t vqd_packed_distance(uint32_t from, uint32_t to, uint32_t size)
{
    return (to + 2 * size - from) % (2 * size);
}

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
