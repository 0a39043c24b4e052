/* Packed-ring snapshot decoder (VIRTIO 1.2 §2.8): reads one packed queue
 * from guest memory through the region tables of the split decoder
 * (vqd_decode.h: readable vs validate-only regions, indirect tables not read
 * listed in want_addr/want_len) and walks the chains the driver made
 * available and the device has not taken.
 *
 * Output: the chain, descriptor, anomaly and want arrays of a struct
 * vqd_snap_out (desc_next holds each descriptor's buffer id, chain_head the
 * chain's buffer id; avail_ring and used_ring are not used), and the packed
 * header, the copy of every slot's flags and id and each chain's first slot
 * in a struct vqd_packed_out.
 *
 * The pure-Python reference inspector/ring/reference_packed.py implements
 * exactly the same walk, in the same order, with the same detail strings and
 * heads (its module docstring states the semantics);
 * tests/unit/test_packed_decoder_diff.py holds the two equal.
 */
#ifndef VQD_DECODE_PACKED_H
#define VQD_DECODE_PACKED_H

#include "vqd_decode.h"

/* CDEF BEGIN */
/* Packed-only anomaly kinds; they follow the split decoder's VQD_A_* codes
 * (inspector/ring/anomalies.py AnomalyKind, same order). */
#define VQD_A_ID_OUT_OF_RANGE 12
#define VQD_A_CHAIN_TOO_LONG 13
#define VQD_A_AVAIL_USED_PATTERN 14
#define VQD_A_USED_NOT_AVAILABLE 15

/* vqd_packed_out.positions: how the device's positions were found
 * (inspector/ring/packed.py POSITIONS, same order). */
#define VQD_POS_DEVICE 0
#define VQD_POS_DERIVED 1
#define VQD_POS_FLAGS 2

struct vqd_packed_out {
    /* positions: the device's (given, derived or estimated), the driver's
     * (where the walk stopped); last_avail -1 when unknown or not used */
    uint16_t next_avail;
    uint8_t avail_wrap_counter;
    uint8_t positions;
    uint16_t next_used;
    uint8_t used_wrap_counter;
    int32_t last_avail_idx;
    int32_t last_avail_wrap_counter;
    /* struct pvirtq_event_suppr as read (§2.8.10): desc (off:15, wrap:1), flags */
    uint16_t driver_event_desc;
    uint16_t driver_event_flags;
    uint16_t device_event_desc;
    uint16_t device_event_flags;
    /* [size] each slot's flags and id, read once; [size] each chain's first slot */
    uint16_t *ring_flags;
    uint16_t *ring_id;
    uint32_t *chain_slot;
};

/* Anomaly capacity vqd_snapshot_packed needs (out->anomaly_cap). */
uint32_t vqd_snapshot_packed_anomaly_cap(uint32_t size, uint32_t max_descs);

/* Snapshot the packed ring of `size` (1..32768) descriptors at desc, with
 * its driver and device event suppression areas at driver_event and
 * device_event (each must be readable). Positions: next_used and
 * used_wrap_counter, last_avail_idx and last_avail_wrap_counter, each -1
 * when unknown (see reference_packed.py for the allowed combinations).
 * Returns VQD_SNAP_OK or a VQD_SNAP_E_* status (E_DESC_AREA, E_AVAIL_AREA
 * and E_USED_AREA name the descriptor ring and the driver and device event
 * suppression areas). */
int vqd_snapshot_packed(const struct vqd_region *regions, int nr_regions,
                        const struct vqd_region *valid, int nr_valid,
                        uint64_t desc, uint64_t driver_event, uint64_t device_event,
                        uint32_t size, int32_t next_used, int32_t used_wrap_counter,
                        int32_t last_avail_idx, int32_t last_avail_wrap_counter,
                        uint32_t max_descs, struct vqd_snap_out *out,
                        struct vqd_packed_out *pout);
/* The same under the SIGBUS guard (vqd_guard.h): VQD_SNAP_E_FAULT on a fault. */
int vqd_snapshot_packed_guarded(const struct vqd_region *regions, int nr_regions,
                                const struct vqd_region *valid, int nr_valid,
                                uint64_t desc, uint64_t driver_event, uint64_t device_event,
                                uint32_t size, int32_t next_used, int32_t used_wrap_counter,
                                int32_t last_avail_idx, int32_t last_avail_wrap_counter,
                                uint32_t max_descs, struct vqd_snap_out *out,
                                struct vqd_packed_out *pout);
/* CDEF END */

#endif
