"""The snapshot of a ``vqscope proxy`` (inspector/vhost_user/proxy.py): every
vring of every proxied connection, decoded from guest memory the proxy
mapped read-only, in the same Snapshot model as ``serve``'s
(inspector/introspect/snapshot.py queue_snapshot).

What passes on the socket gives sizes, addresses, features and the memory
table; the back-end's private positions are never known (the proxy never
sends GET_VRING_BASE): ``last_avail_idx`` is None, a split ring's in-flight
chains are walked from ``used_idx``, a packed ring's positions are derived
from the descriptor flags. Each queue's ``extras["proxy"]`` says what the
proxy saw: {"connection", "enabled", "started", "kicks", "calls" (None
without --count-notifications), "link": the connection's per-direction
message, byte and fd counts in and out, "proxy_originated": 0}. The
snapshot's ``notifications_counted`` (false without --count-notifications)
tells the doctor that the 0 kicks and calls are not observations.

VIRTIO_F_ACCESS_PLATFORM: the proxy mirrors the IOTLB the front-end gives
the back-end (its IOTLB_MSG UPDATEs and INVALIDATEs, and the back-end's
misses on the request channel) and reads the rings at their IOVAs through
it, with the same ``iotlb`` extras as ``serve`` (no ``miss``: the back-end's
wait is its own).
"""

from __future__ import annotations

import os
import time

from ..devices.base import QueueStats
from ..snapshot.model import Snapshot
from ..memory import iova_view
from ..vhost_user.iotlb import iotlb_extras
from .snapshot import iotlb_snapshot_extras, queue_snapshot


def proxy_snapshot(proxy) -> Snapshot:
    """Snapshot of a VhostUserProxy: device ``proxy{N}`` (N: connection id)
    per connection, ``device_type`` from ``proxy.device_type_of`` (the
    option, or inferred), ``pid`` this process's."""
    queues = []
    for conn in list(proxy.connections):
        state = conn.state
        mem = state.mem
        if mem is None or state.features is None:
            continue
        dtype = proxy.device_type_of(state)
        link = conn.link_stats()
        # VIRTIO_F_ACCESS_PLATFORM: read at the IOVAs through the IOTLB the front-end gave (mirrored).
        dmem = iova_view(mem, state.iotlb.entries()) if state.iotlb is not None else mem
        for vring in state.snapshot_vrings():
            kicks, calls = conn.notification_counts(vring.index)
            entry = queue_snapshot(f"proxy{conn.id}", vring, dmem, state.features,
                                   QueueStats(kicks=kicks or 0, calls=calls or 0), device_type=dtype,
                                   device_positions=False)
            if state.iotlb is not None:
                iotlb_snapshot_extras(entry, iotlb_extras(state.iotlb, vring, mem))
            entry.extras["proxy"] = {"connection": conn.id, "enabled": vring.enabled, "started": vring.started,
                                     "kicks": kicks, "calls": calls, "link": link}
            queues.append(entry)
    return Snapshot(source=f"vqscope proxy {proxy.listen_path}", time=time.time(), pid=os.getpid(),
                    queues=queues, extras={"notifications_counted": bool(proxy.count_notifications)})
