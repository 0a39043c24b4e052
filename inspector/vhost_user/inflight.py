"""Inflight I/O tracking of one vhost-user connection: GET_INFLIGHT_FD
allocates the shared area, SET_INFLIGHT_FD maps the one the front-end hands
back and gives it to the device (vhost-user spec "Inflight I/O tracking",
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD). The area's layout is the data path's
(inspector/datapath/inflight.py); here it is only sized, checked and mapped.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from typing import Callable

from ..devices.base import Device
from ..layout import inflight_queue_size
from .memory_table import PAGE, fd_size, map_fd
from .protocol import InflightPayload, ProtocolFeature, ProtocolViolation
from .transport import Message
from .vrings import check_ring_size


class InflightTracking:
    """The inflight areas of a connection to ``device`` (``num_queues``
    vrings). ``negotiated()`` returns the connection's protocol features
    (INFLIGHT_SHMFD must be among them). ``area``: the mapped
    SET_INFLIGHT_FD area in use, or None."""

    def __init__(self, device: Device, num_queues: int, negotiated: Callable[[], int],
                 logger: logging.Logger, conn_id: int = 0):
        self.device = device
        self.num_queues = num_queues
        self.negotiated = negotiated
        self.logger = logger
        self.id = conn_id
        self.area: mmap.mmap | None = None
        self._stale: list[mmap.mmap] = []

    def _check(self, name: str, inf: InflightPayload) -> None:
        """Checks common to GET/SET_INFLIGHT_FD."""
        features = self.negotiated()
        if not features & ProtocolFeature.INFLIGHT_SHMFD:
            raise ProtocolViolation(name, "protocol_features", features,
                                    "INFLIGHT_SHMFD (bit 12) was not negotiated")
        if inf.num_queues == 0 or inf.num_queues > self.num_queues:
            raise ProtocolViolation(name, "num_queues", inf.num_queues,
                                    f"the device has {self.num_queues} vring(s): give 1 to {self.num_queues}")
        check_ring_size(name, "queue_size", inf.queue_size)

    def get_fd(self, msg: Message, inf: InflightPayload) -> tuple[bytes, list[int]]:
        """GET_INFLIGHT_FD: allocate a zeroed area for ``num_queues`` queues
        of ``queue_size`` (a memfd sealed against resizing, as libvhost-user)
        and answer with its size and fd. The area is used once the front-end
        passes it back with SET_INFLIGHT_FD."""
        self._check(msg.name, inf)
        size = inf.num_queues * inflight_queue_size(inf.queue_size)
        fd = os.memfd_create("vqscope-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        return InflightPayload(size, 0, inf.num_queues, inf.queue_size).pack(), [fd]

    def set_fd(self, msg: Message, inf: InflightPayload) -> None:
        """SET_INFLIGHT_FD: map the front-end's area (MAP_SHARED, read-write:
        the data path records in-flight heads there) and hand it to the
        device (``device.set_inflight(area, num_queues, queue_size)``:
        ``area`` is an mmap of exactly ``mmap_size`` bytes, owned here and
        closed after the device's close() or the next SET_INFLIGHT_FD)."""
        name = msg.name
        self._check(name, inf)
        need = inf.num_queues * inflight_queue_size(inf.queue_size)
        if inf.mmap_size < need:
            raise ProtocolViolation(name, "mmap_size", inf.mmap_size,
                                    f"{inf.num_queues} queue(s) of {inf.queue_size} need {need} bytes "
                                    f"({inflight_queue_size(inf.queue_size)} per queue)")
        if inf.mmap_offset % PAGE:
            raise ProtocolViolation(name, "mmap_offset", inf.mmap_offset,
                                    f"must be a multiple of the page size ({PAGE}) to be mapped")
        fd = msg.fds[0]
        size = fd_size(name, "fd", fd)
        if inf.mmap_offset + inf.mmap_size > size:
            raise ProtocolViolation(name, "mmap_offset", inf.mmap_offset,
                                    f"+ mmap_size {inf.mmap_size:#x} runs past the end of the fd "
                                    f"({size:#x} bytes)")
        # The area is read when rings start (vqd_inflight_attach), outside the
        # data path's SIGBUS guard: only an area that cannot shrink is taken.
        # Every area comes from a back-end's GET_INFLIGHT_FD, and ours (like
        # libvhost-user's) is a memfd sealed F_SEAL_SHRINK.
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ProtocolViolation(name, "fd", fd, f"the inflight area is not sealed against shrinking "
                                                    f"(F_SEAL_SHRINK; seals {seals:#x}): a truncation "
                                                    f"would fault the back-end")
        area = map_fd(name, "fd", fd, inf.mmap_offset, inf.mmap_size).map
        msg.close_fds()
        try:
            self.device.set_inflight(area, inf.num_queues, inf.queue_size)
        except BaseException:
            area.close()
            raise
        if self.area is not None:
            self._stale.append(self.area)
        self.area = area
        self._stale = self._unmap(self._stale)

    @staticmethod
    def _unmap(maps: list[mmap.mmap]) -> list[mmap.mmap]:
        """Close ``maps``; those a buffer still exports are returned."""
        still = []
        for m in maps:
            try:
                m.close()
            except BufferError:
                still.append(m)
        return still

    def close(self) -> None:
        """Unmap every area (after the device's close()); one still in use is
        unmapped when its last user releases it."""
        if self._unmap(self._stale + ([self.area] if self.area is not None else [])):
            self.logger.warning("connection %d: the inflight area is still in use; it will be "
                                "unmapped when its last user releases it", self.id)
        self.area = None
        self._stale = []
