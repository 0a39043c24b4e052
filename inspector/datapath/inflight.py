"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split rings.

The vhost-user spec's "Inflight I/O tracking": the front-end keeps a shared
area (GET_INFLIGHT_FD gives it, SET_INFLIGHT_FD hands it back to each new
back-end) in which the back-end's data path records which heads it took from
the avail ring and has not yet returned in the used ring. A back-end that
restarts after a crash reads it and returns each such descriptor exactly once,
before anything new (the C side is inspector/csrc/vqd_inflight.c).

Layout (libvhost-user's VuVirtqInflight / the spec's QueueRegionSplit), little
endian, one area per queue of :func:`queue_area_size` bytes, queue ``i`` at
``i * queue_area_size(queue_size)``:

- header, 16 bytes (:data:`QUEUE_HEADER`): ``features`` u64 (0), ``version``
  u16 (1; 0 means never used), ``desc_num`` u16 (ring size),
  ``last_batch_head`` u16 (list of the last batch of used heads), ``used_idx``
  u16 (used->idx once that batch was cleared);
- ``desc_num`` descriptor states, 16 bytes each (:data:`DESC_STATE`):
  ``inflight`` u8, 5 bytes padding, ``next`` u16 (batch list link),
  ``counter`` u64 (the order heads were taken in).

:class:`InflightAreas` is what a device keeps: the area from
``set_inflight(area, num_queues, queue_size)`` (inspector/vhost_user/backend.py
maps it) and, for each started vring, the C tracking state that
:meth:`InflightAreas.attach` hooks into its :class:`~inspector.DeviceQueue`.
:func:`read_queue` decodes one queue's area in Python (tests, inspection).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from .._cffi import check, ffi as _ffi, lib as _lib
from ..errors import InspectorError, RingError
from ..layout import inflight_queue_size as queue_area_size
from ..spec.vhost import INFLIGHT_VERSION as VERSION
from .queue import DeviceQueue

logger = logging.getLogger("inspector.datapath.inflight")

QUEUE_HEADER = struct.Struct("<QHHHH")   # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")     # inflight, padding, next, counter
if (QUEUE_HEADER.size, DESC_STATE.size) != (_ffi.sizeof("struct vqd_inflight_region"),
                                            _ffi.sizeof("struct vqd_inflight_desc")):
    raise ImportError("struct vqd_inflight_region/desc do not match the spec's 16-byte layouts")


@dataclass
class QueueInflight:
    """One queue's area, decoded. ``inflight``: ``(counter, head)`` of every
    head flagged in flight, oldest first."""

    features: int
    version: int
    desc_num: int
    last_batch_head: int
    used_idx: int
    inflight: list[tuple[int, int]]

    @property
    def heads(self) -> list[int]:
        return [h for _, h in self.inflight]


def read_queue(area, index: int, queue_size: int) -> QueueInflight:
    """Decode queue ``index``'s area in ``area`` (a buffer holding the whole
    inflight area of queues of ``queue_size``). Reads at most ``queue_size``
    descriptor states whatever ``desc_num`` says. Raises InspectorError when
    the area is too small for queue ``index``."""
    size = queue_area_size(queue_size)
    off = index * size
    if index < 0 or off + size > len(area):
        raise InspectorError(f"inflight area of {len(area)} bytes has no queue {index} "
                             f"({size} bytes per queue of {queue_size})")
    features, version, desc_num, last_batch_head, used_idx = QUEUE_HEADER.unpack_from(area, off)
    flagged = []
    for i in range(min(desc_num, queue_size)):
        f, _, counter = DESC_STATE.unpack_from(area, off + QUEUE_HEADER.size + i * DESC_STATE.size)
        if f:
            flagged.append((counter, i))
    flagged.sort()
    return QueueInflight(features, version, desc_num, last_batch_head, used_idx, flagged)


class _Tracking:
    """The C state of one attached vring and the arrays it points to."""

    def __init__(self, num: int):
        self.state = _ffi.new("struct vqd_inflight *")
        self.resubmit = _ffi.new("struct vqd_inflight_slot[]", num)
        self.batch = _ffi.new("uint16_t[]", num)
        self.pop_log = _ffi.new("uint32_t[]", num)


