"""VIRTIO 1.2 numbers: feature bits, ring flags, device status, device ids,
queue-size limits and the virtio-net header.

Feature bits are **bit numbers**, as ``include/uapi/linux/virtio_config.h``,
``virtio_ring.h``, ``virtio_net.h`` and ``virtio_blk.h`` define them: test
one with :func:`has_feature` or ``features >> BIT & 1``, build a mask with
``1 << BIT``. Ring flags (§2.7.5 ``struct virtq_desc``, §2.7.6, §2.7.8) and
status bits (§2.1) are **masks**, as the spec's structures use them.
"""

from __future__ import annotations

# --- device status field (§2.1), masks --------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# --- device-independent feature bits (§6), bit numbers ----------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24        # legacy
VIRTIO_F_ANY_LAYOUT = 27             # legacy
VIRTIO_RING_F_INDIRECT_DESC = 28     # §2.7.5.3
VIRTIO_RING_F_EVENT_IDX = 29         # §2.7.7, §2.7.10
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_BAD_FEATURE = 30           # legacy: a driver that acks it is broken
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_IOMMU_PLATFORM = VIRTIO_F_ACCESS_PLATFORM  # its name before VIRTIO 1.1
VIRTIO_F_RING_PACKED = 34            # §2.8
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40

# --- virtio-net feature bits (§5.1.3), bit numbers --------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GSO = 6                 # legacy
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_NOTF_COAL = 53
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_RSC_EXT = 61
VIRTIO_NET_F_STANDBY = 62
VIRTIO_NET_F_SPEED_DUPLEX = 63

# --- virtio-blk feature bits (§5.2.3), bit numbers --------------------------
VIRTIO_BLK_F_BARRIER = 0             # legacy
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_SCSI = 7                # legacy
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_F_SECURE_ERASE = 16

# --- virtio-blk requests (§5.2.6) ------------------------------------------
#: struct virtio_blk_req's header (device-readable): le32 type, le32 reserved
#: (ioprio), le64 sector; then the data; then one device-writable u8 status.
VIRTIO_BLK_REQ_HDR_SIZE = 16
VIRTIO_BLK_SECTOR_SIZE = 512         # ``sector`` is always in 512-byte units
VIRTIO_BLK_SECTOR_SHIFT = 9
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
#: GET_ID's answer: a serial number of up to 20 bytes, NUL-padded.
VIRTIO_BLK_ID_BYTES = 20
#: struct virtio_blk_discard_write_zeroes (16 bytes: le64 sector, le32
#: num_sectors, le32 flags) and its flags.
VIRTIO_BLK_DISCARD_SEGMENT_SIZE = 16
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

#: Request type -> name as vqscope shows it (§5.2.6).
VIRTIO_BLK_T_NAMES: dict[int, str] = {
    VIRTIO_BLK_T_IN: "in", VIRTIO_BLK_T_OUT: "out", VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_GET_ID: "get_id", VIRTIO_BLK_T_GET_LIFETIME: "get_lifetime",
    VIRTIO_BLK_T_DISCARD: "discard", VIRTIO_BLK_T_WRITE_ZEROES: "write_zeroes",
    VIRTIO_BLK_T_SECURE_ERASE: "secure_erase",
}
#: Status byte -> name (§5.2.6).
VIRTIO_BLK_S_NAMES: dict[int, str] = {VIRTIO_BLK_S_OK: "ok", VIRTIO_BLK_S_IOERR: "ioerr",
                                      VIRTIO_BLK_S_UNSUPP: "unsupp"}

