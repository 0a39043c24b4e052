"""The snapshot of a running vqscope back-end (inspector.snapshot.model;
README.md, "Snapshot JSON").

Joins three things per vring: what the front-end configured (the back-end
core's VringConfig: size, addresses), what the device's data path counted
(QueueStats: kicks, calls, packets, last_avail_idx, shadow_avail_idx,
dropped; faults on purpose as extras ``inject``) and what the rings say now
(the C decoder over the shared memory), with the device's type. Reading
never writes the rings.

Packed rings (VringConfig.packed, VIRTIO 1.2 §2.8) are decoded with
``snapshot_packed`` from the device's own positions (QueueStats:
last_avail_idx + last_avail_wrap_counter, next_used + used_wrap_counter:
``positions`` "device"); a ring not started yet is decoded from the base the
front-end set (its 32-bit packed form, both positions).
"""

from __future__ import annotations

import os
import time

from ..devices.base import QueueStats, VringConfig
from ..errors import InspectorError
from ..datapath.packed_queue import decode_vring_base
from ..layout import avail_ring_size, desc_table_size, packed_layout, used_ring_size
from ..memory import GuestMemory, iova_view
from ..ring import decoder
from ..ring.blk_request import attach_requests, memory_reader
from ..ring.anomalies import Anomaly, AnomalyKind
from ..snapshot.model import BackendFds, QueueEntry, Snapshot
from ..spec.virtio import VIRTIO_RING_F_EVENT_IDX, has_feature


def queue_snapshot(device: str, vring: VringConfig, mem: GuestMemory, features: int,
                   stats: QueueStats, restat=None, device_type: str | None = None, *,
                   device_positions: bool = True) -> QueueEntry:
    """One queue entry of the snapshot for ``vring`` of ``device`` (of
    VIRTIO §5 type ``device_type``, None: unknown).

    ``device_positions=False``: the device's positions are unknown (a
    back-end watched from outside, inspector/introspect/proxy_snapshot.py):
    ``last_avail_idx`` is None and the ring is decoded from what the ring
    itself shows (split: in flight from ``used_idx``; packed: positions
    derived from the descriptor flags), whatever ``stats`` and the base say.

    ``last_avail_idx`` is the device's (its data path) or, for a ring not
    started yet, the base the front-end set. A ring whose areas are not in
    ``mem`` gives an entry with zeros and an anomaly ``ring_unmapped``.

    ``restat``: a callable returning fresh QueueStats. The data path runs
    while we read: ``last_avail_idx`` taken before the ring read can be
    stale by more than a ring's worth once the driver has refilled (its
    bound is ``avail_idx - used_idx <= size``, §2.7.13.3, not relative to
    our older copy), which would show a false ``avail_idx_jump``. With
    ``restat`` such a jump is only reported if it survives re-reading the
    stats and the ring (up to two more times) with ``last_avail_idx`` moving.
    """
    if not device_positions:
        return _queue_snapshot(device, vring, mem, features, stats, device_type, device_positions=False)
    for _ in range(2):
        entry = _queue_snapshot(device, vring, mem, features, stats, device_type)
        if restat is None or not entry.has_anomaly(AnomalyKind.AVAIL_IDX_JUMP):
            return entry
        fresh = restat()
        if fresh.last_avail_idx == stats.last_avail_idx:
            return entry  # the device did not move: the jump is the driver's
        stats = fresh
    return _queue_snapshot(device, vring, mem, features, stats, device_type)


def _queue_snapshot(device: str, vring: VringConfig, mem: GuestMemory, features: int,
                    stats: QueueStats, device_type: str | None, device_positions: bool = True) -> QueueEntry:
    num = vring.num
    entry = QueueEntry(
        device=device, index=vring.index, size=num, features=features,
        event_idx=has_feature(features, VIRTIO_RING_F_EVENT_IDX),
        last_avail_idx=(None if not device_positions
                        else stats.last_avail_idx if stats.last_avail_idx is not None
                        else decode_vring_base(vring.base)[0] if vring.packed else vring.base),
        kicks=stats.kicks, calls=stats.calls, calls_suppressed=stats.calls_suppressed,
        packets=stats.packets, bytes=stats.bytes, device_type=device_type,
        shadow_avail_idx=stats.shadow_avail_idx, dropped=stats.dropped)
    if stats.inject is not None:
        entry.extras["inject"] = stats.inject
    for name, value in (stats.extras or {}).items():
        entry.extras[name] = value
    try:
        if vring.packed:
            dec = _decode_packed(vring, mem, stats, device_positions)
        else:
            dec = decoder.snapshot_split(
                mem, num,
                mem.uva_to_gpa(vring.desc_uva, desc_table_size(num)),
                mem.uva_to_gpa(vring.avail_uva, avail_ring_size(num)),
                mem.uva_to_gpa(vring.used_uva, used_ring_size(num)),
                entry.last_avail_idx)
    except InspectorError as e:
        entry.anomalies.append(Anomaly(AnomalyKind.RING_UNMAPPED, str(e)))
        return entry
    entry.fill_from_ring(dec)  # the rings themselves are not part of the entry
    _blk_requests(dec, mem, device_type)
    if stats.broken:
        entry.anomalies.append(Anomaly(AnomalyKind.QUEUE_BROKEN, stats.broken))
    return entry