class InflightAreas:
    """A device's inflight area and the tracking of its vrings.

    :meth:`set` takes the area SET_INFLIGHT_FD mapped (any writable buffer of
    at least ``num_queues * queue_area_size(queue_size)`` bytes; it is
    borrowed until :meth:`close`). :meth:`attach` starts tracking a vring's
    queue right after it is created and before it is serviced; without an
    area it does nothing. Not thread-safe: the device calls it under its lock.
    """

    def __init__(self):
        self.num_queues = 0
        self.queue_size = 0
        self._buf = None                      # cdata over the current area
        self._old: list = []                  # earlier areas' cdata, released at close()
        self._tracking: dict[int, _Tracking] = {}
        self.resubmitted: dict[int, int] = {}  # vring -> heads handed back at its last attach
        self.recovered: dict[int, int] = {}    # vring -> heads of an unfinished batch cleared

    @property
    def active(self) -> bool:
        return self._buf is not None

    def set(self, area, num_queues: int, queue_size: int) -> None:
        """Use ``area`` for vrings started from now on (rings already running
        keep the area they were attached to)."""
        need = num_queues * queue_area_size(queue_size)
        if len(area) < need:
            raise InspectorError(f"inflight area of {len(area)} bytes is smaller than {need} bytes "
                                 f"({num_queues} queue(s) of {queue_size})")
        buf = _ffi.from_buffer("uint8_t[]", area, require_writable=True)
        if self._buf is not None:
            self._old.append(self._buf)
        self._buf = buf
        self.num_queues, self.queue_size = num_queues, queue_size

    def attach(self, queue: DeviceQueue, index: int) -> int:
        """Track vring ``index`` serviced by ``queue`` in the area: a new
        area is initialised; a used one is recovered and the heads still in
        flight are handed back by ``queue``'s next pops, oldest first.
        Returns how many (0 without an area). Raises RingError (the queue is
        then broken, its reason naming the field) when the area does not fit
        the ring or is inconsistent, or the queue was broken already. A
        packed ring is not tracked (a warning; 0): the spec's packed layout
        is not implemented."""
        if self._buf is None:
            return 0
        if queue.layout == "packed":
            # The spec's packed layout (QueueRegionPacked) is not implemented:
            # the ring runs untracked, and a restart loses its in-flight buffers.
            logger.warning("vring %d: packed ring: inflight tracking (INFLIGHT_SHMFD) is split-only here; "
                           "this vring is not tracked", index)
            return 0
        if not 0 <= index < self.num_queues:
            raise RingError(f"vring {index}: the inflight area has {self.num_queues} queue(s) "
                            f"(SET_INFLIGHT_FD num_queues); this vring is not tracked")
        size = queue_area_size(self.queue_size)
        t = _Tracking(queue.num)
        rc = _lib.vqd_inflight_attach(queue.vq, t.state, self._buf + index * size, size,
                                      t.resubmit, t.batch, t.pop_log)
        check(rc, f"vring {index}: inflight tracking", queue.broken)
        self._tracking[index] = t
        self.resubmitted[index] = rc
        self.recovered[index] = t.state.recovered_batch
        if rc or t.state.recovered_batch:
            logger.info("vring %d: %d descriptor(s) in flight before the restart are handed back "
                        "first; %d of an unfinished used batch were already returned",
                        index, rc, t.state.recovered_batch)
        return rc

    def in_flight(self, queue: DeviceQueue) -> int:
        """Heads flagged in flight in ``queue``'s area now (0 untracked)."""
        return check(_lib.vqd_inflight_count(queue.vq), "inflight count")

    def close(self) -> None:
        """Release the areas (call once no queue uses them)."""
        self._tracking.clear()
        for b in self._old + ([self._buf] if self._buf is not None else []):
            _ffi.release(b)
        self._old = []
        self._buf = None


__all__ = [
    "DESC_STATE",
    "QUEUE_HEADER",
    "VERSION",
    "InflightAreas",
    "QueueInflight",
    "queue_area_size",
    "read_queue",
]
