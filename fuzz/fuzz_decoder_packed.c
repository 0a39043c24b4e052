/* libFuzzer harness of the packed-ring snapshot decoder
 * (inspector/csrc/vqd_decode_packed.c, vqd_snapshot_packed) over random ring
 * memory and random device positions.
 *
 * Build (make fuzz-build does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *         -Iinspector/csrc fuzz/fuzz_decoder_packed.c inspector/csrc/vqd_decode_packed.c \
 *         inspector/csrc/vqd_decode_walk.c inspector/csrc/vqd_guard.c -o build/fuzz/fuzz_decoder_packed
 *
 * Input: the header of fuzz_decoder.c (regions, areas, max_descs at the same
 * offsets; fuzz/fuzz_inputs.py packed_case reads it the same way) with these
 * bytes read differently:
 *
 *   0  u8   size_code   (size_code & 0xc0) == 0xc0: size = the raw u16 at 12 (may be
 *                       invalid: 0 or > 32768); 0x80: size = (u16 at 12 & 0x7fff) + 1;
 *                       else size = (size_code & 0x3f) + 1 (1..64: any, not only powers of two)
 *   2  u16  next_used
 *   4  u8   pflags      bit 0 next_used given, 1 used_wrap_counter given (value bit 4),
 *                       2 last_avail_idx given, 3 last_avail_wrap_counter given (value
 *                       bit 5), 6: positions raw (else taken mod size)
 *  12  u16  size_raw
 *  14  u16  last_avail_idx
 *
 * Beyond "no sanitizer report", it checks the output contract: counts within
 * their capacities, chains tiling the listed descriptors with their byte
 * totals, chains at distinct slots, positions inside the ring, anomaly kinds
 * known with printable details and heads that are a chain's first slot (or
 * VQD_NO_HEAD for the kinds found outside a chain's walk), want tables sorted
 * and in validate-only memory.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vqd_decode_packed.h"
#include "fuzz_decoder_input.h"
#define NR_KINDS 16

const char *__asan_default_options(void)
{
    return "quarantine_size_mb=4:max_malloc_fill_size=0:allocator_release_to_os_interval_ms=-1";
}

static void check_output(const struct vqd_snap_out *o, const struct vqd_packed_out *p, uint32_t size,
                         uint32_t max_descs, const struct dec_input *in)
{
    dec_check_chains(o, size, max_descs);
    FUZZ_CHECK(p->positions <= VQD_POS_FLAGS);
    FUZZ_CHECK(p->next_avail < size && p->next_used < size);
    FUZZ_CHECK(p->avail_wrap_counter <= 1 && p->used_wrap_counter <= 1);
    FUZZ_CHECK((p->last_avail_idx == -1) == (p->last_avail_wrap_counter == -1));
    FUZZ_CHECK(p->last_avail_idx < (int32_t)size && p->last_avail_wrap_counter <= 1);
    if (p->positions == VQD_POS_FLAGS)
        FUZZ_CHECK(p->last_avail_idx == -1);
    static uint8_t seen[VQD_MAX_QUEUE_SIZE / 8];  /* bit s: a chain starts at slot s */
    memset(seen, 0, (size + 7) / 8);
    for (uint32_t k = 0; k < o->n_chains; k++) {
        uint32_t s = p->chain_slot[k];
        FUZZ_CHECK(s < size && !(seen[s / 8] >> (s % 8) & 1));
        seen[s / 8] |= 1u << (s % 8);
    }
    for (uint32_t a = 0; a < o->n_anomalies; a++) {
        const struct vqd_anomaly *an = &o->anomalies[a];
        FUZZ_CHECK(an->kind < NR_KINDS);
        /* split-only kinds never come from the packed walk */
        FUZZ_CHECK(an->kind != VQD_A_AVAIL_IDX_JUMP && an->kind != VQD_A_HEAD_OUT_OF_RANGE
                   && an->kind != VQD_A_NEXT_OUT_OF_RANGE && an->kind != VQD_A_LOOP);
        if (an->kind == VQD_A_TRUNCATED || an->kind == VQD_A_USED_NOT_AVAILABLE)
            FUZZ_CHECK(an->head == VQD_NO_HEAD);
        else if (an->head != VQD_NO_HEAD || an->kind != VQD_A_AVAIL_USED_PATTERN)
            FUZZ_CHECK(an->head >= 0 && (uint32_t)an->head < size
                       && (seen[an->head / 8] >> (an->head % 8) & 1));
        dec_check_detail(an);
    }
    dec_check_want(o, in);
}

static struct tailbuf region_buf[4], out_buf[15];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    struct hdr h;
    hdr_init(&h, data, n, DEC_HDR_LEN);
    const uint8_t *mem = n > DEC_HDR_LEN ? data + DEC_HDR_LEN : NULL;
    size_t mem_len = n > DEC_HDR_LEN ? n - DEC_HDR_LEN : 0;

    uint8_t size_code = HDR_U8(&h, 0);
    uint32_t size;
    if ((size_code & 0xc0) == 0xc0)
        size = HDR_U16(&h, 12);
    else if (size_code & 0x80)
        size = (HDR_U16(&h, 12) & 0x7fff) + 1u;
    else
        size = (size_code & 0x3f) + 1u;
    struct dec_input in;
    dec_input_read(&in, &h, mem, mem_len, region_buf);
    uint8_t pf = HDR_U8(&h, 4);
    int size_ok = size && size <= VQD_MAX_QUEUE_SIZE;
    uint32_t msize = size_ok ? size : 1;
    int32_t nu = HDR_U16(&h, 2), la = HDR_U16(&h, 14);
    if (!(pf & 0x40)) {
        nu %= (int32_t)msize;
        la %= (int32_t)msize;
    }
    int32_t next_used = (pf & 1) ? nu : -1, uw = (pf & 2) ? (pf >> 4 & 1) : -1;
    int32_t last = (pf & 4) ? la : -1, law = (pf & 8) ? (pf >> 5 & 1) : -1;
    uint32_t max_descs = in.max_descs;

    size_t cs = msize;
    uint32_t acap = vqd_snapshot_packed_anomaly_cap((uint32_t)cs, max_descs);
    struct vqd_snap_out o;
    struct vqd_packed_out p;
    memset(&o, 0, sizeof o);
    memset(&p, 0, sizeof p);
    dec_out_arrays(&o, out_buf, cs, max_descs, acap);
    p.ring_flags = tail(&out_buf[12], 2 * cs);
    p.ring_id = tail(&out_buf[13], 2 * cs);
    p.chain_slot = tail(&out_buf[14], 4 * cs);

    int rc = vqd_snapshot_packed(in.regions, in.nr, in.valid, in.nv, in.area[0], in.area[1], in.area[2],
                                 size, next_used,
                                 uw, last, law, max_descs, &o, &p);
    if (!size_ok)
        FUZZ_CHECK(rc == VQD_SNAP_E_SIZE);
    FUZZ_CHECK(rc >= VQD_SNAP_OK && rc <= VQD_SNAP_E_ARG && rc != VQD_SNAP_E_NOSPACE);
    if (rc == VQD_SNAP_OK)
        check_output(&o, &p, size, max_descs, &in);
    static int print = -1;
    if (print < 0)
        print = getenv("FUZZ_PRINT") != NULL;
    if (print)
        fprintf(stderr, "vqd_snapshot_packed rc=%d chains=%u descs=%u anomalies=%u want=%u\n", rc,
                rc ? 0 : o.n_chains, rc ? 0 : o.n_descs, rc ? 0 : o.n_anomalies, rc ? 0 : o.n_want);
    return 0;
}
