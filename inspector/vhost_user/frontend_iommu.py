"""The built-in front-end behind a virtual IOMMU (VIRTIO_F_ACCESS_PLATFORM):
an IOVA space of its own, and the IOTLB responder that answers the
back-end's misses, as QEMU does for a vhost-user device behind
intel-iommu or virtio-iommu (QEMU hw/virtio/vhost.c vhost_device_iotlb_miss,
vhost-user.c vhost_user_send_device_iotlb_msg; vhost-user spec
"VHOST_USER_IOTLB_MSG", "VHOST_USER_BACKEND_IOTLB_MSG").

IOVA space. With ``iommu=True`` every address the device is given — the
three ring addresses of SET_VRING_ADDR and every descriptor address — is an
IOVA in one of three windows, each mapping all guest memory (gpa 0 ..
``mem_size``) linearly and far from both guest-physical addresses (from 0)
and front-end virtual addresses (below 2**47), so a back-end that takes an
IOVA for either fails visibly:

==================  =========================  ==============================
window              IOVA of gpa ``g``          what the guest's driver maps
==================  =========================  ==============================
rings               ``IOVA_RING_BASE + g``     coherent DMA: RW (Linux
                                               dma_alloc_coherent)
device-readable     ``IOVA_RO_BASE + g``       DMA_TO_DEVICE: RO (TX frames,
                                               blk header and OUT data)
device-writable     ``IOVA_WO_BASE + g``       DMA_FROM_DEVICE: WO (RX
                                               buffers, blk IN data, status)
==================  =========================  ==============================

A buffer is mapped in the window of its direction, as Linux gives every
dma_map a fresh IOVA: the same page of guest memory can be a TX frame now
and an RX buffer later, or hold a blk header and its status byte, without
one IOTLB entry needing two permissions.

Responder. The back-end sends a MISS (struct vhost_iotlb_msg, type
VHOST_IOTLB_MISS) on the back-end channel; :meth:`IommuFrontend.serve_misses`
reads them and answers each with a VHOST_IOTLB_UPDATE on the front-end
channel (with NEED_REPLY: REPLY_ACK is required, as QEMU requires it with an
IOMMU), chosen by the :class:`IotlbPolicy`: how much to map (the page, the
ring area or buffer slot, or the whole window), with which permission (the
window's, the one the miss asked for, or RW, overridden per vring, e.g. an
RX vring's buffers mapped read-only on purpose), and which vrings' misses to
leave unanswered. There is no thread: the responder runs in the caller's
thread, in :meth:`serve_misses` and in every
:meth:`~.driver_queue.QueueDriver.wait_calls` (so the net driver's receive
loops and the blk front-end's :meth:`complete` answer misses as they come),
which keeps the front-end channel's requests and replies in one order.
Back-end messages other than misses are kept for
:meth:`recv_backend_request`. Raw messages for hostile tests:
:meth:`IommuFrontend.send_iotlb` (any payload), :meth:`iotlb_update`,
:meth:`iotlb_invalidate`.
"""

from __future__ import annotations

import select
import struct
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import InspectorError, ProtocolError
from ..spec.vhost import (VHOST_ACCESS_NAMES, VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO,
                          VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_MISS, VHOST_IOTLB_MSG_STRUCT, VHOST_IOTLB_UPDATE)
from .protocol import FLAG_NEED_REPLY, FLAG_REPLY, VERSION, BackendRequest, ProtocolFeature, Request, pack_u64
from .transport import Message, recv_message, send_message

#: The three IOVA windows (see the module docstring): gpa ``g`` is at
#: ``BASE + g`` in each. Bit 47 and up: never a user-space address of x86-64.
IOVA_RING_BASE = 0x0000_8000_0000_0000
IOVA_RO_BASE = 0x0001_0000_0000_0000
IOVA_WO_BASE = 0x0001_8000_0000_0000
#: window base -> the permission the guest's driver maps it with.
IOVA_WINDOWS = {IOVA_RING_BASE: VHOST_ACCESS_RW, IOVA_RO_BASE: VHOST_ACCESS_RO, IOVA_WO_BASE: VHOST_ACCESS_WO}
IOTLB_PAGE = 4096

GRANULARITIES = ("page", "area", "all")
PERM_POLICIES = ("mapped", "asked", "rw")


