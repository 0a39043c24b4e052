"""The vrings of one vhost-user connection: each vring's plain, untrusted
state (a VringConfig), when it starts and stops, and the requests that
configure it (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE, GET_VRING_BASE).

Start rule (vhost-user spec "Starting and stopping rings"): a vring is
started when it has a kick fd (or polling was asked for with the no-fd
bit), a size and addresses, the memory table is known, and it is enabled.
Rings are enabled at once when VHOST_USER_F_PROTOCOL_FEATURES was not
negotiated, otherwise only by SET_VRING_ENABLE 1. GET_VRING_BASE stops a
vring (and drops its kick and call fds, as libvhost-user and DPDK do); so do
RESET_OWNER / RESET_DEVICE and a disconnect. A change of fd, address, size
or memory table on a started vring stops it (taking its last_avail_idx as
the new base) and starts it again, so a device never uses an fd or a
mapping the core has closed.

Packed rings (VIRTIO_F_RING_PACKED acked with SET_FEATURES, VIRTIO 1.2 §2.8):
the three addresses are the descriptor ring (16·N bytes), the driver event
suppression area (avail_user_addr) and the device's (used_user_addr), 4
bytes each, aligned 16/4/4; N need not be a power of two; the base is the
vhost-user spec's packed form ("Vring descriptor indices for packed
virtqueues": bits 0-14 last avail index, bit 15 its wrap counter, bits 16-30
the used index, bit 31 its wrap counter; a front-end that sends only bits
0-15, as DPDK's vhost library does, means the used position is the avail
one: inspector/datapath/packed_queue.py decode_vring_base). GET_VRING_BASE
answers in the 32-bit form (QEMU's virtio_queue_packed_set_last_avail_idx
reads both halves). A packed ring's base is checked against the ring before
it starts (inspector/vhost_user/packed_resume.py): a front-end that lost our
positions (QEMU after a back-end crash sends those of the last start) gets
the device's used position the ring shows instead, with a warning. A base
equal to the one the vring's device handed back when it last stopped (same
size and addresses since, no reset) is the device's own and kept unchecked.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from ..devices.base import Device, VringConfig
from ..errors import InspectorError, MemoryAccessError
from ..layout import avail_ring_size, desc_table_size, is_power_of_two, used_ring_size
from ..memory import GuestMemory
from ..spec.virtio import (PVIRTQ_DESC_SIZE, PVIRTQ_EVENT_SUPPR_SIZE, VIRTIO_F_RING_PACKED, VIRTQ_MAX_SIZE,
                           has_feature)
from .memory_table import MappedMemory
from .packed_resume import resume_packed
from .protocol import VRING_IDX_MASK, VRING_NOFD_MASK, ProtocolViolation, VringAddr, VringState
from .transport import Message


def close_fd(fd: int | None) -> None:
    """Close ``fd`` if it is one; always returns None (for ``x = close_fd(x)``)."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    return None


def ring_area_sizes(num: int, packed: bool) -> tuple[int, int, int]:
    """Bytes of the areas at desc/avail/used_user_addr: split (VIRTIO 1.2
    §2.7) 16·N, 6+2·N, 6+8·N; packed (§2.8.10.1) 16·N, 4, 4."""
    if packed:
        return PVIRTQ_DESC_SIZE * num, PVIRTQ_EVENT_SUPPR_SIZE, PVIRTQ_EVENT_SUPPR_SIZE
    return desc_table_size(num), avail_ring_size(num), used_ring_size(num)


def check_ring_mapped(name: str, v: VringConfig, mem: GuestMemory) -> None:
    """Each ring area of ``v`` must lie inside one region of ``mem``
    (:func:`ring_area_sizes` of its layout); ProtocolViolation of request
    ``name`` otherwise."""
    sizes = ring_area_sizes(v.num, v.packed)
    for fld, addr, size in (("desc_user_addr", v.desc_uva, sizes[0]),
                            ("avail_user_addr", v.avail_uva, sizes[1]),
                            ("used_user_addr", v.used_uva, sizes[2])):
        try:
            mem.uva_to_gpa(addr, size)
        except MemoryAccessError as e:
            raise ProtocolViolation(name, f"vring[{v.index}].{fld}", addr,
                                    f"ring area of {size} bytes is not mapped: {e}") from None


