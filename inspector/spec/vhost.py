"""vhost numbers: the vhost-user protocol (QEMU docs/interop/vhost-user.rst,
as libvhost-user implements it) and the kernel's vhost ioctls
(``include/uapi/linux/vhost.h``, ``vhost_types.h``).

Requests are ``IntEnum`` s with the spec's numbers; protocol features an
``IntFlag`` of masks (the spec gives bit numbers: ``ProtocolFeature.MQ`` is
``1 << VHOST_USER_PROTOCOL_F_MQ``); virtio-level feature bits that vhost adds
are bit numbers like :mod:`.virtio`'s.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

from .ioctl import _IO, _IOR, _IOW, _IOWR
from .virtio import VIRTIO_F_ACCESS_PLATFORM

class Request(IntEnum):
    """Front-end → back-end message types (spec "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end → front-end message types (spec "Back-end message types"),
    sent on the channel given by SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntFlag):
    """VHOST_USER_PROTOCOL_F_* as bit masks (bit numbers from the spec)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


#: Feature bits (bit numbers) vhost adds to the virtio ones.
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26  # dirty logging; vqscope never offers it

# Header flags.
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# SET_VRING_KICK/CALL/ERR u64 payload.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
MAX_FDS = 8
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE


# The inflight area (spec "Inflight I/O tracking"), split-ring layout of
# libvhost-user: per queue a VuVirtqInflight header (u64 features, u16
# version, u16 desc_num, u16 last_batch_head, u16 used_idx: 16 bytes) then
# queue_size VuDescStateSplit entries (u8 inflight, 5 bytes padding, u16 next,
# u64 counter: 16 bytes), the whole rounded up to 64 bytes. libvhost-user's
# formula (vu_inflight_queue_size) counts 2 bytes, not 16, for the header;
# rounding to 64 makes room for it with any power-of-two queue size, and
# QEMU takes the size the back-end answers GET_INFLIGHT_FD with.
INFLIGHT_ALIGNMENT = 64
INFLIGHT_HEADER_SIZE = 16
INFLIGHT_DESC_SIZE = 16
INFLIGHT_VERSION = 1


# --- kernel vhost (include/uapi/linux/vhost.h, vhost_types.h) ------------------
# vhost_types.h argument layouts
VHOST_MEMORY = struct.Struct("<II")                # nregions, padding
VHOST_MEMORY_REGION = struct.Struct("<QQQQ")       # guest_phys_addr, memory_size, userspace_addr, flags_padding
VHOST_VRING_STATE = struct.Struct("<II")           # index, num
VHOST_VRING_FILE = struct.Struct("<Ii")            # index, fd
VHOST_VRING_ADDR = struct.Struct("<IIQQQQ")        # index, flags, desc, used, avail, log_guest_addr
#: The vhost module's default max_mem_regions (VHOST_MEM_MAX_NREGIONS's default).
VHOST_MEM_MAX_NREGIONS = 64

VHOST_VIRTIO = 0xAF
VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, 8)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, 8)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, VHOST_MEMORY.size)
VHOST_SET_LOG_BASE = _IOW(VHOST_VIRTIO, 0x04, 8)
VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, VHOST_VRING_STATE.size)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, VHOST_VRING_ADDR.size)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, VHOST_VRING_STATE.size)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, VHOST_VRING_STATE.size)
VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, VHOST_VRING_FILE.size)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, VHOST_VRING_FILE.size)
VHOST_SET_VRING_ERR = _IOW(VHOST_VIRTIO, 0x22, VHOST_VRING_FILE.size)
VHOST_NET_SET_BACKEND = _IOW(VHOST_VIRTIO, 0x30, VHOST_VRING_FILE.size)
VHOST_GET_BACKEND_FEATURES = _IOR(VHOST_VIRTIO, 0x26, 8)
VHOST_SET_BACKEND_FEATURES = _IOW(VHOST_VIRTIO, 0x25, 8)

# --- the device IOTLB (vhost_types.h; the same struct is vhost-user's
# VHOST_USER_IOTLB_MSG / VHOST_USER_BACKEND_IOTLB_MSG payload) -----------------
#: uapi vhost.h's VHOST_F_DEVICE_IOTLB (bit number): defined, but not what
#: turns the device IOTLB on for vhost-net (VHOST_NET_IOTLB_FEATURE below).
VHOST_F_DEVICE_IOTLB = 63
#: struct vhost_iotlb_msg: u64 iova, u64 size, u64 uaddr, u8 perm, u8 type,
#: padded to 32 bytes (its sizeof on LP64, what QEMU and DPDK send).
VHOST_IOTLB_MSG_STRUCT = struct.Struct("<QQQBB6x")
# struct vhost_iotlb_msg.type
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6
# struct vhost_iotlb_msg.perm
VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3
#: Names of the perm values (snapshot JSON and log lines use them).
VHOST_ACCESS_NAMES = {VHOST_ACCESS_RO: "ro", VHOST_ACCESS_WO: "wo", VHOST_ACCESS_RW: "rw"}
# The kernel's vhost fd read()/write() messages: struct vhost_msg {int type;
# union {struct vhost_iotlb_msg iotlb; u8 padding[64];}} (type
# VHOST_IOTLB_MSG) and struct vhost_msg_v2 {u32 type; u32 asid; union ...}
# (VHOST_IOTLB_MSG_V2, after VHOST_SET_BACKEND_FEATURES with
# VHOST_BACKEND_F_IOTLB_MSG_V2): 72 bytes each, the iotlb message at offset 8.
VHOST_IOTLB_MSG = 0x1
VHOST_IOTLB_MSG_V2 = 0x2
VHOST_MSG_SIZE = 72
#: VHOST_SET/GET_BACKEND_FEATURES bits, as bit numbers (the u64 is 1 << bit).
VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1
VHOST_BACKEND_F_IOTLB_BATCH = 0x2
#: The header of struct vhost_msg (int type, 4 bytes of padding) and of
#: struct vhost_msg_v2 (u32 type, u32 asid) before the iotlb message at offset 8.
VHOST_MSG_HEADER = struct.Struct("<II")
#: Kernel vhost-net turns its device IOTLB on when the owner acks
#: VIRTIO_F_ACCESS_PLATFORM (bit 33, drivers/vhost/net.c
#: vhost_net_set_features -> vhost_init_device_iotlb); VHOST_F_DEVICE_IOTLB
#: (bit 63) is not in VHOST_NET_FEATURES and VHOST_SET_FEATURES refuses it
#: (EOPNOTSUPP). The IOTLB is a cache: it holds what the owner sent
#: (VHOST_IOTLB_UPDATE), the kernel asks for the rest (VHOST_IOTLB_MISS).
VHOST_NET_IOTLB_FEATURE = VIRTIO_F_ACCESS_PLATFORM

#: ioctl request number -> name.
VHOST_IOCTL_NAMES: dict[int, str] = {v: k for k, v in dict(globals()).items()
                                     if k.startswith("VHOST_") and k != "VHOST_VIRTIO"
                                     and isinstance(v, int) and v >> 8 & 0xFF == VHOST_VIRTIO}

#: The kernel's vhost-net character device.
DEV_VHOST_NET = "/dev/vhost-net"

#: vhost-net's virtqueue indices (drivers/vhost/net.c).
VHOST_NET_VQ_RX = 0
VHOST_NET_VQ_TX = 1
