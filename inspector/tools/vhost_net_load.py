"""A userspace driver for the kernel's vhost-net device: real packets through
the real vhost-net handlers, without a VM.

(Over 600 lines: one driver, most of it docstrings; the device IOTLB part
shares the driver's fds, rings and wait loops, so it stays in the class.)

This is the approach of the kernel's ``tools/virtio/vhost_net_test.c``: a
process plays the guest. It owns "guest memory" (one memfd it maps), lays
out the two split rings of one queue pair in it with
:class:`inspector.ring.driver.DriverRing`, and hands all of it to
``/dev/vhost-net`` with the vhost ioctls (include/uapi/linux/vhost.h):

1. ``VHOST_SET_OWNER``; ``VHOST_GET_FEATURES`` / ``VHOST_SET_FEATURES``
   (``VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF``, optionally
   ``VIRTIO_RING_F_EVENT_IDX``);
2. ``VHOST_SET_MEM_TABLE``: one region, the whole memfd mapping.
   **guest_phys_addr is 0**, ``userspace_addr`` the mapping's address: as
   for a QEMU guest whose RAM starts at guest-physical 0, descriptors carry
   guest-physical addresses and vhost translates them through the table,
   while ring addresses (``VHOST_SET_VRING_ADDR``) are user virtual
   addresses. An observer (vqscope's vhost-net source) must therefore do the
   same translation a real VM needs;
3. per vring (RX is index 0, TX index 1, as in drivers/vhost/net.c's
   ``VHOST_NET_VQ_RX``/``VHOST_NET_VQ_TX``): ``VHOST_SET_VRING_NUM``,
   ``VHOST_SET_VRING_BASE`` (0), ``VHOST_SET_VRING_ADDR``,
   ``VHOST_SET_VRING_KICK`` and ``VHOST_SET_VRING_CALL`` (one eventfd each);
4. ``VHOST_NET_SET_BACKEND`` per vring with the fd of a tap device
   (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, ``TUNSETVNETHDRSZ`` 12: with
   VERSION_1 / MRG_RXBUF every frame carries a 12-byte
   ``virtio_net_hdr_mrg_rxbuf``, which vhost passes to and from the tap).

Where frames come from and go to: once vhost owns the tap, the tap's queue
is vhost's RX source, so the driver does not read the tap fd. Like
vhost_net_test.c it uses an ``AF_PACKET`` socket bound to the tap
interface: a frame the driver puts on TX leaves vhost through the tap into
the host stack, where the packet socket sees it arrive; a frame sent on the
packet socket is transmitted on the tap, queued for vhost, and lands in an
RX buffer. Frames use the local experimental EtherType 0x88b5 and the tap's
IPv6 is disabled before it is brought up, so nothing else reaches the rings.

Counters (:class:`RingCounters`): kicks sent, used entries seen and the used
ring's ``idx`` as last read, per vring. ``vqscope load vhost-net`` is the
CLI (see :func:`load_main`).

The device IOTLB (``iotlb=True``, ``--iotlb``): the driver acks
``VIRTIO_F_ACCESS_PLATFORM``, which is what makes kernel vhost-net allocate
its device IOTLB (drivers/vhost/net.c ``vhost_net_set_features`` ->
``vhost_init_device_iotlb``; ``VHOST_F_DEVICE_IOTLB``, bit 63, is refused),
asks for v2 messages (``VHOST_SET_BACKEND_FEATURES`` with
``VHOST_BACKEND_F_IOTLB_MSG_V2``; v1 when the kernel refuses), and gives
every ring and buffer address as an IOVA: ``iova = gpa + IOVA_OFFSET``, a
space that is neither the guest-physical one (from 0) nor the user
addresses, so a reader that confuses them fails visibly. vhost then
translates each access through its IOTLB: an IOVA it has no entry for
parks the vring and queues a ``VHOST_IOTLB_MISS`` message on the vhost fd
(drivers/vhost/vhost.c ``translate_desc`` / ``iotlb_access_ok`` ->
``vhost_iotlb_miss``, read with ``vhost_chr_read_iter``); the driver reads
it and writes a ``VHOST_IOTLB_UPDATE`` of the 4 KiB page holding that IOVA
(``vhost_chr_write_iter`` -> ``vhost_process_iotlb_msg``, whose
``vhost_iotlb_notify_vq`` requeues the parked vring) with the page's
permission: ring descriptors and avail RO, used ring RW (vhost reads
``used->idx`` through the IOTLB too), TX buffers RO (the device reads
them), RX buffers WO. The used rings are mapped before
``VHOST_NET_SET_BACKEND``, as QEMU does (``vhost_vq_init_access`` writes
``used->flags`` at once and fails with EFAULT on a miss). The memory table
is still required (``vhost_vq_access_ok`` -> ``vq_memory_access_ok``
refuses a device without one: ``VHOST_NET_SET_BACKEND`` fails with EFAULT,
measured on 6.1) but no longer translates. Misses answered,
updates and invalidations sent are counted (:class:`IotlbCounters`).

A fault on purpose: :meth:`VhostNetDriver.publish_tx` with ``kick=False``
(``--withhold-kicks``) publishes TX entries without the kick vhost asked
for (without EVENT_IDX, VRING_USED_F_NO_NOTIFY is clear while vhost waits:
every publish needs a kick, §2.7.10), so the kernel's vhost-net sees
entries (``avail_idx`` ahead of its ``vq->avail_idx`` and
``last_avail_idx``) it was never kicked for: a lost kick.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import asdict, dataclass

from ..ring.driver import DriverRing
from ..errors import InspectorError
from ..layout import split_layout
from ..memory import GuestMemory
from ..spec.tun import DEV_TUN, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, IFNAMSIZ, TUNSETIFF, TUNSETVNETHDRSZ
from ..spec.vhost import (DEV_VHOST_NET, VHOST_ACCESS_NAMES, VHOST_ACCESS_RO, VHOST_ACCESS_RW,
                          VHOST_ACCESS_WO, VHOST_BACKEND_F_IOTLB_MSG_V2, VHOST_GET_BACKEND_FEATURES,
                          VHOST_GET_FEATURES, VHOST_GET_VRING_BASE, VHOST_IOTLB_INVALIDATE,
                          VHOST_IOTLB_MISS, VHOST_IOTLB_MSG, VHOST_IOTLB_MSG_STRUCT, VHOST_IOTLB_MSG_V2,
                          VHOST_IOTLB_UPDATE, VHOST_MEMORY, VHOST_MEMORY_REGION, VHOST_MSG_HEADER,
                          VHOST_MSG_SIZE, VHOST_NET_IOTLB_FEATURE, VHOST_NET_SET_BACKEND, VHOST_NET_VQ_RX,
                          VHOST_NET_VQ_TX, VHOST_SET_BACKEND_FEATURES, VHOST_SET_FEATURES,
                          VHOST_SET_MEM_TABLE, VHOST_SET_OWNER, VHOST_SET_VRING_ADDR,
                          VHOST_SET_VRING_BASE, VHOST_SET_VRING_CALL, VHOST_SET_VRING_KICK,
                          VHOST_SET_VRING_NUM, VHOST_VRING_ADDR, VHOST_VRING_FILE, VHOST_VRING_STATE)
from ..spec.virtio import (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
                           VIRTIO_RING_F_EVENT_IDX)

#: sizeof(struct virtio_net_hdr_mrg_rxbuf): the header every frame carries.
VNET_HDR_LEN = VIRTIO_NET_HDR_MRG_RXBUF_SIZE
U64 = struct.Struct("<Q")
#: Local experimental EtherType (IEEE 802): our frames and nothing else.
ETH_P_VQSCOPE = 0x88B5
ETH_HLEN = 14
BUF_SIZE = 2048
#: ``--iotlb``: every ring and buffer address is ``gpa + IOVA_OFFSET`` (module docstring).
IOVA_OFFSET = 0x1_0000_0000
#: Granularity of the IOTLB updates that answer misses.
IOTLB_PAGE = 4096
#: Most messages one :meth:`VhostNetDriver.service_iotlb` call reads (bounds the loop).
IOTLB_READ_MAX = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class VhostNetError(InspectorError):
    """A vhost-net device that cannot be opened or set up, or traffic that
    did not complete."""


@dataclass
class RingCounters:
    """What the driver did on one vring: ``kicks`` written to the kick
    eventfd, ``used`` entries collected from the used ring, ``used_idx`` the
    used ring's ``idx`` as last read, ``calls`` eventfd counts read from the
    call eventfd (calls coalesce: this is a count of signals, not of reads),
    ``withheld``: entries published without a kick on purpose
    (:meth:`VhostNetDriver.publish_tx`)."""

    kicks: int = 0
    used: int = 0
    used_idx: int = 0
    calls: int = 0
    withheld: int = 0


@dataclass
class IotlbCounters:
    """The device IOTLB traffic of ``--iotlb`` on the vhost fd: ``msg``
    ``"v2"`` or ``"v1"`` (the message format vhost took); ``misses``
    VHOST_IOTLB_MISS messages read; ``answered`` misses answered with an
    update; ``unanswered`` misses left waiting (an IOVA in no area, or one
    :meth:`VhostNetDriver.withhold_iova` holds back: that vring stays
    parked); ``updates`` VHOST_IOTLB_UPDATE messages written (answers and
    the used rings mapped ahead); ``invalidations`` VHOST_IOTLB_INVALIDATE
    messages written."""

    msg: str = ""
    misses: int = 0
    answered: int = 0
    unanswered: int = 0
    updates: int = 0
    invalidations: int = 0


@dataclass(frozen=True)
class IovaArea:
    """One area of ``--iotlb``'s IOVA space: ``size`` bytes at ``iova``,
    at user address ``uaddr`` of the driver, device access ``perm``
    (VHOST_ACCESS_RO/WO/RW)."""

    name: str
    iova: int
    size: int
    uaddr: int
    perm: int


@dataclass(frozen=True)
class VringSetup:
    """What the driver told vhost about one vring (the ioctl arguments):
    the addresses of the three areas (user virtual addresses; IOVAs with
    the device IOTLB), the size, the base and the kick/call eventfds."""

    index: int
    num: int
    desc_user_addr: int
    avail_user_addr: int
    used_user_addr: int
    base: int
    kick_fd: int
    call_fd: int


def _frame(dst: bytes, src: bytes, seq: int, length: int) -> bytes:
    """An Ethernet frame of ``length`` bytes with EtherType ETH_P_VQSCOPE and
    a payload starting with ``b"vqs"`` and the big-endian ``seq``."""
    payload = b"vqs" + seq.to_bytes(4, "big")
    payload += bytes((seq + i) & 0xFF for i in range(length - ETH_HLEN - len(payload)))
    return dst + src + ETH_P_VQSCOPE.to_bytes(2, "big") + payload


def _mac(seed: int) -> bytes:
    return bytes((0x52, 0x54, 0x00, 0x76, 0x71, seed & 0xFF))


class VhostNetDriver:
    """One vhost-net device driven from user space: ``open`` the device and
    a tap, set everything up, then :meth:`send` and :meth:`receive` frames.

    ``size``: queue size of both vrings; ``tap``: tap name (``vqs%d`` lets
    the kernel choose; the chosen name is ``.tap``); ``event_idx``:
    negotiate VIRTIO_RING_F_EVENT_IDX (default off: vhost then signals every
    batch, which keeps call counts simple); ``iotlb``: run with vhost's
    device IOTLB (module docstring; ``.iotlb`` counts its messages,
    ``.areas`` the IOVA areas); ``iotlb_v2=False``: do not ask for v2
    messages (vhost then speaks v1, ``struct vhost_msg``). Raises VhostNetError (what ioctl, which
    errno). A context manager; :meth:`close` frees every fd and the mapping.
    """

    def __init__(self, *, size: int = 256, tap: str = "vqs%d", event_idx: bool = False,
                 mem_size: int | None = None, iotlb: bool = False, iotlb_v2: bool = True):
        self.size = size
        self.vhost_fd = self.tap_fd = self.memfd = -1
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        self.map: mmap.mmap | None = None
        self.packet: socket.socket | None = None
        self.rings: list[DriverRing] = []
        self.counters = [RingCounters(), RingCounters()]
        self.setups: list[VringSetup] = []
        self._bufs: list[dict[int, int]] = [{}, {}]  # per vring: head -> buffer gpa
        self._free_bufs: list[list[int]] = [[], []]
        self._seq = 0
        self.tap = ""
        self.use_iotlb = iotlb
        self.iotlb = IotlbCounters()
        self.areas: list[IovaArea] = []
        self._withheld: list[tuple[int, int]] = []   # IOVA ranges whose misses are not answered
        self._iotlb_v2 = False
        self._want_v2 = iotlb_v2
        lay = split_layout(size, 4096)
        ring_bytes = -(-lay.total_size // 4096) * 4096
        self.mem_size = mem_size or 2 * ring_bytes + 2 * size * BUF_SIZE
        try:
            self._open(tap, event_idx, ring_bytes)
        except BaseException:
            self.close()
            raise

    # ---- set-up ---------------------------------------------------------------
    def _ioctl(self, fd: int, request: int, arg, name: str):
        try:
            return fcntl.ioctl(fd, request, arg)
        except OSError as e:
            raise VhostNetError(f"{name} on {DEV_VHOST_NET if fd == self.vhost_fd else 'fd %d' % fd} "
                                f"failed: {os.strerror(e.errno)} (errno {e.errno})") from None

    def _open(self, tap: str, event_idx: bool, ring_bytes: int) -> None:
        try:
            self.vhost_fd = os.open(DEV_VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VhostNetError(f"{DEV_VHOST_NET} does not exist: this kernel has no vhost-net: "
                                f"modprobe vhost_net (CONFIG_VHOST_NET)") from None
        except PermissionError:
            raise VhostNetError(f"no permission to open {DEV_VHOST_NET}: run as root or in group "
                                f"kvm") from None
        self.memfd = os.memfd_create("vqscope-vhost-net", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.mem_size)
        self.map = mmap.mmap(self.memfd, self.mem_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        cbuf = (ctypes.c_char * self.mem_size).from_buffer(self.map)
        self.uva = ctypes.addressof(cbuf)
        del cbuf
        # guest_phys_addr 0, userspace_addr = our mapping (module docstring).
        self.mem = GuestMemory()
        self.mem.add(0, self.map, uva=self.uva, size=self.mem_size)

        self._ioctl(self.vhost_fd, VHOST_SET_OWNER, 0, "VHOST_SET_OWNER")
        offered = U64.unpack(self._ioctl(self.vhost_fd, VHOST_GET_FEATURES, bytes(8),
                                         "VHOST_GET_FEATURES"))[0]
        want = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)
        if event_idx:
            want |= 1 << VIRTIO_RING_F_EVENT_IDX
        if self.use_iotlb:
            want |= 1 << VHOST_NET_IOTLB_FEATURE
            self._backend_features()
        if want & ~offered:
            raise VhostNetError(f"vhost-net does not offer features {want & ~offered:#x} "
                                f"(offered {offered:#x})")
        self.features = want
        self._ioctl(self.vhost_fd, VHOST_SET_FEATURES, U64.pack(want), "VHOST_SET_FEATURES")
        self.mem_table = [(0, self.mem_size, self.uva)]  # (guest_phys_addr, memory_size, userspace_addr)
        table = VHOST_MEMORY.pack(1, 0) + VHOST_MEMORY_REGION.pack(0, self.mem_size, self.uva, 0)
        self._ioctl(self.vhost_fd, VHOST_SET_MEM_TABLE, table, "VHOST_SET_MEM_TABLE")

        bufs_base = 2 * ring_bytes
        for index in (VHOST_NET_VQ_RX, VHOST_NET_VQ_TX):
            ring = DriverRing(self.mem, index * ring_bytes, self.size)
            self.rings.append(ring)
            first = bufs_base + index * self.size * BUF_SIZE
            self._free_bufs[index] = [first + i * BUF_SIZE for i in range(self.size)]
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.kick_fds.append(kick)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.call_fds.append(call)
            name = "rx" if index == VHOST_NET_VQ_RX else "tx"
            base = index * ring_bytes
            self.areas += [IovaArea(f"{name} desc+avail", self.dma(base), ring.used_addr - base,
                                    self.uva + base, VHOST_ACCESS_RO),
                           IovaArea(f"{name} used", self.dma(ring.used_addr),
                                    base + ring_bytes - ring.used_addr, self.uva + ring.used_addr,
                                    VHOST_ACCESS_RW),
                           IovaArea(f"{name} buffers", self.dma(first), self.size * BUF_SIZE,
                                    self.uva + first,
                                    VHOST_ACCESS_WO if index == VHOST_NET_VQ_RX else VHOST_ACCESS_RO)]
            if self.use_iotlb:
                addrs = (self.dma(ring.desc_addr), self.dma(ring.avail_addr), self.dma(ring.used_addr))
            else:
                addrs = (self.uva + ring.desc_addr, self.uva + ring.avail_addr, self.uva + ring.used_addr)
            setup = VringSetup(index, self.size, *addrs, 0, kick, call)
            self.setups.append(setup)
            fd = self.vhost_fd
            self._ioctl(fd, VHOST_SET_VRING_NUM, VHOST_VRING_STATE.pack(index, self.size),
                        "VHOST_SET_VRING_NUM")
            self._ioctl(fd, VHOST_SET_VRING_BASE, VHOST_VRING_STATE.pack(index, 0),
                        "VHOST_SET_VRING_BASE")
            self._ioctl(fd, VHOST_SET_VRING_ADDR,
                        VHOST_VRING_ADDR.pack(index, 0, setup.desc_user_addr, setup.used_user_addr,
                                              setup.avail_user_addr, 0), "VHOST_SET_VRING_ADDR")
            self._ioctl(fd, VHOST_SET_VRING_KICK, VHOST_VRING_FILE.pack(index, kick),
                        "VHOST_SET_VRING_KICK")
            self._ioctl(fd, VHOST_SET_VRING_CALL, VHOST_VRING_FILE.pack(index, call),
                        "VHOST_SET_VRING_CALL")

        self._open_tap(tap)
        if self.use_iotlb:
            # vhost_vq_init_access (at SET_BACKEND) writes used->flags and reads
            # used->idx through the IOTLB at once: map the used rings first.
            os.set_blocking(self.vhost_fd, False)
            for area in self.areas:
                if area.name.endswith(" used"):
                    self._map(area.iova, area.size)
        for index in (VHOST_NET_VQ_RX, VHOST_NET_VQ_TX):
            self._ioctl(self.vhost_fd, VHOST_NET_SET_BACKEND,
                        VHOST_VRING_FILE.pack(index, self.tap_fd), "VHOST_NET_SET_BACKEND")

    def _open_tap(self, name: str) -> None:
        try:
            self.tap_fd = os.open(DEV_TUN, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VhostNetError(f"cannot open {DEV_TUN}: {e.strerror} (modprobe tun)") from None
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        ifr = self._ioctl(self.tap_fd, TUNSETIFF, ifr, f"TUNSETIFF {name}")
        self.tap = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        self._ioctl(self.tap_fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN), "TUNSETVNETHDRSZ")
        # No IPv6 autoconfiguration traffic (router solicitations, MLD) on our rings.
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.tap}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass  # no IPv6 in this kernel: nothing to silence
        r = subprocess.run(["ip", "link", "set", "dev", self.tap, "multicast", "off", "up"],
                           capture_output=True, text=True)
        if r.returncode:
            raise VhostNetError(f"ip link set {self.tap} up failed: {r.stderr.strip()}")
        self.packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_VQSCOPE))
        self.packet.bind((self.tap, ETH_P_VQSCOPE))
        self.packet.setblocking(False)

    # ---- the device IOTLB --------------------------------------------------------------
    def dma(self, gpa: int) -> int:
        """The address the device is given for guest-physical ``gpa``: its
        IOVA with the device IOTLB, else ``gpa`` itself."""
        return gpa + IOVA_OFFSET if self.use_iotlb else gpa

    def uaddr_of(self, iova: int) -> int | None:
        """The driver's user address of ``iova`` (None outside every area)."""
        area = next((a for a in self.areas if a.iova <= iova < a.iova + a.size), None)
        return None if area is None else area.uaddr + iova - area.iova

    def _backend_features(self) -> None:
        """Ask for v2 IOTLB messages (VHOST_SET_BACKEND_FEATURES); v1 when
        the kernel does not offer them or refuses."""
        bit = 1 << VHOST_BACKEND_F_IOTLB_MSG_V2
        try:
            offered = U64.unpack(fcntl.ioctl(self.vhost_fd, VHOST_GET_BACKEND_FEATURES, bytes(8)))[0]
            if offered & bit and self._want_v2:
                fcntl.ioctl(self.vhost_fd, VHOST_SET_BACKEND_FEATURES, U64.pack(bit))
                self._iotlb_v2 = True
        except OSError:
            self._iotlb_v2 = False
        self.iotlb.msg = "v2" if self._iotlb_v2 else "v1"

    def _page_perm(self, page: int) -> int:
        """The device access of the IOTLB_PAGE at IOVA ``page``: the union of
        the areas it overlaps (0: none)."""
        perm = 0
        for a in self.areas:
            if a.iova < page + IOTLB_PAGE and page < a.iova + a.size:
                perm |= a.perm
        return perm

    def _send_iotlb(self, kind: int, iova: int, size: int, uaddr: int = 0, perm: int = 0) -> None:
        head = VHOST_MSG_HEADER.pack(VHOST_IOTLB_MSG_V2 if self._iotlb_v2 else VHOST_IOTLB_MSG, 0)
        msg = head + VHOST_IOTLB_MSG_STRUCT.pack(iova, size, uaddr, perm, kind)
        msg += bytes(VHOST_MSG_SIZE - len(msg))
        try:
            os.write(self.vhost_fd, msg)
        except OSError as e:
            what = {VHOST_IOTLB_UPDATE: "VHOST_IOTLB_UPDATE", VHOST_IOTLB_INVALIDATE: "VHOST_IOTLB_INVALIDATE"}
            raise VhostNetError(f"{what.get(kind, kind)} iova {iova:#x} size {size:#x} on {DEV_VHOST_NET} "
                                f"failed: {os.strerror(e.errno)} (errno {e.errno})") from None

    def _map(self, iova: int, size: int) -> None:
        """VHOST_IOTLB_UPDATE of every IOTLB_PAGE of ``[iova, iova + size)``,
        each with its areas' permission."""
        page = iova & ~(IOTLB_PAGE - 1)
        while page < iova + size:
            self._send_iotlb(VHOST_IOTLB_UPDATE, page, IOTLB_PAGE, self.uaddr_of(page), self._page_perm(page))
            self.iotlb.updates += 1
            page += IOTLB_PAGE

    def withhold_iova(self, iova: int, size: int) -> None:
        """Leave misses in ``[iova, iova + size)`` unanswered from now on
        (the vring that asked stays parked: a front-end that never answers)."""
        self._withheld.append((iova, size))

    def invalidate(self, iova: int, size: int) -> None:
        """VHOST_IOTLB_INVALIDATE ``[iova, iova + size)``: vhost drops every
        entry that overlaps it (vhost_iotlb_del_range) and misses again on
        its next access."""
        self._send_iotlb(VHOST_IOTLB_INVALIDATE, iova, size)
        self.iotlb.invalidations += 1

    def service_iotlb(self) -> int:
        """Read every message waiting on the vhost fd (at most
        IOTLB_READ_MAX) and answer each miss with the update of its page
        (unless the IOVA is in no area or withheld: counted
        ``unanswered``). Returns the misses read; no-op without the IOTLB."""
        if not self.use_iotlb or self.vhost_fd < 0:
            return 0
        n = 0
        for _ in range(IOTLB_READ_MAX):
            try:
                data = os.read(self.vhost_fd, VHOST_MSG_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                raise VhostNetError(f"read of {DEV_VHOST_NET} (IOTLB messages) failed: "
                                    f"{os.strerror(e.errno)} (errno {e.errno})") from None
            if len(data) < VHOST_MSG_HEADER.size + VHOST_IOTLB_MSG_STRUCT.size:
                break
            iova, _size, _uaddr, _perm, kind = VHOST_IOTLB_MSG_STRUCT.unpack_from(data, VHOST_MSG_HEADER.size)
            if kind != VHOST_IOTLB_MISS:
                continue
            n += 1
            self.iotlb.misses += 1
            page = iova & ~(IOTLB_PAGE - 1)
            if not self._page_perm(page) or any(a <= iova < a + s for a, s in self._withheld):
                self.iotlb.unanswered += 1
                continue
            self._map(page, IOTLB_PAGE)
            self.iotlb.answered += 1
        return n

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, answering IOTLB misses meanwhile."""
        if not self.use_iotlb:
            time.sleep(seconds)
            return
        end = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.vhost_fd, select.POLLIN)
        while (left := end - time.monotonic()) > 0:
            if poller.poll(left * 1000):
                self.service_iotlb()

    # ---- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Close the vhost fd first (vhost stops and lets go of our memory
        and eventfds), then the tap, the eventfds, the packet socket, the
        memfd and the mapping. Idempotent."""
        for attr in ("vhost_fd", "tap_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)
        for fd in self.kick_fds + self.call_fds:
            os.close(fd)
        self.kick_fds, self.call_fds = [], []
        if self.packet is not None:
            self.packet.close()
            self.packet = None
        for ring in self.rings:
            ring._view.release()
        self.rings = []
        self.mem = None
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1

    def __enter__(self) -> VhostNetDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- notifications -----------------------------------------------------------------
    def kick(self, index: int) -> None:
        """Notify vhost that vring ``index`` has new buffers (write 1 to its
        kick eventfd; vhost_poll_wakeup queues handle_{rx,tx}_kick)."""
        os.eventfd_write(self.kick_fds[index], 1)
        self.counters[index].kicks += 1

    def _collect(self, index: int, want: int, timeout: float) -> list[tuple[int, int]]:
        """Wait (polling the call eventfd, ``timeout`` seconds in all) until
        ``want`` used entries came back on vring ``index``; returns them as
        ``(head, len)``."""
        ring, c = self.rings[index], self.counters[index]
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.call_fds[index], select.POLLIN)
        if self.use_iotlb:
            poller.register(self.vhost_fd, select.POLLIN)
        while True:
            self.service_iotlb()
            got = ring.get_used()
            c.used_idx = ring.used_idx
            c.used += len(got)
            out.extend(got)
            if len(out) >= want:
                # vhost signals after it updates used->idx (vhost_add_used_and_signal_n):
                # count the call of this batch too, if it is not already counted.
                if poller.poll(500):
                    self._read_call(index)
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise VhostNetError(
                    f"vhost-net vring {index} ({'RX' if index == 0 else 'TX'}): {len(out)} of {want} "
                    f"used entries after {timeout:.0f} s (used->idx {ring.used_idx}, avail->idx "
                    f"{ring.avail_idx})")
            if any(fd == self.call_fds[index] for fd, _ in poller.poll(min(left, 0.2) * 1000)):
                self._read_call(index)

    def _read_call(self, index: int) -> None:
        try:
            self.counters[index].calls += os.eventfd_read(self.call_fds[index])
        except BlockingIOError:
            pass

    def _take_buf(self, index: int) -> int:
        if not self._free_bufs[index]:
            raise VhostNetError(f"vring {index}: no free buffer (all {self.size} in flight)")
        return self._free_bufs[index].pop()

    def _release(self, index: int, used: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Free the buffers of ``used`` entries; ``(buffer gpa, len)`` each."""
        out = []
        for head, length in used:
            gpa = self._bufs[index].pop(head)
            self._free_bufs[index].append(gpa)
            out.append((gpa, length))
        return out

    # ---- traffic -------------------------------------------------------------------
    def publish_tx(self, n: int, *, length: int = 64, kick: bool = True) -> list[bytes]:
        """Put ``n`` frames of ``length`` bytes on TX (one descriptor each:
        12-byte zero header + frame) and publish them (avail->idx), then kick
        once, or with ``kick=False`` not at all (a lost kick on purpose,
        counted in ``withheld``). Publishes fewer when fewer TX buffers are
        free; returns the frames published."""
        ring, frames = self.rings[VHOST_NET_VQ_TX], []
        for _ in range(min(n, len(self._free_bufs[VHOST_NET_VQ_TX]))):
            frame = _frame(b"\xff" * 6, _mac(1), self._seq, length)
            self._seq += 1
            gpa = self._take_buf(VHOST_NET_VQ_TX)
            self.mem.view(gpa, VNET_HDR_LEN + length)[:] = bytes(VNET_HDR_LEN) + frame
            head = ring.add_chain([(self.dma(gpa), VNET_HDR_LEN + length, False)])
            self._bufs[VHOST_NET_VQ_TX][head] = gpa
            frames.append(frame)
        if frames:
            ring.publish()
            if kick:
                self.kick(VHOST_NET_VQ_TX)
            else:
                self.counters[VHOST_NET_VQ_TX].withheld += len(frames)
        return frames

    def send(self, n: int, *, length: int = 64, timeout: float = 30.0) -> list[bytes]:
        """Publish ``n`` frames on TX and kick (:meth:`publish_tx`), wait
        for their ``n`` used entries and read the ``n`` frames back from the
        tap (the packet socket). Returns the frames read; raises
        VhostNetError when fewer arrive within ``timeout`` seconds or they
        differ."""
        if not 0 < n <= self.size:
            raise VhostNetError(f"send: {n} frames do not fit a ring of {self.size}")
        if n > len(self._free_bufs[VHOST_NET_VQ_TX]):
            raise VhostNetError(f"send: {n} frames, but only {len(self._free_bufs[VHOST_NET_VQ_TX])} "
                                f"TX buffers are free")
        frames = self.publish_tx(n, length=length)
        self._release(VHOST_NET_VQ_TX, self._collect(VHOST_NET_VQ_TX, n, timeout))
        got = self._read_packets(set(frames), n, timeout)
        return got

    def _read_packets(self, expected: set[bytes], n: int, timeout: float) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VhostNetError(f"tap {self.tap}: {len(got)} of {n} TX frames arrived within "
                                    f"{timeout:.0f} s")
            r, _, _ = select.select([self.packet], [], [], min(left, 0.2))
            if not r:
                continue
            data = self.packet.recv(65536)
            if data in expected:
                got.append(data)
        return got

    def receive(self, m: int, *, length: int = 64, timeout: float = 30.0) -> list[bytes]:
        """Transmit ``m`` frames on the tap (the packet socket; vhost's RX
        source), then post ``m`` RX buffers of BUF_SIZE bytes, kick once
        and wait for ``m`` used entries. Returns the frames found in the
        buffers (header stripped); raises VhostNetError when they do not
        come back within ``timeout`` seconds or differ from those sent."""
        if not 0 < m <= self.size:
            raise VhostNetError(f"receive: {m} frames do not fit a ring of {self.size}")
        sent = []
        for _ in range(m):
            frame = _frame(_mac(2), _mac(1), self._seq, length)
            self._seq += 1
            self.packet.send(frame)
            sent.append(frame)
        ring = self.rings[VHOST_NET_VQ_RX]
        for _ in range(m):
            gpa = self._take_buf(VHOST_NET_VQ_RX)
            head = ring.add_chain([(self.dma(gpa), BUF_SIZE, True)])
            self._bufs[VHOST_NET_VQ_RX][head] = gpa
        ring.publish()
        self.kick(VHOST_NET_VQ_RX)
        got = []
        for gpa, n in self._release(VHOST_NET_VQ_RX, self._collect(VHOST_NET_VQ_RX, m, timeout)):
            if not VNET_HDR_LEN <= n <= BUF_SIZE:
                raise VhostNetError(f"RX used entry of {n} bytes at {gpa:#x}: not a header plus a frame")
            got.append(self.mem.read(gpa + VNET_HDR_LEN, n - VNET_HDR_LEN))
        if sorted(got) != sorted(sent):
            raise VhostNetError(f"RX: the {m} frames in the buffers differ from the {m} sent on "
                                f"{self.tap}")
        return got

    # ---- state ----------------------------------------------------------------------
    def vring_base(self, index: int) -> int:
        """``VHOST_GET_VRING_BASE``: vhost's ``last_avail_idx`` of vring
        ``index`` (drivers/vhost/vhost.c ``vhost_vring_ioctl``, which only
        reads it; QEMU asks when it stops a device)."""
        out = self._ioctl(self.vhost_fd, VHOST_GET_VRING_BASE, VHOST_VRING_STATE.pack(index, 0),
                          "VHOST_GET_VRING_BASE")
        return VHOST_VRING_STATE.unpack(out)[1]

    def summary(self) -> dict:
        """A JSON-able summary: pid, vhost fd, tap, features, mem table,
        per vring its set-up and counters; with the device IOTLB, ``iotlb``:
        its counters, ``iova_offset`` and the IOVA areas."""
        return {
            "pid": os.getpid(), "vhost_fd": self.vhost_fd, "tap": self.tap,
            "features": self.features,
            "mem_table": [{"guest_phys_addr": g, "memory_size": s, "userspace_addr": u}
                          for g, s, u in self.mem_table],
            "vrings": [{"name": "rx" if s.index == 0 else "tx", **asdict(s), **asdict(c)}
                       for s, c in zip(self.setups, self.counters)],
            **({"iotlb": {**asdict(self.iotlb), "iova_offset": IOVA_OFFSET,
                          "areas": [{**asdict(a), "perm": VHOST_ACCESS_NAMES[a.perm]} for a in self.areas]}}
               if self.use_iotlb else {}),
        }


def load_main(args) -> int:
    """``vqscope load vhost-net``: set up a vhost-net device with a tap,
    send ``--tx`` frames, receive ``--rx`` frames, print one JSON summary
    line (flushed), then keep the device open ``--hold`` seconds (another
    process can attach meanwhile), repeating one TX and one RX frame every
    ``--every`` seconds if given.

    ``--withhold-kicks N``: publish N TX frames without kicking (a lost
    kick), ``--withhold-after`` seconds into the hold (default 0: before the
    first summary; later, a summary line follows); from then on the TX
    frames of ``--every`` are published unkicked too, while TX buffers are
    free. ``--iotlb``: with vhost's device IOTLB, misses answered all along
    (the summary's ``iotlb``). Waiting lets an observer attached meanwhile see the TX vring at
    work first (the probes learn a vring from vhost's handlers)."""
    withhold = getattr(args, "withhold_kicks", 0) or 0
    after = getattr(args, "withhold_after", 0.0) or 0.0
    if not 0 <= withhold <= args.size:
        raise VhostNetError(f"--withhold-kicks {withhold} is invalid: give 1 to --size ({args.size}) frames")
    if after < 0 or (withhold and after and after >= args.hold):
        raise VhostNetError(f"--withhold-after {after:g} is invalid: give seconds >= 0 and less than "
                            f"--hold ({args.hold:g})")
    with VhostNetDriver(size=args.size, tap=args.tap, iotlb=getattr(args, "iotlb", False)) as drv:
        if args.tx:
            drv.send(args.tx)
        if args.rx:
            drv.receive(args.rx)
        withholding = False
        if withhold and not after:
            drv.publish_tx(withhold, kick=False)
            withholding = True
        print(json.dumps(drv.summary()), flush=True)
        start = time.monotonic()
        end = start + args.hold
        while (left := end - time.monotonic()) > 0:
            nap = min(args.every or 1.0, left)
            if withhold and not withholding:
                nap = min(nap, max(0.0, start + after - time.monotonic()))
            drv.wait(nap)
            now = time.monotonic()
            if withhold and not withholding and now >= start + after:
                drv.publish_tx(withhold, kick=False)
                withholding = True
                print(json.dumps(drv.summary()), flush=True)
                continue
            if args.every and now < end:
                if withholding:
                    drv.publish_tx(1, kick=False)
                else:
                    drv.send(1)
                drv.receive(1)
        if args.hold and args.every:
            print(json.dumps(drv.summary()), flush=True)
    return 0


__all__ = [
    "IOVA_OFFSET", "IotlbCounters", "IovaArea", "RingCounters", "VhostNetDriver", "VhostNetError", "VringSetup",
    "VHOST_NET_VQ_RX", "VHOST_NET_VQ_TX", "load_main",
]