#: struct virtio_blk_config (§5.2.4): field -> (byte offset, size). Fields
#: exist when their feature is offered; the layout is fixed regardless.
VIRTIO_BLK_CONFIG_FIELDS: dict[str, tuple[int, int]] = {
    "capacity": (0, 8),              # in 512-byte sectors
    "size_max": (8, 4),              # VIRTIO_BLK_F_SIZE_MAX: bytes per segment
    "seg_max": (12, 4),              # VIRTIO_BLK_F_SEG_MAX: data segments per request
    "geometry.cylinders": (16, 2),
    "geometry.heads": (18, 1),
    "geometry.sectors": (19, 1),
    "blk_size": (20, 4),             # VIRTIO_BLK_F_BLK_SIZE
    "topology.physical_block_exp": (24, 1),
    "topology.alignment_offset": (25, 1),
    "topology.min_io_size": (26, 2),
    "topology.opt_io_size": (28, 4),
    "writeback": (32, 1),            # VIRTIO_BLK_F_CONFIG_WCE
    "unused0": (33, 1),
    "num_queues": (34, 2),           # VIRTIO_BLK_F_MQ
    "max_discard_sectors": (36, 4),  # VIRTIO_BLK_F_DISCARD
    "max_discard_seg": (40, 4),
    "discard_sector_alignment": (44, 4),
    "max_write_zeroes_sectors": (48, 4),  # VIRTIO_BLK_F_WRITE_ZEROES
    "max_write_zeroes_seg": (52, 4),
    "write_zeroes_may_unmap": (56, 1),
    "unused1": (57, 3),
    "max_secure_erase_sectors": (60, 4),  # VIRTIO_BLK_F_SECURE_ERASE
    "max_secure_erase_seg": (64, 4),
    "secure_erase_sector_alignment": (68, 4),
}
#: sizeof(struct virtio_blk_config) as VIRTIO 1.2 defines it.
VIRTIO_BLK_CONFIG_SIZE = 72

# --- other devices' feature bits (§5), bit numbers ---------------------------
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2
VIRTIO_SCSI_F_INOUT = 0
VIRTIO_SCSI_F_HOTPLUG = 1
VIRTIO_SCSI_F_CHANGE = 2
VIRTIO_SCSI_F_T10_PI = 3
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5
VIRTIO_9P_MOUNT_TAG = 0
VIRTIO_VSOCK_F_SEQPACKET = 1
VIRTIO_IOMMU_F_INPUT_RANGE = 0
VIRTIO_IOMMU_F_DOMAIN_RANGE = 1
VIRTIO_IOMMU_F_MAP_UNMAP = 2
VIRTIO_IOMMU_F_BYPASS = 3
VIRTIO_IOMMU_F_PROBE = 4
VIRTIO_IOMMU_F_MMIO = 5
VIRTIO_IOMMU_F_BYPASS_CONFIG = 6
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_GPU_F_VIRGL = 0
VIRTIO_GPU_F_EDID = 1
VIRTIO_GPU_F_RESOURCE_UUID = 2
VIRTIO_GPU_F_RESOURCE_BLOB = 3
VIRTIO_GPU_F_CONTEXT_INIT = 4
VIRTIO_I2C_F_ZERO_LENGTH_REQUEST = 0

# --- device ids (§5) ----------------------------------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_SCSI = 8
VIRTIO_ID_9P = 9
VIRTIO_ID_GPU = 16
VIRTIO_ID_INPUT = 18
VIRTIO_ID_VSOCK = 19
VIRTIO_ID_FS = 26

# --- split virtqueue flags (§2.7.5, §2.7.6, §2.7.8), masks -------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

# --- packed virtqueue (§2.8), masks and values ---------------------------------
#: ``struct pvirtq_desc`` flags (§2.8.13): NEXT, WRITE and INDIRECT keep the
#: split values above; AVAIL and USED carry the wrap counters (§2.8.1).
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
#: ``struct pvirtq_event_suppr`` (§2.8.10, §2.8.13): ``desc`` is
#: ``desc_event_off:15, desc_event_wrap:1``; ``flags`` is ``desc_event_flags:2``
#: with these values.
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2   # only with VIRTIO_RING_F_EVENT_IDX
#: ``desc_event_wrap`` is bit 15 of ``desc``; ``desc_event_off`` bits 0..14.
RING_EVENT_WRAP_SHIFT = 15
RING_EVENT_OFF_MASK = 0x7FFF
#: Sizes (§2.8.13): a descriptor is 16 bytes, each event suppression area 4.
PVIRTQ_DESC_SIZE = 16
PVIRTQ_EVENT_SUPPR_SIZE = 4