@dataclass
class IotlbPolicy:
    """How :meth:`IommuFrontend.serve_misses` answers a miss.

    ``granularity``: "page" (the 4 KiB page of the missed IOVA), "area" (the
    vring's whole ring area, or the whole buffer slot), "all" (the whole
    window: all guest memory in one entry). ``perm``: "mapped" (the window's
    permission, as the guest's driver mapped it: rings RW, device-readable
    buffers RO, device-writable WO), "asked" (the permission in the miss),
    "rw". ``buffer_perm``: vring -> VHOST_ACCESS_* for that vring's buffers,
    over ``perm`` (e.g. ``{0: VHOST_ACCESS_RO}``: RX vring 0's buffers mapped
    read-only, a device write through them is the device's fault).
    ``silent``: vrings whose misses are read and counted but not answered;
    ``answer=False``: no miss is answered."""

    granularity: str = "page"
    perm: str = "mapped"
    buffer_perm: dict[int, int] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)
    answer: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InspectorError(f"IOTLB granularity {self.granularity!r}: use one of {GRANULARITIES}")
        if self.perm not in PERM_POLICIES:
            raise InspectorError(f"IOTLB perm policy {self.perm!r}: use one of {PERM_POLICIES}")
        for vring, perm in self.buffer_perm.items():
            if perm not in VHOST_ACCESS_NAMES:
                raise InspectorError(f"IOTLB buffer_perm of vring {vring}: {perm} is not VHOST_ACCESS_RO/WO/RW")


@dataclass
class IotlbMiss:
    """One MISS read from the back-end channel: ``iova``, ``perm``
    (VHOST_ACCESS_*) asked, ``vring`` whose ring or posted buffer the IOVA
    is (None: a free slot, or outside every window), ``answer`` (the
    (iova, size, uaddr, perm) of the UPDATE sent, None: not answered) and
    ``ack`` (the back-end's REPLY_ACK to it), ``time`` (time.monotonic())."""

    iova: int
    perm: int
    vring: int | None
    answer: tuple[int, int, int, int] | None
    ack: int | None
    time: float


def iotlb_payload(iova: int, size: int, uaddr: int, perm: int, type_: int) -> bytes:
    """struct vhost_iotlb_msg (linux/vhost_types.h), 32 bytes."""
    return VHOST_IOTLB_MSG_STRUCT.pack(iova, size, uaddr, perm, type_)


