/* Shared helpers of the libFuzzer harnesses (fuzz/fuzz_decoder.c,
 * fuzz/fuzz_datapath.c): a little-endian reader over the input's fixed-size
 * header (bytes past the input's end read as 0, so every input is a valid
 * header) and the guest memory buffers a region is backed by.
 *
 * Each readable region is its own allocation, ending where the region ends,
 * so that AddressSanitizer reports any access past a region's end (the
 * property vqd_gpa_to_host / find_region must hold). The buffer is filled by
 * repeating the input's memory bytes from an offset: a small input can back
 * a large queue, and rings that repeat are a cheap source of loops.
 * fuzz/fuzz_inputs.py reads the same format in Python.
 */
#ifndef FUZZ_INPUT_H
#define FUZZ_INPUT_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Abort with a message: an invariant of the code under test is broken.
 * libFuzzer saves the input as a crash file. */
#define FUZZ_CHECK(cond)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                            \
        }                                                                       \
    } while (0)

/* The header: the input's first bytes, zero-padded to a fixed length (at
 * most HDR_MAX). Fields are read little-endian. */
#define HDR_MAX 256
struct hdr {
    uint8_t b[HDR_MAX];
};

static inline void hdr_init(struct hdr *h, const uint8_t *data, size_t n, size_t hdr_len)
{
    memset(h->b, 0, sizeof h->b);
    memcpy(h->b, data, n < hdr_len ? n : hdr_len);
}

static inline uint64_t hdr_le(const struct hdr *h, size_t off, int bytes)
{
    uint64_t v = 0;
    memcpy(&v, h->b + off, bytes); /* little-endian hosts (vqd_ring.h) */
    return v;
}

#define HDR_U8(h, off) ((uint8_t)hdr_le((h), (off), 1))
#define HDR_U16(h, off) ((uint16_t)hdr_le((h), (off), 2))
#define HDR_U32(h, off) ((uint32_t)hdr_le((h), (off), 4))
#define HDR_U64(h, off) (hdr_le((h), (off), 8))

/* A reusable allocation: tail() hands out `bytes` that end exactly where
 * the allocation ends, so ASan still reports any access past them, without
 * a malloc and free per input (large ones cost ASan an mmap, munmap and page
 * faults each: most of an execution's time). The allocation grows to the
 * largest size asked for. Accesses before the start are not caught; the
 * code under test indexes forward from the start of each array. */
struct tailbuf {
    uint8_t *p;
    size_t cap;
};

static inline void *tail(struct tailbuf *t, size_t bytes)
{
    if (bytes > t->cap || !t->p) {
        /* a multiple of 16, so that `bytes` a multiple of 16 start 16-aligned */
        size_t cap = (bytes + 15) & ~(size_t)15;
        free(t->p);
        t->p = aligned_alloc(16, cap ? cap : 16);
        if (!t->p)
            abort();
        t->cap = cap ? cap : 16;
    }
    return t->p + (t->cap - bytes);
}

/* `size` bytes from t: mem[(off + k) % len] for k < size (zeros when the
 * input has no memory bytes). */
static inline uint8_t *fill_region(struct tailbuf *t, const uint8_t *mem, size_t len, uint64_t off,
                                   uint64_t size)
{
    uint8_t *b = tail(t, size);
    if (!len) {
        memset(b, 0, size);
        return b;
    }
    /* one period from off, then double it (whole periods) */
    uint64_t o = off % len, k = len - o < size ? len - o : size;
    memcpy(b, mem + o, k);
    if (k < size) {
        uint64_t first = o < size - k ? o : size - k;
        memcpy(b + k, mem, first);
        k += first;
    }
    while (k < size) {
        uint64_t chunk = k < size - k ? k : size - k;
        memcpy(b + k, b, chunk);
        k += chunk;
    }
    return b;
}

#endif