def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event`` (VIRTIO 1.2 §2.7.7 and §2.7.10, Linux
    include/uapi/linux/virtio_ring.h): after moving an index from ``old_idx``
    to ``new_idx``, notify iff the other side's event index ``event_idx`` lies
    in ``[old_idx, new_idx)`` modulo 2^16. All three are ring indices (any
    int, taken mod 2^16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# --- queue size and descriptor limits (§2.6, §2.7) ------------------------------
#: "Queue Size value ... the maximum Queue Size value is 32768" (§2.7).
VIRTQ_MAX_SIZE = 32768
#: An indirect table holds at most Queue Size (32768) descriptors of 16 bytes
#: (§2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the
#: Queue Size of the device").
VIRTQ_MAX_INDIRECT_LEN = 16 * VIRTQ_MAX_SIZE

# --- virtio-net (§5.1.6) ------------------------------------------------------
#: ``struct virtio_net_hdr`` without ``num_buffers`` (legacy, no MRG_RXBUF).
VIRTIO_NET_HDR_SIZE = 10
#: ``struct virtio_net_hdr`` with ``num_buffers`` (VERSION_1 or MRG_RXBUF).
VIRTIO_NET_HDR_MRG_RXBUF_SIZE = 12
#: Config ``status`` (§5.1.4).
VIRTIO_NET_S_LINK_UP = 1

#: Names of the device-independent bits (bit number -> name without the
#: ``VIRTIO_F_`` / ``VIRTIO_RING_F_`` prefix kept, as the kernel prints them).
COMMON_FEATURE_NAMES: dict[int, str] = {
    VIRTIO_F_NOTIFY_ON_EMPTY: "VIRTIO_F_NOTIFY_ON_EMPTY",
    VIRTIO_F_ANY_LAYOUT: "VIRTIO_F_ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "VIRTIO_RING_F_INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "VIRTIO_RING_F_EVENT_IDX",
    VIRTIO_F_VERSION_1: "VIRTIO_F_VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "VIRTIO_F_ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "VIRTIO_F_RING_PACKED",
    VIRTIO_F_IN_ORDER: "VIRTIO_F_IN_ORDER",
    VIRTIO_F_ORDER_PLATFORM: "VIRTIO_F_ORDER_PLATFORM",
    VIRTIO_F_SR_IOV: "VIRTIO_F_SR_IOV",
    VIRTIO_F_NOTIFICATION_DATA: "VIRTIO_F_NOTIFICATION_DATA",
    VIRTIO_F_NOTIF_CONFIG_DATA: "VIRTIO_F_NOTIF_CONFIG_DATA",
    VIRTIO_F_RING_RESET: "VIRTIO_F_RING_RESET",
}


def _names(prefix: str) -> dict[int, str]:
    return {v: k for k, v in globals().items() if k.startswith(prefix) and isinstance(v, int)}


#: Every feature name of this module -> its bit number (what QEMU's
#: x-query-virtio-status prints; names are unique, bits are not).
FEATURE_BITS: dict[str, int] = {k: v for k, v in dict(globals()).items()
                                if isinstance(v, int) and ("_F_" in k or k == "VIRTIO_9P_MOUNT_TAG")}


#: Device-specific bit names (bits 0..23 and 41..49 mean something else per
#: device type), by device id.
DEVICE_FEATURE_NAMES: dict[int, dict[int, str]] = {
    VIRTIO_ID_NET: _names("VIRTIO_NET_F_"),
    VIRTIO_ID_BLOCK: _names("VIRTIO_BLK_F_"),
}


def has_feature(features: int, bit: int) -> bool:
    """Whether feature ``bit`` (a bit number of this module) is set in the
    64-bit ``features`` word."""
    return bool(features >> bit & 1)


def feature_names(features: int, device_id: int | None = None) -> list[str]:
    """The names of the bits set in ``features``, lowest bit first: the
    device-independent ones always, the device-specific ones when
    ``device_id`` (a ``VIRTIO_ID_*``) is known, others as ``bit N``."""
    names = dict(DEVICE_FEATURE_NAMES.get(device_id, {}))
    names.update(COMMON_FEATURE_NAMES)
    return [names.get(b, f"bit {b}") for b in range(features.bit_length()) if features >> b & 1]
