"""Snapshot JSON of a running vqscope back-end (README.md, "Snapshot JSON").

Joins three things per vring: what the front-end configured (the back-end
core's VringConfig: size, addresses), what the device's data path counted
(QueueStats: kicks, calls, packets, last_avail_idx) and what the rings say
now (the C decoder over the shared memory). Reading never writes the rings.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..devices.base import QueueStats, VringConfig
from ..errors import InspectorError
from ..layout import avail_ring_size, desc_table_size, used_ring_size
from ..memory import GuestMemory
from ..ring import decoder
from ..spec.virtio import VIRTIO_RING_F_EVENT_IDX, has_feature


def queue_snapshot(device: str, vring: VringConfig, mem: GuestMemory, features: int,
                   stats: QueueStats, restat=None) -> dict[str, Any]:
    """One queue entry of the snapshot JSON for ``vring`` of ``device``.

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
    for _ in range(2):
        entry = _queue_snapshot(device, vring, mem, features, stats)
        if restat is None or not any(a["kind"] == "avail_idx_jump" for a in entry["anomalies"]):
            return entry
        fresh = restat()
        if fresh.last_avail_idx == stats.last_avail_idx:
            return entry  # the device did not move: the jump is the driver's
        stats = fresh
    return _queue_snapshot(device, vring, mem, features, stats)


def _queue_snapshot(device: str, vring: VringConfig, mem: GuestMemory, features: int,
                    stats: QueueStats) -> dict[str, Any]:
    event_idx = has_feature(features, VIRTIO_RING_F_EVENT_IDX)
    last_avail = stats.last_avail_idx if stats.last_avail_idx is not None else vring.base
    num = vring.num
    entry: dict[str, Any] = {
        "device": device, "index": vring.index, "layout": "split", "size": num,
        "features": features, "event_idx": event_idx,
        "avail_idx": 0, "used_idx": 0, "last_avail_idx": last_avail, "inflight": 0,
        "avail_flags": 0, "used_flags": 0, "used_event": None, "avail_event": None,
        "kicks": stats.kicks, "calls": stats.calls, "calls_suppressed": stats.calls_suppressed,
        "packets": stats.packets, "bytes": stats.bytes,
        "chains": [], "anomalies": [],
    }
    try:
        dec = decoder.snapshot_split(
            mem, num,
            mem.uva_to_gpa(vring.desc_uva, desc_table_size(num)),
            mem.uva_to_gpa(vring.avail_uva, avail_ring_size(num)),
            mem.uva_to_gpa(vring.used_uva, used_ring_size(num)),
            last_avail)
    except InspectorError as e:
        entry["anomalies"].append({"kind": "ring_unmapped", "detail": str(e)})
        return entry
    # Attributes of the RingSnapshot: the rings themselves are not part of
    # the entry, so as_dict() would build avail_ring/used_ring lists for nothing.
    entry["avail_idx"] = dec.avail_idx
    entry["used_idx"] = dec.used_idx
    entry["inflight"] = dec.inflight
    entry["avail_flags"] = dec.avail_flags
    entry["used_flags"] = dec.used_flags
    entry["chains"] = dec.chain_dicts()
    if event_idx:
        entry["used_event"] = dec.used_event
        entry["avail_event"] = dec.avail_event
    entry["anomalies"] = [{"kind": a.kind.value, "detail": a.detail} for a in dec.anomalies]
    if stats.broken:
        entry["anomalies"].append({"kind": "queue_broken", "detail": stats.broken})
    return entry


def backend_snapshot(server) -> dict[str, Any]:
    """Snapshot of every configured vring of every live connection of a
    VhostUserServer (inspector.vhost_user.server)."""
    queues = []
    for n, conn in enumerate(list(server.connections)):
        mem = conn.mem
        if mem is None:
            continue
        name = f"{conn.device.name}{getattr(conn, 'id', n)}"
        for vring in list(conn.vrings):
            if not vring.addr_set or vring.num == 0:
                continue
            entry = queue_snapshot(name, vring, mem, conn.features,
                                   conn.device.queue_stats(vring.index),
                                   restat=lambda i=vring.index, d=conn.device: d.queue_stats(i))
            # The vring's eventfds as this process holds them (what the
            # eventfd probe watches: vqscope probe --connect).
            entry["backend"] = {"kick_fd": vring.kick_fd, "call_fd": vring.call_fd}
            queues.append(entry)
    return {"source": f"vqscope serve {server.socket_path}", "time": time.time(), "pid": os.getpid(),
            "queues": queues}
