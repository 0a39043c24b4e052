"""Timed events: the kicks, calls, handler runs and notifications that move
a queue, from whichever source saw them (the back-end's data path, a BCC
probe). Snapshots say where a queue *is*; events say what *happened* to it,
and when. The recorder stores them, the exporter draws them, the TUI counts
them.

An event is a flat tuple so that a million of them cost little:

``Event(time_ns, device, queue, kind, value)``

- ``time_ns``: nanoseconds since the Unix epoch (CLOCK_REALTIME). Sources
  whose clock is CLOCK_MONOTONIC (BPF's ``bpf_ktime_get_ns``) convert with
  :func:`monotonic_to_realtime_ns`.
- ``device``: the device name as in the snapshot JSON (``net3``,
  ``vhost-net:PID:FD``, a QOM id).
- ``queue``: the vring index within the device (``-1`` when the event is
  not tied to one queue, e.g. an ioctl that sets the memory table).
- ``kind``: one of :data:`KINDS` (strings, so a file stays readable).
- ``value``: an integer whose meaning depends on ``kind`` (see
  :data:`KINDS`); 0 where there is nothing to say.
"""

from __future__ import annotations

import struct
import time
from typing import NamedTuple


class Event(NamedTuple):
    """One timed event; see the module docstring for the fields."""

    time_ns: int
    device: str
    queue: int
    kind: str
    value: int = 0


#: Event kinds and what ``value`` carries for each. Kinds are the VIRTIO
#: spec's (kick: driver→device notification, §2.7.13; call: device→driver
#: notification, §2.7.14) and the kernel's vhost function names.
KINDS: dict[str, str] = {
    "kick": "a driver→device notification seen by the device; value: kicks coalesced "
            "into it (the eventfd counter read), 1 when unknown",
    "call": "a device→driver notification sent; value: used_idx at the time (a packed "
            "ring: the device's next_used slot), or 0",
    "call_suppressed": "a call the device did not send because the driver suppressed it "
                       "(VRING_AVAIL_F_NO_INTERRUPT, used_event; packed: the driver's event "
                       "suppression, §2.8.10); value: used_idx (packed: next_used slot) or 0",
    "handler_start": "a vhost handler (handle_tx/handle_rx) began; value: last_avail_idx",
    "handler_end": "that handler returned; value: duration in ns",
    "used_add": "entries added to the used ring (vhost_add_used_and_signal_n); value: count",
    "notify_enable": "the device asked for kicks again (vhost_enable_notify); value: 0",
    "notify_disable": "the device suppressed kicks (vhost_disable_notify); value: 0",
    "weight_exceeded": "a vhost handler stopped on VHOST_NET_WEIGHT / VHOST_NET_PKT_WEIGHT",
    "ioctl": "a vhost ioctl on the device's fd; value: the ioctl request number",
    "broken": "the device marked the queue broken; value: 0",
}


def monotonic_to_realtime_ns(mono_ns: int) -> int:
    """Convert a CLOCK_MONOTONIC timestamp (ns) to ns since the epoch, using
    the current offset between the two clocks (good to a few µs; the offset
    moves only when the wall clock is stepped)."""
    return mono_ns + (time.clock_gettime_ns(time.CLOCK_REALTIME)
                      - time.clock_gettime_ns(time.CLOCK_MONOTONIC))


# --- packed records: the back-end's event logs and the introspection "events" op

#: Kind codes of packed event records (the C log's VQD_EV_*, checked equal
#: when inspector.datapath.queue is imported) -> :data:`KINDS` names.
EVENT_KIND_NAMES = {1: "kick", 2: "call", 3: "call_suppressed"}
EVENT_KIND_CODES = {name: code for code, name in EVENT_KIND_NAMES.items()}
#: One event record as drained (struct vqd_event, 16 bytes): time_ns (ns since
#: the epoch), kind code, value.
EVENT_RECORD = struct.Struct("<QII")


def decode_events(records) -> list[tuple[int, str, int]]:
    """Packed event records (a bytes-like of whole :data:`EVENT_RECORD` s)
    as ``(time_ns, kind, value)`` tuples; an unknown kind code reads
    "unknown"."""
    names = EVENT_KIND_NAMES
    return [(t, names.get(k, "unknown"), v) for t, k, v in EVENT_RECORD.iter_unpack(records)]


def encode_events(events) -> bytes:
    """``(time_ns, kind, value)`` tuples as packed records (for devices
    whose events do not come from a C log; kinds of EVENT_KIND_CODES)."""
    return b"".join(EVENT_RECORD.pack(t, EVENT_KIND_CODES[k], v) for t, k, v in events)
