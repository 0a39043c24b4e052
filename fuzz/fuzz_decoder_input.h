/* What the two decoder harnesses (fuzz/fuzz_decoder.c, split;
 * fuzz/fuzz_decoder_packed.c, packed) share: the header fields at the same
 * offsets in both formats (fuzz_decoder.c's header comment defines them:
 * counts at 1, max_descs at 5-7, area modes at 8, area values at 16,
 * readable regions at 40, validate-only regions at 104, memory from 152),
 * and the checks of the unread-table output. fuzz/fuzz_inputs.py
 * (_memory_and_areas) reads the same fields in Python.
 */
#ifndef FUZZ_DECODER_INPUT_H
#define FUZZ_DECODER_INPUT_H

#include "vqd_decode.h"
#include "fuzz_input.h"

#define DEC_HDR_LEN 152

struct dec_input {
    struct vqd_region regions[4];
    struct vqd_region valid[3];
    int nr, nv;
    uint64_t area[3];
    uint32_t max_descs;
};

/* Read the shared fields of `h`; readable regions are filled from the
 * input's memory bytes into region_buf[0..3]. */
static inline void dec_input_read(struct dec_input *in, const struct hdr *h, const uint8_t *mem,
                                  size_t mem_len, struct tailbuf region_buf[4])
{
    uint8_t counts = HDR_U8(h, 1);
    in->nr = (counts & 7) % 5;
    in->nv = (counts >> 3) & 3;
    in->max_descs = HDR_U16(h, 6);
    if ((HDR_U8(h, 5) & 15) != 5)
        in->max_descs &= 0xff;
    memset(in->regions, 0, sizeof in->regions);
    for (int i = 0; i < in->nr; i++) {
        uint32_t sz = HDR_U32(h, 40 + 16 * i + 8);
        in->regions[i].gpa = HDR_U64(h, 40 + 16 * i);
        /* & 0xfffff when its top byte is 0x5a, & 0xffff when 0xa5, else &
         * 0xfff: regions of 64 KiB and more cost ASan an mmap each */
        in->regions[i].size = (sz >> 24) == 0x5a ? sz & 0xfffff : (sz >> 24) == 0xa5 ? sz & 0xffff : sz & 0xfff;
        in->regions[i].host = fill_region(&region_buf[i], mem, mem_len, HDR_U32(h, 40 + 16 * i + 12),
                                          in->regions[i].size);
    }
    for (int i = 0; i < in->nv; i++) {
        in->valid[i].gpa = HDR_U64(h, 104 + 16 * i);
        in->valid[i].size = HDR_U64(h, 104 + 16 * i + 8);
        in->valid[i].host = NULL;
    }
    for (int a = 0; a < 3; a++) {
        uint8_t mode = HDR_U8(h, 8 + a);
        uint64_t val = HDR_U64(h, 16 + 8 * a);
        if ((mode & 1) || in->nr == 0) {
            in->area[a] = val;
        } else {
            const struct vqd_region *r = &in->regions[(mode >> 1) % in->nr];
            in->area[a] = r->gpa + val % (r->size + 1);
        }
    }
}

static inline int dec_in_valid(const struct dec_input *in, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < in->nv; i++) {
        const struct vqd_region *v = &in->valid[i];
        if (gpa >= v->gpa && gpa - v->gpa < v->size && len <= v->size - (gpa - v->gpa))
            return 1;
    }
    return 0;
}

/* The unread indirect tables: each in validate-only memory, sorted by
 * (addr, len) without duplicates. */
static inline void dec_check_want(const struct vqd_snap_out *o, const struct dec_input *in)
{
    for (uint32_t w = 0; w < o->n_want; w++) {
        FUZZ_CHECK(dec_in_valid(in, o->want_addr[w], o->want_len[w]));
        if (w)
            FUZZ_CHECK(o->want_addr[w - 1] < o->want_addr[w]
                       || (o->want_addr[w - 1] == o->want_addr[w] && o->want_len[w - 1] < o->want_len[w]));
    }
}

/* Counts within their capacities; chains tiling the listed descriptors in
 * order, none an indirect descriptor, with their byte totals. */
static inline void dec_check_chains(const struct vqd_snap_out *o, uint32_t size, uint32_t max_descs)
{
    FUZZ_CHECK(o->n_chains <= size);
    FUZZ_CHECK(o->n_descs <= max_descs);
    FUZZ_CHECK(o->n_anomalies <= o->anomaly_cap);
    FUZZ_CHECK(o->n_want <= size);
    uint32_t next = 0;
    for (uint32_t k = 0; k < o->n_chains; k++) {
        FUZZ_CHECK(o->chain_first[k] == next);
        /* the direct part (< size) plus one indirect table (<= 32768) */
        FUZZ_CHECK(o->chain_ndescs[k] <= size + 32768);
        uint64_t out = 0, in = 0;
        for (uint32_t d = next; d < next + o->chain_ndescs[k]; d++) {
            FUZZ_CHECK(!(o->desc_flags[d] & VRING_DESC_F_INDIRECT));
            if (o->desc_flags[d] & VRING_DESC_F_WRITE)
                in += o->desc_len[d];
            else
                out += o->desc_len[d];
        }
        FUZZ_CHECK(out == o->chain_out_bytes[k] && in == o->chain_in_bytes[k]);
        next += o->chain_ndescs[k];
    }
    FUZZ_CHECK(next == o->n_descs);
}

/* One detail string: NUL-terminated printable ASCII. */
static inline void dec_check_detail(const struct vqd_anomaly *an)
{
    size_t len = strnlen(an->detail, VQD_SNAP_DETAIL_LEN);
    FUZZ_CHECK(len > 0 && len < VQD_SNAP_DETAIL_LEN);
    for (size_t c = 0; c < len; c++)
        FUZZ_CHECK(an->detail[c] >= 0x20 && an->detail[c] < 0x7f);
}

/* The chain and descriptor arrays of *o, each of exactly its documented
 * capacity for `cs` chains and `dcap` descriptors, ending where its
 * allocation ends (out_buf[0..12)). */
static inline void dec_out_arrays(struct vqd_snap_out *o, struct tailbuf out_buf[12], size_t cs,
                                  uint32_t max_descs, uint32_t acap)
{
    size_t dcap = max_descs ? max_descs : 1;
    o->chain_head = tail(&out_buf[0], 4 * cs);
    o->chain_first = tail(&out_buf[1], 4 * cs);
    o->chain_ndescs = tail(&out_buf[2], 4 * cs);
    o->chain_out_bytes = tail(&out_buf[3], 8 * cs);
    o->chain_in_bytes = tail(&out_buf[4], 8 * cs);
    o->desc_cap = max_descs;
    o->desc_addr = tail(&out_buf[5], 8 * dcap);
    o->desc_len = tail(&out_buf[6], 4 * dcap);
    o->desc_flags = tail(&out_buf[7], 2 * dcap);
    o->desc_next = tail(&out_buf[8], 2 * dcap);
    o->anomaly_cap = acap;
    o->anomalies = tail(&out_buf[9], sizeof(struct vqd_anomaly) * (size_t)acap);
    o->want_cap = (uint32_t)cs;
    o->want_addr = tail(&out_buf[10], 8 * cs);
    o->want_len = tail(&out_buf[11], 4 * cs);
}

#endif