def check_ring_size(name: str, field: str, num: int, packed: bool = False) -> None:
    """VIRTIO 1.2 §2.7: a split ring's Queue Size is a power of 2, at most
    32768; §2.8.10.1: a packed ring's is 1 to 32768."""
    if packed:
        if not 1 <= num <= VIRTQ_MAX_SIZE:
            raise ProtocolViolation(name, field, num,
                                    f"a packed ring's size is 1 to {VIRTQ_MAX_SIZE} (VIRTIO 1.2 §2.8.10.1)")
        return
    if num == 0 or not is_power_of_two(num) or num > VIRTQ_MAX_SIZE:
        raise ProtocolViolation(name, field, num,
                                f"a split ring's size is a power of two, 1 to {VIRTQ_MAX_SIZE} "
                                f"(VIRTIO 1.2 §2.7)")


class Vrings:
    """The vrings of ``device`` (``device.num_queues`` of them) over the
    connection's ``memory``. ``configs[i]`` is vring i's VringConfig (the
    connection's public ``vrings``). Handlers take (message, decoded
    payload), as BackendConnection dispatches them, and return the reply
    payload or None; the vring index was checked before they run."""

    def __init__(self, device: Device, memory: MappedMemory, logger: logging.Logger, conn_id: int = 0,
                 features: Callable[[], int] = lambda: 0):
        self.device = device
        self._features = features  # the virtio features the front-end acked (SET_FEATURES)
        self.memory = memory
        self.logger = logger
        self.id = conn_id
        self.num_queues = int(device.num_queues)
        self.configs = [VringConfig(index=i) for i in range(self.num_queues)]
        self._polling = [False] * self.num_queues  # kick "fd" is the no-fd bit
        #: VIRTIO_F_ACCESS_PLATFORM (inspector/vhost_user/iotlb.py): a vring's
        #: ring addresses are IOVAs, given to the device as translated by
        #: ``translate(config)`` (a copy with front-end addresses; None: not
        #: translatable yet, the vring waits). None: addresses are front-end ones.
        self.translate: Callable[[VringConfig], VringConfig | None] | None = None
        # The base each vring's device handed back when it last stopped, while
        # nothing says the ring changed since: a packed base equal to it is
        # the device's own knowledge, kept without checking it against the ring.
        self._own_base: list[int | None] = [None] * self.num_queues

    @property
    def packed(self) -> bool:
        """Whether the rings are packed (VIRTIO_F_RING_PACKED acked)."""
        return has_feature(self._features(), VIRTIO_F_RING_PACKED)

    # --- start / stop ---------------------------------------------------------
    def _ready(self, i: int) -> bool:
        v = self.configs[i]
        return (not v.started and v.enabled and v.addr_set and v.num > 0 and self.memory.mem is not None
                and (v.kick_fd is not None or self._polling[i]))

    def maybe_start(self, name: str, i: int) -> None:
        """Start vring ``i`` if it is ready (and not started)."""
        if not self._ready(i):
            return
        v, mem = self.configs[i], self.memory.mem
        v.packed = self.packed
        given = v
        if self.translate is not None:
            given = self.translate(v)
            if given is None:
                return   # a ring area misses in the IOTLB: started by the UPDATE that answers it
        check_ring_mapped(name, given, mem)
        if v.packed and v.base != self._own_base[i]:
            self._check_packed_base(given, mem)
            v.base = given.base
        v.started = True
        try:
            self.device.start_queue(given, mem)
        except BaseException:
            v.started = False
            raise
        self.logger.debug("connection %d: vring %d started (num %d, base %d)", self.id, i, v.num, v.base)

    def _check_packed_base(self, v: VringConfig, mem: GuestMemory) -> None:
        """Replace ``v.base`` by the device's used position the ring shows
        when the given one cannot be right (a front-end that lost our
        positions: QEMU after a back-end crash; inspector/vhost_user/packed_resume.py),
        with one warning naming both and why. A ring that cannot be read is
        left to the device (which reports it)."""
        try:
            r = resume_packed(mem, v.num, mem.uva_to_gpa(v.desc_uva, PVIRTQ_DESC_SIZE * v.num),
                              mem.uva_to_gpa(v.avail_uva, PVIRTQ_EVENT_SUPPR_SIZE),
                              mem.uva_to_gpa(v.used_uva, PVIRTQ_EVENT_SUPPR_SIZE), v.base)
        except InspectorError as e:
            self.logger.warning("connection %d: vring %d (packed): base %#x not checked against the ring: %s",
                                self.id, v.index, v.base, e)
            return
        if r.recovered:
            self.logger.warning("connection %d: vring %d (packed): %s", self.id, v.index, r.message())
            v.base = r.base

    def start_all(self, name: str) -> None:
        """Start every ready vring."""
        for i in range(self.num_queues):
            self.maybe_start(name, i)

    def stop(self, i: int) -> int:
        """Stop vring ``i`` if started; return its vring base (kept as base):
        last_avail_idx, or the 32-bit packed form."""
        v = self.configs[i]
        if v.started:
            v.started = False
            base = self.device.stop_queue(i)
            v.base = int(base) & (0xFFFFFFFF if v.packed else 0xFFFF)
            self._own_base[i] = v.base
            self.logger.debug("connection %d: vring %d stopped at %d", self.id, i, v.base)
        return v.base

    def running(self) -> list[int]:
        """Indices of the started vrings."""
        return [i for i, v in enumerate(self.configs) if v.started]

    def _reconfigure(self, name: str, i: int, apply: Callable[[VringConfig], None]) -> None:
        """Apply a change to vring ``i``: stop it if running, change, start again if ready."""
        self.stop(i)
        apply(self.configs[i])
        self.configs[i].packed = self.packed
        self.maybe_start(name, i)

    def drop_fds(self, i: int, *, kick=False, call=False, err=False) -> None:
        v = self.configs[i]
        if kick:
            v.kick_fd = close_fd(v.kick_fd)
            self._polling[i] = False
        if call:
            v.call_fd = close_fd(v.call_fd)
        if err:
            v.err_fd = close_fd(v.err_fd)

    def enable_all(self, name: str) -> None:
        """Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled (spec)."""
        for i, v in enumerate(self.configs):
            if not v.enabled:
                v.enabled = True
                self.maybe_start(name, i)

    def reset(self, enabled: bool) -> None:
        """RESET_OWNER / RESET_DEVICE: every vring stopped, its fds closed and
        its state back to the initial one (``enabled`` as a new vring is)."""
        for i in range(self.num_queues):
            self.stop(i)
            self.drop_fds(i, kick=True, call=True, err=True)
            self.configs[i] = VringConfig(index=i, enabled=enabled)
            self._own_base[i] = None

    def stop_all(self) -> None:
        """Stop every vring; a failing device is logged, not raised (the
        connection's fds must not leak because of it)."""
        for i in range(self.num_queues):
            try:
                self.stop(i)
            except Exception as e:
                self.logger.warning("connection %d: stop_queue(%d) failed: %s", self.id, i, e)

    def close(self) -> None:
        """Close every vring fd (after :meth:`stop_all` and the device's close)."""
        for i in range(self.num_queues):
            self.drop_fds(i, kick=True, call=True, err=True)

    # --- handlers -------------------------------------------------------------
    def set_num(self, msg: Message, st: VringState) -> None:
        check_ring_size(msg.name, "num", st.num, self.packed)
        if st.num != self.configs[st.index].num:
            self._own_base[st.index] = None
        self._reconfigure(msg.name, st.index, lambda v: setattr(v, "num", st.num))

    def set_addr(self, msg: Message, a: VringAddr) -> None:
        # VIRTIO 1.2 §2.7: alignment 16 (desc), 2 (avail), 4 (used);
        # §2.8.10.1 (packed): 16, 4 (driver event suppression), 4 (device's).
        mem = self.memory.mem
        packed = self.packed
        rule = "VIRTIO 1.2 §2.8.10.1" if packed else "VIRTIO 1.2 §2.7"
        for fld, addr, align in (("desc_user_addr", a.desc_user_addr, 16),
                                 ("avail_user_addr", a.avail_user_addr, 4 if packed else 2),
                                 ("used_user_addr", a.used_user_addr, 4)):
            if addr % align:
                raise ProtocolViolation(msg.name, fld, addr, f"must be {align}-byte aligned ({rule})")
            if mem is not None and self.translate is None:   # IOVAs are checked when the ring starts
                try:
                    mem.uva_to_gpa(addr, 1)
                except MemoryAccessError as e:
                    raise ProtocolViolation(msg.name, fld, addr, str(e)) from None

        def apply(v: VringConfig) -> None:
            if (v.desc_uva, v.avail_uva, v.used_uva) != (a.desc_user_addr, a.avail_user_addr,
                                                          a.used_user_addr):
                self._own_base[a.index] = None
            v.desc_uva, v.avail_uva, v.used_uva = a.desc_user_addr, a.avail_user_addr, a.used_user_addr
            v.log_guest_addr = a.log_guest_addr
            v.addr_flags = a.flags
            v.addr_set = True

        self._reconfigure(msg.name, a.index, apply)

    def set_base(self, msg: Message, st: VringState) -> None:
        if self.packed:
            num = self.configs[st.index].num
            for what, idx in (("last avail index (bits 0-14)", st.num & 0x7FFF),
                              ("used index (bits 16-30)", st.num >> 16 & 0x7FFF)):
                if num and idx >= num:
                    raise ProtocolViolation(msg.name, "num", st.num,
                                            f"a packed ring's {what} {idx} is not below its size {num} "
                                            f"(vhost-user: vring descriptor indices for packed virtqueues)")
        elif st.num >= 1 << 16:
            raise ProtocolViolation(msg.name, "num", st.num,
                                    "a split ring's last_avail_idx is 16 bits (VIRTIO_F_RING_PACKED "
                                    "was not acked)")
        self._reconfigure(msg.name, st.index, lambda v: setattr(v, "base", st.num))

    def get_base(self, msg: Message, st: VringState) -> bytes:
        v = self.configs[st.index]
        if v.num == 0 and not v.addr_set and not v.started:
            # QEMU and DPDK ask only for rings they set up (vhost_virtqueue_stop
            # skips the others); a base invented for a ring never set up would
            # be handed to the driver as the device's progress.
            raise ProtocolViolation(msg.name, "index", st.index,
                                    "vring was never configured (no SET_VRING_NUM or SET_VRING_ADDR "
                                    "since the connection or the last reset)")
        base = self.stop(st.index)
        self.drop_fds(st.index, kick=True, call=True)
        return VringState(st.index, base).pack()

    def _set_fd(self, msg: Message, value: int, attr: str) -> None:
        index = value & VRING_IDX_MASK
        nofd = bool(value & VRING_NOFD_MASK)
        fd = None if nofd else msg.take_fd()

        def apply(v: VringConfig) -> None:
            close_fd(getattr(v, attr))
            setattr(v, attr, fd)
            if attr == "kick_fd":
                self._polling[index] = nofd

        try:
            self._reconfigure(msg.name, index, apply)
        except BaseException:
            if getattr(self.configs[index], attr) != fd:
                close_fd(fd)
            raise

    def set_kick(self, msg: Message, value: int) -> None:
        self._set_fd(msg, value, "kick_fd")

    def set_call(self, msg: Message, value: int) -> None:
        self._set_fd(msg, value, "call_fd")

    def set_err(self, msg: Message, value: int) -> None:
        self._set_fd(msg, value, "err_fd")

    def set_enable(self, msg: Message, st: VringState) -> None:
        if st.num > 1:
            raise ProtocolViolation(msg.name, "num", st.num, "enable is 0 or 1")
        v = self.configs[st.index]
        if st.num:
            v.enabled = True
            self.maybe_start(msg.name, st.index)
        else:
            self.stop(st.index)
            v.enabled = False