class IommuFrontend:
    """The IOMMU half of :class:`~.frontend.FrontendCore` (a mixin): IOVAs
    (:meth:`dma_addr`, :meth:`ring_addr`), the responder and raw IOTLB
    messages. The front-end provides ``iommu``, ``iotlb_policy``,
    ``mem_size``, ``uva``, ``ring_base``, ``ring_bytes``, ``slots_base``,
    ``slot_size``, ``queues``, ``sock``, ``backend_channel`` and
    ``protocol_features``.

    Counters: ``iotlb_misses_seen`` (every MISS read, re-sends too),
    ``iotlb_updates_sent``, ``iotlb_updates_rejected`` (non-zero REPLY_ACK),
    ``iotlb_misses_ignored`` (left unanswered by the policy or outside
    every window); ``iotlb_misses`` the last 4096 as :class:`IotlbMiss`."""

    def _init_iommu(self, iommu: bool, policy: IotlbPolicy | None) -> None:
        self.iommu = iommu
        self.iotlb_policy = policy or IotlbPolicy()
        self.iotlb_misses_seen = 0
        self.iotlb_updates_sent = 0
        self.iotlb_updates_rejected = 0
        self.iotlb_misses_ignored = 0
        self.iotlb_misses: deque[IotlbMiss] = deque(maxlen=4096)
        self._backend_pending: deque[Message] = deque()

    # --- IOVAs --------------------------------------------------------------------------------
    def dma_addr(self, gpa: int, writable: bool) -> int:
        """The address the device is given for a buffer at ``gpa``: with
        the IOMMU its IOVA in the device-writable or device-readable window,
        else ``gpa``."""
        if not self.iommu:
            return gpa
        return (IOVA_WO_BASE if writable else IOVA_RO_BASE) + gpa

    def ring_addr(self, gpa: int) -> int:
        """SET_VRING_ADDR's address of the ring area at ``gpa``: its IOVA
        with the IOMMU, else the front-end virtual address (vhost-user's
        ``*_user_addr``)."""
        return IOVA_RING_BASE + gpa if self.iommu else gpa + self.uva

    def iova_window(self, iova: int) -> tuple[int, int] | None:
        """(window base, gpa) of ``iova``, None when it is in no window."""
        for base in IOVA_WINDOWS:
            if base <= iova < base + self.mem_size:
                return base, iova - base
        return None

    def _owner(self, gpa: int, base: int) -> tuple[int | None, int, int]:
        """(vring, area gpa, area size) of guest memory at ``gpa``: a ring
        area (in the ring window only) or a buffer slot (vring None: free)."""
        if gpa < self.slots_base:   # the ring areas (slots_base is where the last one ends)
            vring = min(gpa // self.ring_bytes, len(self.ring_base) - 1)
            if base == IOVA_RING_BASE:
                return vring, self.ring_base[vring], self.ring_bytes
            return None, 0, self.slots_base   # a ring through a buffer window: no vring's buffer
        slot = (gpa - self.slots_base) // self.slot_size
        start = self.slots_base + slot * self.slot_size
        size = min(self.slot_size, self.mem_size - start)
        for q in self.queues:
            if slot in q.slots.values():
                return q.index, start, size
        return None, start, size

    # --- the responder ------------------------------------------------------------------------
    def _backend_fd_to_serve(self) -> int | None:
        """The back-end channel's fd while misses are to be served (the
        hook :meth:`~.driver_queue.QueueDriver.wait_calls` polls)."""
        if self.iommu and self.backend_channel is not None:
            return self.backend_channel.fileno()
        return None

    def serve_misses(self, timeout: float = 0.0) -> int:
        """Read the back-end channel for up to ``timeout`` s (0: what is
        there now, without waiting) and answer each MISS as
        ``iotlb_policy`` says; keep other back-end messages for
        :meth:`recv_backend_request`. Returns how many misses were read.
        ProtocolError for a malformed MISS or a closed channel."""
        if self.backend_channel is None:
            raise ProtocolError("no back-end channel: BACKEND_REQ was not negotiated")
        n = 0
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic()) if n == 0 else 0.0
            if not select.select([self.backend_channel], [], [], left)[0]:
                return n
            msg = recv_message(self.backend_channel)
            if msg is None:
                raise ProtocolError("back-end closed its back-end channel")
            msg.close_fds()
            if msg.request != BackendRequest.IOTLB_MSG:
                self._backend_pending.append(msg)
                continue
            if msg.flags & FLAG_NEED_REPLY:   # not asked by the contract; answered as QEMU's slave_read does
                send_message(self.backend_channel, msg.request, pack_u64(0), flags=VERSION | FLAG_REPLY)
            self._answer_miss(msg)
            n += 1

    def _answer_miss(self, msg: Message) -> None:
        if len(msg.payload) != VHOST_IOTLB_MSG_STRUCT.size:
            raise ProtocolError(f"BACKEND_IOTLB_MSG: payload of {len(msg.payload)} bytes, want "
                                f"{VHOST_IOTLB_MSG_STRUCT.size}")
        iova, _size, _uaddr, perm, type_ = VHOST_IOTLB_MSG_STRUCT.unpack(msg.payload)
        if type_ != VHOST_IOTLB_MISS:
            raise ProtocolError(f"BACKEND_IOTLB_MSG: type={type_}, want VHOST_IOTLB_MISS ({VHOST_IOTLB_MISS})")
        if perm not in VHOST_ACCESS_NAMES:
            raise ProtocolError(f"BACKEND_IOTLB_MSG: perm={perm} of the miss at {iova:#x} is not RO/WO/RW")
        self.iotlb_misses_seen += 1
        vring, answer = self._plan(iova, perm)
        miss = IotlbMiss(iova, perm, vring, None, None, time.monotonic())
        if answer is None:
            self.iotlb_misses_ignored += 1
        else:
            self._send_answer(miss, answer)
        self.iotlb_misses.append(miss)

    def _plan(self, iova: int, perm: int) -> tuple[int | None, tuple[int, int, int, int] | None]:
        """(owner vring, the UPDATE to answer with or None) for a miss."""
        where = self.iova_window(iova)
        if where is None:
            return None, None
        base, gpa = where
        vring, area_gpa, area_size = self._owner(gpa, base)
        return vring, self._choose(iova, perm, base, gpa, vring, area_gpa, area_size)

    def _send_answer(self, miss: IotlbMiss, answer: tuple[int, int, int, int]) -> None:
        miss.answer = answer
        miss.ack = self.iotlb_update(*answer)
        self.iotlb_updates_sent += 1
        if miss.ack:
            self.iotlb_updates_rejected += 1

    def answer_missed(self, vring: int | None = None) -> int:
        """Answer now, as ``iotlb_policy`` says now, the misses kept that
        went unanswered (of ``vring`` only, if given): one UPDATE per page
        and access, whether or not the back-end asks again. Returns how many
        UPDATEs were sent."""
        done: set[tuple[int, int]] = set()
        sent = 0
        for m in list(self.iotlb_misses):
            if m.answer is not None or (vring is not None and m.vring != vring):
                continue
            key = (m.iova // IOTLB_PAGE, m.perm)
            _, answer = self._plan(m.iova, m.perm)
            if answer is None:
                continue
            if key in done:
                m.answer, m.ack = answer, 0   # covered by the UPDATE just sent
                continue
            done.add(key)
            self._send_answer(m, answer)
            sent += 1
        return sent

    def _choose(self, iova, perm, base, gpa, vring, area_gpa, area_size):
        """The (iova, size, uaddr, perm) to answer a miss with, or None."""
        pol = self.iotlb_policy
        if not pol.answer or (vring is not None and vring in pol.silent):
            return None
        if pol.granularity == "all":
            start, size = 0, self.mem_size
        elif pol.granularity == "area":
            start, size = area_gpa, area_size
        else:
            start = gpa & ~(IOTLB_PAGE - 1)
            size = min(IOTLB_PAGE, self.mem_size - start)
        give = {"mapped": IOVA_WINDOWS[base], "asked": perm, "rw": VHOST_ACCESS_RW}[pol.perm]
        if base != IOVA_RING_BASE and vring in pol.buffer_perm:
            give = pol.buffer_perm[vring]
        return base + start, size, self.uva + start, give

    def missed(self, vring: int | None = None) -> list[IotlbMiss]:
        """The misses kept (``iotlb_misses``), of ``vring`` only if given."""
        return [m for m in self.iotlb_misses if vring is None or m.vring == vring]

    def premap(self, perm_policy: str = "mapped") -> None:
        """Map all three windows whole before the device asks (one UPDATE
        each, ``perm_policy`` "mapped" or "rw"): what a front-end that
        pre-populates the IOTLB does. ProtocolError when one is rejected."""
        for base, perm in IOVA_WINDOWS.items():
            ack = self.iotlb_update(base, self.mem_size, self.uva,
                                    VHOST_ACCESS_RW if perm_policy == "rw" else perm)
            if ack:
                raise ProtocolError(f"IOTLB_MSG UPDATE of window {base:#x}: REPLY_ACK {ack}")

    # --- raw IOTLB messages -------------------------------------------------------------------
    def send_iotlb(self, payload: bytes, *, need_reply: bool = True, fds=()) -> int | None:
        """Send VHOST_USER_IOTLB_MSG with any ``payload`` (hostile ones too)
        and, with ``need_reply``, return the REPLY_ACK's u64 (0: accepted).
        ProtocolError when the back-end closes or answers something else."""
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        send_message(self.sock, Request.IOTLB_MSG, payload, fds=fds, flags=flags)
        if not need_reply:
            return None
        reply = self.recv_reply()
        if reply.request != Request.IOTLB_MSG or len(reply.payload) != 8:
            raise ProtocolError(f"IOTLB_MSG: got {reply.name} with {len(reply.payload)} bytes, want its "
                                f"REPLY_ACK (8)")
        return struct.unpack("<Q", reply.payload)[0]

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int) -> int:
        """VHOST_IOTLB_UPDATE of ``size`` bytes at ``iova`` to front-end
        virtual address ``uaddr``; returns the REPLY_ACK (0: accepted)."""
        return self.send_iotlb(iotlb_payload(iova, size, uaddr, perm, VHOST_IOTLB_UPDATE))

    def iotlb_invalidate(self, iova: int, size: int) -> int:
        """VHOST_IOTLB_INVALIDATE of ``size`` bytes at ``iova``; returns the
        REPLY_ACK (0: accepted; after it the device no longer uses the old
        mapping, by the contract)."""
        return self.send_iotlb(iotlb_payload(iova, size, 0, 0, VHOST_IOTLB_INVALIDATE))

    def check_iommu_negotiated(self) -> None:
        """After the protocol features: the IOMMU needs REPLY_ACK and
        BACKEND_REQ (QEMU vhost_user_backend_init refuses without them).
        ProtocolError naming what is missing."""
        missing = [f.name for f in (ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ)
                   if not self.protocol_features & f]
        if missing:
            raise ProtocolError(f"an IOMMU front-end needs the protocol features REPLY_ACK and BACKEND_REQ; "
                                f"the back-end did not give {', '.join(missing)}")

