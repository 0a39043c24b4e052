/* libFuzzer harness of virtio-blk's data path (inspector/csrc/vqd_blk.c over
 * vqd_vq.c / vqd_pvq.c) over random ring memory: one requestq, split (§2.7)
 * or packed (§2.8), whose descriptors, headers, data, DISCARD/WRITE_ZEROES
 * segments and status bytes come from the input, served against a 64 KiB
 * memfd disk (no FALLOC_FL_ZERO_RANGE there: the zero-write fallback runs
 * too) by io_uring or the synchronous engine, with the hold-io fault toggled
 * between passes.
 *
 * Build (make fuzz-build does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *         -Iinspector/csrc fuzz/fuzz_blk.c inspector/csrc/vqd_*.c -o build/fuzz/fuzz_blk -luring
 *
 * Input: a header of BLK_HDR_LEN bytes (missing bytes read as 0), then guest
 * memory bytes; little-endian fields.
 *
 *   0  u8   size_code   queue size 1 << (v % 9) (packed: minus (v >> 4) % size)
 *   1  u8   flags       bit 0: EVENT_IDX; 1: read-only disk; 2: sync engine;
 *                       3: hold-io on for the first passes; 4: drain completes
 *                       (else drops); 5: fold descriptors into the region
 *                       (addr % region size, len % 8 KiB); 6: writethrough;
 *                       7: packed ring
 *   2  u8   seg_max     v % 8 + 1
 *   3  u8   dwz         max_discard_seg v % 4 + 1, max_write_zeroes_seg (v >> 2) % 4 + 1
 *   4  u16  size_max    (0: none)
 *   6  u16  last_avail_idx (packed: slot, bit 15 the wrap counter)
 *   8  u8   depth       v % 32 + 1
 *   9  u8   passes      v % 8 + 1
 *  10  u16  max discard / write-zeroes sectors (each)
 *  12  u32  region size & 0x1fff0 (at least the ring), mem offset at 16
 *  32  guest memory bytes (the region filled from the offset, repeating)
 *
 * Checked beyond the sanitizers: used_pending never exceeds the queue
 * size; a broken queue has a non-empty reason and stays broken; after a
 * drain nothing is in flight (completed, or dropped); statuses counted never exceed
 * the requests completed; in_flight never exceeds depth.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vqd_vq.h"
#include "vqd_pvq.h"
#include "vqd_blk.h"
#include "vqd_blk_spec.h"
#include "vqd_ring.h"
#include "fuzz_input.h"

#define BLK_HDR_LEN 32
#define DISK_SIZE 65536

const char *__asan_default_options(void)
{
    return "quarantine_size_mb=4:max_malloc_fill_size=0:allocator_release_to_os_interval_ms=-1";
}

static struct tailbuf region_buf;
static struct vqd_pused pused[256];
static struct vqd_vq vq;
static struct vqd_blk_disk disk;

static void check(const struct vqd_blk_queue *q, uint32_t depth)
{
    const struct vqd_blk_counters *c = vqd_blk_counters(q);
    FUZZ_CHECK(vq.used_pending <= vq.num);
    FUZZ_CHECK(c->in_flight <= depth);
    FUZZ_CHECK(c->status[0] + c->status[1] + c->status[2] <= c->completed);
    if (vq.broken) {
        size_t n = strnlen(vq.reason, sizeof vq.reason);
        FUZZ_CHECK(n > 0 && n < sizeof vq.reason);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    static int disk_fd = -1;
    if (disk_fd < 0) {
        disk_fd = memfd_create("fuzz-blk", MFD_CLOEXEC);
        if (disk_fd < 0 || ftruncate(disk_fd, DISK_SIZE) < 0)
            abort();
    }
    struct hdr h;
    hdr_init(&h, data, n, BLK_HDR_LEN);
    const uint8_t *mem = n > BLK_HDR_LEN ? data + BLK_HDR_LEN : NULL;
    size_t mem_len = n > BLK_HDR_LEN ? n - BLK_HDR_LEN : 0;

    uint8_t flags = HDR_U8(&h, 1);
    int packed = !!(flags & 128);
    uint32_t num = 1u << (HDR_U8(&h, 0) % 9);
    if (packed)
        num -= (HDR_U8(&h, 0) >> 4) % num;
    uint64_t ring = packed ? 16 * (uint64_t)num + 8 : 16 * (uint64_t)num + 6 + 2 * num + 2 + 6 + 8 * num + 8;
    uint64_t size = HDR_U32(&h, 12) & 0x1fff0;
    if (size < ring + 64)
        size = (ring + 64 + 15) & ~(uint64_t)15;
    struct vqd_region region = {.gpa = 0, .size = size};
    region.host = fill_region(&region_buf, mem, mem_len, HDR_U32(&h, 16), size);

    if (flags & 32) {   /* descriptors into the region: more requests reach the checks */
        for (uint32_t i = 0; i < num; i++) {
            uint8_t *d = region.host + 16 * i;
            uint64_t addr;
            uint32_t len;
            memcpy(&addr, d, 8);
            memcpy(&len, d + 8, 4);
            addr %= size;
            len %= 8192;
            memcpy(d, &addr, 8);
            memcpy(d + 8, &len, 4);
        }
    }
    int rc;
    uint16_t base = HDR_U16(&h, 6);
    uint8_t *desc = region.host;
    if (packed) {
        uint16_t slot = (uint16_t)((base & 0x7fff) % num);
        rc = vqd_pvq_init(&vq, num, desc, desc + 16 * num, desc + 16 * num + 4, pused, &region, 1, slot,
                          base >> 15, slot, base >> 15, flags & 1, -1, -1);
    } else {
        uint8_t *avail = desc + 16 * num;
        uint8_t *used = region.host + ((16 * num + 6 + 2 * num + 3) & ~(uint64_t)3);
        rc = vqd_vq_init(&vq, num, desc, avail, used, &region, 1, base, flags & 1, -1, -1);
    }
    FUZZ_CHECK(rc == VQD_OK);

    memset(&disk, 0, sizeof disk);
    disk.fd = disk_fd;
    disk.readonly = !!(flags & 2);
    disk.writeback = !(flags & 64);
    disk.blk_size = VIRTIO_BLK_SECTOR_SIZE;
    disk.capacity = DISK_SIZE / VIRTIO_BLK_SECTOR_SIZE;
    disk.seg_max = HDR_U8(&h, 2) % 8 + 1;
    disk.size_max = HDR_U16(&h, 4);
    disk.max_discard_seg = HDR_U8(&h, 3) % 4 + 1;
    disk.max_write_zeroes_seg = (HDR_U8(&h, 3) >> 2) % 4 + 1;
    disk.max_discard_sectors = disk.max_write_zeroes_sectors = HDR_U16(&h, 10);
    memcpy(disk.serial, "fuzz", 4);

    uint32_t depth = HDR_U8(&h, 8) % 32 + 1;
    struct vqd_blk_queue *q;
    rc = vqd_blk_queue_new(&vq, &disk, depth, flags & 4 ? VQD_BLK_ENGINE_SYNC : VQD_BLK_ENGINE_AUTO, &q);
    FUZZ_CHECK(rc == VQD_OK);
    if (depth > num)
        depth = num;
    int passes = HDR_U8(&h, 9) % 8 + 1;
    if (flags & 8)
        vqd_blk_set_hold(q, 1);
    for (int i = 0; i < passes; i++) {
        int was = vq.broken;
        FUZZ_CHECK(vqd_blk_run(q, -1, 0) >= 0);
        FUZZ_CHECK(!was || vq.broken);
        check(q, depth);
        if (i == passes / 2)
            vqd_blk_set_hold(q, 0);
    }
    int complete = !!(flags & 16);
    vqd_blk_drain(q, complete);
    check(q, depth);
    FUZZ_CHECK(vqd_blk_counters(q)->in_flight == 0);   /* completed or dropped, all */
    vqd_blk_queue_free(q);
    return 0;
}