def _blk_requests(dec, mem: GuestMemory, device_type: str | None) -> None:
    """A block device's in-flight chains carry their virtio-blk request
    (VIRTIO 1.2 §5.2.6, inspector.ring.blk_request), read from the shared
    memory now, while the chains are in flight; other devices' rings are
    left alone (nothing read, nothing built)."""
    if device_type == "block" and dec.n_chains:
        attach_requests(dec, memory_reader(mem))


def _decode_packed(vring: VringConfig, mem: GuestMemory, stats: QueueStats, device_positions: bool = True):
    """The packed ring of ``vring`` decoded from the device's positions
    (``stats`` of a running ring) or, before it runs, from the vring base;
    without ``device_positions``, from the descriptor flags alone."""
    lay = packed_layout(vring.num)
    if not device_positions:
        avail = avail_wrap = used = used_wrap = None
    elif stats.next_used is not None:
        avail, avail_wrap = stats.last_avail_idx, stats.last_avail_wrap_counter
        used, used_wrap = stats.next_used, stats.used_wrap_counter
    else:
        avail, avail_wrap, used, used_wrap = decode_vring_base(vring.base)
    return decoder.snapshot_packed(
        mem, vring.num,
        mem.uva_to_gpa(vring.desc_uva, lay.desc_size),
        mem.uva_to_gpa(vring.avail_uva, lay.driver_event_size),
        mem.uva_to_gpa(vring.used_uva, lay.device_event_size),
        next_used=used, used_wrap_counter=used_wrap,
        last_avail_idx=avail, last_avail_wrap_counter=avail_wrap)


#: Decoder anomalies that, on an IOVA-addressed ring, mean "not in the IOTLB (yet)".
UNTRANSLATED_YET = frozenset({AnomalyKind.ADDR_OUT_OF_RANGE, AnomalyKind.INDIRECT_OUT_OF_RANGE})


def iotlb_snapshot_extras(entry: QueueEntry, extras: dict) -> None:
    """The queue's ``iotlb`` extras (inspector/vhost_user/iotlb.py
    snapshot_extras) and, when it has waited over a second for an UPDATE,
    an ``iotlb_miss_unanswered`` anomaly; a ring that is not in the IOTLB is
    said to be waiting (not ``ring_unmapped``), buffers not in it yet are
    counted (``buffers_untranslated``), not called out of range."""
    entry.extras["iotlb"] = extras
    # A buffer IOVA the back-end has not needed yet is not in the IOTLB (it
    # asks when it gets there): not an error. One the front-end cannot
    # translate shows as an unanswered miss when the device reaches it.
    unknown = [a for a in entry.anomalies if a.kind in UNTRANSLATED_YET]
    if unknown:
        entry.anomalies = [a for a in entry.anomalies if a.kind not in UNTRANSLATED_YET]
    extras["buffers_untranslated"] = len(unknown)
    if extras.get("ring_refused"):
        entry.anomalies = [a for a in entry.anomalies if a.kind != AnomalyKind.RING_UNMAPPED]
        entry.anomalies.append(Anomaly(AnomalyKind.QUEUE_BROKEN, extras["ring_refused"]))
    miss = extras.get("miss")
    if miss is None:
        return
    if any(a.kind == AnomalyKind.RING_UNMAPPED for a in entry.anomalies):
        entry.anomalies = [a for a in entry.anomalies if a.kind != AnomalyKind.RING_UNMAPPED]
    waited = miss.get("waiting_s") or 0.0
    if waited > 1.0:
        entry.anomalies.append(Anomaly(AnomalyKind.IOTLB_MISS_UNANSWERED,
                                       f"waiting {waited:.1f} s for the translation of IOVA {miss['iova']:#x} "
                                       f"({miss['perm']}): the back-end sent an IOTLB miss (vhost-user "
                                       f"BACKEND_IOTLB_MSG) the front-end has not answered"))


def backend_snapshot(server) -> Snapshot:
    """Snapshot of every configured vring of every live connection of a
    VhostUserServer (inspector.vhost_user.server), with this process's
    ``pid`` and each queue's ``backend`` eventfds."""
    queues = []
    for n, conn in enumerate(list(server.connections)):
        mem = conn.mem
        if mem is None:
            continue
        name = f"{conn.device.name}{getattr(conn, 'id', n)}"
        control = getattr(conn, "iotlb", None)
        iotlb = control.iotlb if control is not None else None
        # VIRTIO_F_ACCESS_PLATFORM: rings and buffers are read at their IOVAs, through the IOTLB.
        dmem = iova_view(mem, iotlb.entries()) if iotlb is not None else mem
        for vring in list(conn.vrings):
            if not vring.addr_set or vring.num == 0:
                continue
            stats = conn.device.queue_stats(vring.index)
            entry = queue_snapshot(name, vring, dmem, conn.features, stats,
                                   restat=lambda i=vring.index, d=conn.device: d.queue_stats(i),
                                   device_type=conn.device.device_type)
            if iotlb is not None:
                iotlb_snapshot_extras(entry, control.snapshot_extras(vring, mem, stats.iotlb_miss))
            # The vring's eventfds as this process holds them (what the
            # eventfd probe watches: vqscope probe --connect).
            entry.backend = BackendFds(vring.kick_fd, vring.call_fd)
            queues.append(entry)
    return Snapshot(source=f"vqscope serve {server.socket_path}", time=time.time(), pid=os.getpid(),
                    queues=queues)
