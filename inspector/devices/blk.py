"""virtio-blk (VIRTIO 1.2 §5.2) behind the vhost-user back-end: ``vqscope serve blk``.

Vring i is requestq i (§5.2.2). Each started requestq gets a worker thread
(inspector/devices/blk_worker.py) that runs the C engine of
inspector/datapath/blk.py (``BlkQueue``: io_uring, many requests in flight
per queue, no GIL) on a :class:`~inspector.datapath.blk.BlkDisk`, the
backing store (a raw image, a block device, or a RAM disk). The disk
belongs to whoever made it (``vqscope serve blk``: one for the whole
server, so a RAM disk outlives a reconnect); the device never closes it.

Config space (§5.2.4, struct virtio_blk_config, spec VIRTIO_BLK_CONFIG_FIELDS):
capacity, size_max, seg_max, blk_size, writeback, num_queues, the discard
and write-zeroes limits. GET_CONFIG answers any range inside the 72 bytes
of VIRTIO 1.2 (QEMU 7.2 asks for its own sizeof, 60). SET_CONFIG may change
only ``writeback`` (VIRTIO_BLK_F_CONFIG_WCE, §5.2.5: 0 writethrough, 1
writeback); anything else is refused with the field named.

Requests (§5.2.6), their statuses and the bad-request kinds are the data
path's; their counters are each queue's snapshot extras ``blk`` (the dict
documented in BRIEF/README: requests by type, statuses, ``bad_requests``
by kind, ``in_flight``, ``resubmitted``, bytes, ``recent``).

Crash safety: with an inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
inspector/datapath/inflight.py) every request taken from a ring is marked
in flight until it is used; a back-end started on the area a killed one
left hands those requests to the engine first, each once, and counts them
(``resubmitted``).

Faults on purpose (inspector/faults.py, ``--inject``): ``hold-io`` (the
engine takes requests but submits none until the fault ends) and
``drop-calls``.
"""

from __future__ import annotations

import threading

from ..datapath.blk import BAD_REQUEST_KINDS, RECENT, REQUEST_CLASSES, BlkDisk, BlkQueue
from ..datapath.queue import EVENT_LOG_DEFAULT
from ..errors import ArgumentError, DeviceError, InspectorError
from ..faults import BLK_FAULTS, Fault, check_vrings
from ..memory import GuestMemory
from ..spec.virtio import (VIRTIO_BLK_CONFIG_FIELDS, VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_F_BLK_SIZE,
                           VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
                           VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
                           VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_NAMES, VIRTIO_BLK_SECTOR_SIZE,
                           VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
                           VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, has_feature)
from .base import Device, QueueStats, VringConfig
from .blk_worker import _QueueWorker, logger
from .vring import RingTable, StartedRing

#: Every bad-request kind the data path counts (snapshot extras
#: ``blk.bad_requests``), in the C engine's order (csrc/vqd_blk.h
#: VQD_BLK_BAD_*, named there once); each kind's status: README "virtio-blk
#: back-end", and inspector/analysis/rules.py BLK_BAD_MEANING for the doctor.
BLK_BAD_REQUEST_KINDS = BAD_REQUEST_KINDS

#: The blk counters that describe the present, not a sum over a ring's starts.
_NOT_SUMMED = ("in_flight", "recent")
_WRITEBACK_OFFSET = VIRTIO_BLK_CONFIG_FIELDS["writeback"][0]


def _zero_counters() -> dict:
    """The extras ``blk`` dict of a queue that has done nothing."""
    return {"requests": dict.fromkeys(REQUEST_CLASSES, 0), "status": dict.fromkeys(VIRTIO_BLK_S_NAMES.values(), 0),
            "bad_requests": dict.fromkeys(BLK_BAD_REQUEST_KINDS, 0), "in_flight": 0, "resubmitted": 0,
            "bytes_read": 0, "bytes_written": 0, "recent": []}


def _add_counters(total: dict, more: dict) -> None:
    """Add the numbers of ``more`` (nested dicts of ints) into ``total``."""
    for k, v in more.items():
        if k in _NOT_SUMMED:
            continue
        if isinstance(v, dict):
            _add_counters(total.setdefault(k, {}), v)
        elif isinstance(v, int):
            total[k] = total.get(k, 0) + v


