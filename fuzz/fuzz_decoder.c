/* libFuzzer harness of the split-ring snapshot decoder
 * (inspector/csrc/vqd_decode.c, vqd_snapshot) over random ring memory.
 *
 * Build (make fuzz does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *         -Iinspector/csrc fuzz/fuzz_decoder.c inspector/csrc/vqd_decode.c -o build/fuzz/fuzz_decoder
 *
 * Input: a fixed header of DEC_HDR_LEN bytes (missing bytes read as 0), then
 * guest memory bytes. Little-endian fields; fuzz/fuzz_inputs.py
 * (decoder_case) reads the same format to replay an input through the Python
 * wrapper inspector.ring.decoder and the reference inspector.ring.reference.
 *
 *   0  u8   size_code   size = 1 << exp, exp = (size_code & 7), plus 8 when
 *                       (size_code & 0xf8) == 0x88 (big queues are slow to
 *                       allocate); or the raw u32 at 12 when (size_code & 0x70) == 0x70
 *   1  u8   counts      readable regions = (counts & 7) % 5 (0..4),
 *                       validate-only regions = (counts >> 3) & 3 (0..3)
 *   2  u16  last_avail_idx
 *   4  u8   lflags      bit 0: last_avail_idx unknown (-1)
 *   5  u8   max_code    (max_code & 15) == 5: max_descs = the u16 at 6, else (u16 at 6) & 0xff
 *   6  u16  max_descs
 *   8  u8   area_mode[3] (desc, avail, used): bit 0 raw gpa = area_val; else
 *                       gpa = readable[(mode >> 1) % nr].gpa + area_val % (that size + 1)
 *  12  u32  raw_size
 *  16  u64  area_val[3]
 *  40  readable[4]: u64 gpa, u32 size (& 0xfffff when its top byte is 0x5a,
 *                   & 0xffff when it is 0xa5, else & 0xfff: regions of 64 KiB
 *                   and more cost ASan an mmap each), u32 mem_off
 * 104  valid[3]:    u64 gpa, u64 size (host NULL: validate-only)
 * 152  guest memory bytes (region i is filled from mem_off, repeating)
 *
 * Beyond "no sanitizer report", it checks the output contract of
 * vqd_decode.h: counts within their capacities, chains tiling the listed
 * descriptors in order, byte totals equal to the listed lengths, anomaly
 * kinds known and details NUL-terminated printable ASCII, an anomaly's head
 * VQD_NO_HEAD exactly for the kinds not found inside a chain's walk and
 * otherwise the head of a walked chain, want tables
 * sorted without duplicates and each one in validate-only memory.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vqd_decode.h"
#include "fuzz_decoder_input.h"

/* A smaller quarantine than ASan's 256 MB and no fill of new allocations:
 * each input does not fault in fresh pages (use-after-free is still caught
 * within an input; ASan never reported uninitialised reads anyway). */
const char *__asan_default_options(void)
{
    return "quarantine_size_mb=4:max_malloc_fill_size=0:allocator_release_to_os_interval_ms=-1";
}
#define DEC_NR_KINDS 12

static void check_output(const struct vqd_snap_out *o, uint32_t size, uint32_t max_descs,
                         const struct dec_input *in)
{
    dec_check_chains(o, size, max_descs);
    static uint8_t walked[VQD_MAX_QUEUE_SIZE / 8];  /* bit h: a chain of head h < size was walked */
    memset(walked, 0, sizeof walked);
    for (uint32_t k = 0; k < o->n_chains; k++)
        if (o->chain_head[k] < size)
            walked[o->chain_head[k] / 8] |= 1u << (o->chain_head[k] % 8);
    for (uint32_t a = 0; a < o->n_anomalies; a++) {
        const struct vqd_anomaly *an = &o->anomalies[a];
        FUZZ_CHECK(an->kind < DEC_NR_KINDS);
        int chainless = an->kind == VQD_A_AVAIL_IDX_JUMP || an->kind == VQD_A_HEAD_OUT_OF_RANGE
                        || an->kind == VQD_A_TRUNCATED;
        if (chainless)
            FUZZ_CHECK(an->head == VQD_NO_HEAD);
        else
            FUZZ_CHECK(an->head >= 0 && (uint32_t)an->head < size
                       && (walked[an->head / 8] >> (an->head % 8) & 1));
        dec_check_detail(an);
    }
    dec_check_want(o, in);
}

static struct tailbuf region_buf[4], out_buf[14];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    struct hdr h;
    hdr_init(&h, data, n, DEC_HDR_LEN);
    const uint8_t *mem = n > DEC_HDR_LEN ? data + DEC_HDR_LEN : NULL;
    size_t mem_len = n > DEC_HDR_LEN ? n - DEC_HDR_LEN : 0;

    uint8_t size_code = HDR_U8(&h, 0);
    uint32_t size;
    if ((size_code & 0x70) == 0x70) {
        size = HDR_U32(&h, 12);
    } else {
        /* queues above 128 are slow to allocate: 1 input in 32 */
        unsigned exp = (size_code & 7) + ((size_code & 0xf8) == 0x88 ? 8 : 0);
        size = 1u << exp;
    }
    struct dec_input in;
    dec_input_read(&in, &h, mem, mem_len, region_buf);
    int32_t last = (HDR_U8(&h, 4) & 1) ? -1 : (int32_t)HDR_U16(&h, 2);
    uint32_t max_descs = in.max_descs;

    /* Output arrays of exactly the documented capacities (vqd_decode.h),
     * each ending where its allocation ends so that ASan sees any overrun.
     * Sizes the decoder refuses get small arrays: it must return before
     * using them. */
    int size_ok = size && size <= VQD_MAX_QUEUE_SIZE && !(size & (size - 1));
    size_t cs = size_ok ? size : 1;
    uint32_t acap = vqd_snapshot_anomaly_cap((uint32_t)cs, max_descs);
    struct vqd_snap_out o;
    memset(&o, 0, sizeof o);
    o.avail_ring = tail(&out_buf[12], 2 * cs);
    o.used_ring = tail(&out_buf[13], 8 * cs);
    dec_out_arrays(&o, out_buf, cs, max_descs, acap);

    int rc = vqd_snapshot(in.regions, in.nr, in.valid, in.nv, in.area[0], in.area[1], in.area[2], size,
                          last, max_descs, &o);
    if (!size_ok)
        FUZZ_CHECK(rc == VQD_SNAP_E_SIZE);
    FUZZ_CHECK(rc >= VQD_SNAP_OK && rc <= VQD_SNAP_E_ARG);
    if (rc == VQD_SNAP_OK)
        check_output(&o, size, max_descs, &in);
    /* FUZZ_PRINT=1: one summary line per input, which
     * tests/unit/test_fuzz_smoke.py compares with the Python wrapper's result for
     * the same input (fuzz/fuzz_inputs.py reads the format the same way). */
    static int print = -1;
    if (print < 0)
        print = getenv("FUZZ_PRINT") != NULL;
    if (print)
        fprintf(stderr, "vqd_snapshot rc=%d chains=%u descs=%u anomalies=%u want=%u\n", rc,
               rc ? 0 : o.n_chains, rc ? 0 : o.n_descs, rc ? 0 : o.n_anomalies, rc ? 0 : o.n_want);

    return 0;
}
