"""Hand-built packed QueueEntries (VIRTIO 1.2 §2.8) for the consumers'
tests: the analyzer, the TUI, the recorder, replay and export.

Positions are ``(slot, wrap)``; ``inflight`` is computed from them with
inspector.ring.packed (the one copy of that arithmetic), as a decoder
would.
"""

from __future__ import annotations

from inspector.ring.packed import packed_counter, packed_distance
from inspector.snapshot.model import QueueEntry
from inspector.spec.virtio import RING_EVENT_FLAGS_ENABLE


def packed_entry(*, device: str = "net0", index: int = 1, size: int = 256, avail=(0, 1), used=(0, 1),
                 last_avail=None, driver_event=(RING_EVENT_FLAGS_ENABLE, 0, 1),
                 device_event=(RING_EVENT_FLAGS_ENABLE, 0, 1), event_idx: bool = True,
                 device_type: str | None = "net", positions: str = "device", **kw) -> QueueEntry:
    """A packed queue: the driver's ``avail`` = (next_avail,
    avail_wrap_counter), the device's ``used`` = (next_used,
    used_wrap_counter) and ``last_avail`` (its read position, or None),
    ``driver_event``/``device_event`` = (flags, off, wrap); other
    QueueEntry keywords (kicks, calls, dropped, chains ...) as given."""
    la = last_avail if last_avail is not None else (None, None)
    inflight = packed_distance(packed_counter(*used, size), packed_counter(*avail, size), size)
    return QueueEntry(device=device, index=index, size=size, features=0, event_idx=event_idx, layout="packed",
                      device_type=device_type, inflight=inflight, next_avail=avail[0],
                      avail_wrap_counter=avail[1], next_used=used[0], used_wrap_counter=used[1],
                      last_avail_idx=la[0], last_avail_wrap_counter=la[1],
                      driver_event_flags=driver_event[0], driver_event_off=driver_event[1],
                      driver_event_wrap=driver_event[2], device_event_flags=device_event[0],
                      device_event_off=device_event[1], device_event_wrap=device_event[2],
                      positions=positions, **kw)