class BlkDevice(Device):
    """A virtio-blk device on ``disk`` (a BlkDisk, borrowed: the caller
    closes it after the device) with ``num_queues`` requestqs (1 to 64).

    ``readonly`` is the disk's (VIRTIO_BLK_F_RO offered). ``depth``: requests
    each queue's engine keeps in flight at most. ``event_capacity``: entries
    of each vring's event log (a power of two; 0: none). ``faults``: device
    faults on purpose (inspector/faults.py: ``hold-io``, ``drop-calls``),
    each counted from the start of its vring, every time it starts;
    ArgumentError for a fault of another device or a vring beyond
    ``num_queues``.

    Features offered: VERSION_1, SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, MQ
    (always, so that ``num_queues`` in the config space is always valid,
    as libvhost-user's vhost-user-blk does), DISCARD, WRITE_ZEROES,
    CONFIG_WCE, EVENT_IDX, INDIRECT_DESC, RO for a read-only disk, and
    VIRTIO_F_RING_PACKED unless ``packed=False`` (the driver picks the
    layout; not VIRTIO_F_IN_ORDER: requests complete out of order). Crash
    safety (the inflight area) covers split rings only: a packed ring runs
    untracked, with a warning (inspector/datapath/inflight.py).
    """

    name = "blk"
    device_type = "block"
    supports_inflight = True

    def __init__(self, disk: BlkDisk, num_queues: int = 1, *, depth: int = 128,
                 event_capacity: int | None = None, faults: list[Fault] | tuple[Fault, ...] = (),
                 packed: bool = True):
        if not 1 <= num_queues <= 64:
            raise InspectorError(f"num_queues {num_queues} is invalid: give 1 to 64 request queues")
        for f in faults:
            if f.kind not in BLK_FAULTS:
                raise ArgumentError(f"fault {str(f)!r}: {f.kind} is not a device fault of virtio-blk "
                                    f"(use one of {', '.join(BLK_FAULTS)})")
        check_vrings(faults, num_queues, f"this blk device ({num_queues} request queue(s))")
        self.disk = disk
        self.num_queues = num_queues
        self.depth = depth
        self.offer_packed = packed
        self.faults = tuple(faults)
        self.event_capacity = EVENT_LOG_DEFAULT if event_capacity is None else event_capacity
        self.event_idx = False
        self._lock = threading.Lock()
        self._table = RingTable(self.event_capacity)
        self._engines: dict[int, BlkQueue] = {}
        self._workers: dict[int, _QueueWorker] = {}
        self._blk_totals: dict[int, dict] = {}       # blk counters of retired engines, by vring
        self._last_blk: dict[int, dict] = {}         # a retired engine's last counters (its ``recent``)

    # --- Device (inspector/devices/base.py) ------------------------------------------
    def features(self) -> int:
        f = 0
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
                    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC):
            f |= 1 << bit
        if self.disk.readonly:
            f |= 1 << VIRTIO_BLK_F_RO
        if self.offer_packed:
            f |= 1 << VIRTIO_F_RING_PACKED
        return f

    def set_features(self, features: int) -> None:
        self.event_idx = has_feature(features, VIRTIO_RING_F_EVENT_IDX)

    def config(self) -> bytes:
        """struct virtio_blk_config (§5.2.4), VIRTIO_BLK_CONFIG_SIZE bytes,
        little endian; geometry, topology and secure erase stay zero (not
        offered)."""
        d = self.disk
        sector_units = max(1, d.blk_size // VIRTIO_BLK_SECTOR_SIZE)
        values = {"capacity": d.capacity, "size_max": d.size_max, "seg_max": d.seg_max,
                  "blk_size": d.blk_size, "writeback": 1 if d.writeback else 0,
                  "num_queues": self.num_queues,
                  "max_discard_sectors": d.max_discard_sectors, "max_discard_seg": d.max_discard_seg,
                  "discard_sector_alignment": sector_units,
                  "max_write_zeroes_sectors": d.max_write_zeroes_sectors,
                  "max_write_zeroes_seg": d.max_write_zeroes_seg, "write_zeroes_may_unmap": 1}
        cfg = bytearray(VIRTIO_BLK_CONFIG_SIZE)
        for name, value in values.items():
            off, size = VIRTIO_BLK_CONFIG_FIELDS[name]
            cfg[off:off + size] = int(value).to_bytes(size, "little")
        return bytes(cfg)

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of :meth:`config`; DeviceError
        when the range is not inside its VIRTIO_BLK_CONFIG_SIZE bytes."""
        if offset < 0 or size < 0 or offset + size > VIRTIO_BLK_CONFIG_SIZE:
            raise DeviceError(f"blk: GET_CONFIG offset {offset} size {size} is outside struct "
                              f"virtio_blk_config ({VIRTIO_BLK_CONFIG_SIZE} bytes)")
        return self.config()[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: only ``writeback`` (offset 32, 0 or 1) may change
        (§5.2.5, VIRTIO_BLK_F_CONFIG_WCE); a write that covers other fields
        must give their current values. DeviceError naming the field and
        value otherwise."""
        end = offset + len(data)
        if offset < 0 or end > VIRTIO_BLK_CONFIG_SIZE:
            raise DeviceError(f"blk: SET_CONFIG offset {offset} size {len(data)} is outside struct "
                              f"virtio_blk_config ({VIRTIO_BLK_CONFIG_SIZE} bytes)")
        cur = self.config()
        for name, (off, size) in VIRTIO_BLK_CONFIG_FIELDS.items():
            lo, hi = max(off, offset), min(off + size, end)
            if lo >= hi or name == "writeback":
                continue
            if data[lo - offset:hi - offset] != cur[lo:hi]:
                raise DeviceError(f"blk: SET_CONFIG may change only writeback (offset {_WRITEBACK_OFFSET}); "
                                  f"field {name} is read-only (value "
                                  f"{int.from_bytes(cur[off:off + size], 'little')})")
        if offset <= _WRITEBACK_OFFSET < end:
            wce = data[_WRITEBACK_OFFSET - offset]
            if wce not in (0, 1):
                raise DeviceError(f"blk: SET_CONFIG writeback {wce} is invalid: 0 (writethrough) or "
                                  f"1 (writeback), §5.2.5")
            if bool(wce) != self.disk.writeback:
                logger.info("blk: the driver set the cache to %s", "writeback" if wce else "writethrough")
            self.disk.writeback = bool(wce)

    def set_inflight(self, area, num_queues: int, queue_size: int) -> None:
        """SET_INFLIGHT_FD's area (inspector/datapath/inflight.py), used by the
        rings started from now on."""
        with self._lock:
            self._table.inflight.set(area, num_queues, queue_size)

    def start_queue(self, vring: VringConfig, mem: GuestMemory) -> None:
        i = vring.index
        if not 0 <= i < self.num_queues:
            raise InspectorError(f"blk: vring {i} does not exist: this device has {self.num_queues} "
                                 f"request queue(s)")
        with self._lock:
            self._stop(i)
            ring = StartedRing(vring, mem, self.event_idx, self.event_capacity,
                               tuple(f for f in self.faults if f.vring == i), iotlb=self.iotlb)
            n = self._table.add(ring)
            if n:
                logger.info("vring %d: resubmitting %d request(s) left in flight by the last back-end", i, n)
            engine = BlkQueue(ring.q, self.disk, depth=self.depth)
            if engine.engine != "io_uring":
                logger.warning("vring %d: io_uring is not available (%s): synchronous I/O, one request "
                               "at a time", i, engine.uring_error)
            self._engines[i] = engine
            w = _QueueWorker(ring, engine, self.on_needs_reset)
            self._workers[i] = w
            w.start()

    def stop_queue(self, index: int) -> int:
        with self._lock:
            if index not in self._table.rings:
                return self._table.last_base(index)
            return self._stop(index)

    def queue_stats(self, index: int) -> QueueStats:
        """Counters of vring ``index`` over every start of it: those of
        every ring (RingTable.stats; ``packets`` are the requests completed
        and ``bytes`` the data bytes read and written) and ``extras``
        ``{"blk": ...}``, the engine's counters summed over every start
        (``in_flight``: the running engine's; ``recent``: the last
        completions of the last two starts)."""
        with self._lock:
            blk = _zero_counters()
            _add_counters(blk, self._blk_totals.get(index, {}))
            engine = self._engines.get(index)
            if engine is not None:
                now = engine.counters()
                _add_counters(blk, now)
                blk["in_flight"] = now["in_flight"]
                blk["recent"] = (self._last_blk.get(index, {}).get("recent", []) + now["recent"])[-RECENT:]
            elif index in self._last_blk:
                blk["recent"] = list(self._last_blk[index]["recent"])
            st = self._table.stats(index, [f for f in self.faults if f.vring == index])
            st.packets = sum(blk.get("requests", {}).values())
            st.bytes = blk.get("bytes_read", 0) + blk.get("bytes_written", 0)
            st.extras = {"blk": blk}
            return st

    def drain_events(self, index: int) -> tuple[bytearray, int]:
        """Device.drain_events; safe while the worker runs."""
        with self._lock:
            return self._table.drain_events(index)

    def close(self) -> None:
        """Stop every queue (their I/O finished or cancelled by the engine)
        and release the inflight areas; the disk stays open (its owner's)."""
        with self._lock:
            for i in list(self._table.rings):
                self._stop(i)
            self._table.close()

    # --- helpers (called with the lock held) ----------------------------------------------
    def _stop(self, index: int) -> int:
        """Stop vring ``index``'s worker and engine and retire its ring;
        its vring base."""
        w = self._workers.pop(index, None)
        if w is not None:
            w.stop()
        engine = self._engines.pop(index, None)
        if engine is not None:
            try:
                engine.close()   # completes what it holds (hold-io) and waits for the I/O
            finally:
                last = engine.counters()
                _add_counters(self._blk_totals.setdefault(index, {}), last)
                self._last_blk[index] = last
        base = self._table.remove(index)
        return self._table.last_base(index) if base is None else base


__all__ = ["BLK_BAD_REQUEST_KINDS", "BlkDevice"]
