"""A queue behind an IOMMU (VIRTIO_F_ACCESS_PLATFORM; README "IOVA-addressed
rings") in the TUI and ``vqscope snapshot``: its ``extras["iotlb"]``
(vqscope's back-end, the proxy's mirror, the vhost-net source's mirror) as
the queue screen's IOTLB panel (the ring areas' IOVAs with their
translations, the IOTLB's counters, what the device waits for) and as one
line per such queue under the snapshot table."""

from __future__ import annotations

from rich.text import Text

from inspector.snapshot.model import QueueEntry

from .render import ANOMALY_STYLE


def iotlb_stats(queue: QueueEntry | None) -> dict | None:
    """A queue's ``extras["iotlb"]``, or None."""
    if queue is None:
        return None
    io = queue.extras.get("iotlb")
    return io if isinstance(io, dict) else None


def _hex(v: object) -> str:
    return f"{v:#x}" if type(v) is int else "?"


def ring_text(ring: object) -> Text:
    """``desc 0xffffc000 → gpa 0x32a84000  avail ...``: each ring area's IOVA
    and where it lands (guest-physical, else the front-end/owner address);
    an area with no translation in the anomaly style."""
    text = Text()
    if not isinstance(ring, dict):
        return Text("unknown", style="dim")
    for name, area in ring.items():
        if not isinstance(area, dict):
            continue
        if text:
            text.append("  ")
        text.append(f"{name} {_hex(area.get('iova'))} → ")
        if area.get("gpa") is not None:
            text.append(f"gpa {_hex(area['gpa'])}")
        elif area.get("uaddr") is not None:
            text.append(f"uaddr {_hex(area['uaddr'])}")
        else:
            text.append("not in the IOTLB", style=ANOMALY_STYLE)
    return text if text else Text("unknown", style="dim")


def iotlb_rows(io: dict) -> list[tuple[str, Text | str]]:
    """The IOTLB panel as labeled rows: ring areas, counters (the keys the
    source has, in its order; refusals and misses highlighted when non-zero),
    and the miss the device waits for (or that a ring area was refused)."""
    rows: list[tuple[str, Text | str]] = [("IOVA rings", ring_text(io.get("ring")))]
    counts = Text()
    for key in ("entries", "updates", "invalidations", "invalidations_unmapped", "evictions", "misses",
                "rejected", "ring_restarts", "buffers_untranslated"):
        n = io.get(key)
        if type(n) is not int:
            continue
        if counts:
            counts.append("  ")
        counts.append(f"{key.replace('_', ' ')} {n}", style=ANOMALY_STYLE if key == "rejected" and n else "")
    if counts:
        rows.append(("IOTLB", counts))
    miss = io.get("miss")
    if isinstance(miss, dict):
        waited = miss.get("waiting_s")
        rows.append(("waits for", Text(f"the translation of IOVA {_hex(miss.get('iova'))} ({miss.get('perm')})"
                                       + (f" for {waited:.1f} s" if isinstance(waited, (int, float)) else ""),
                                       style=ANOMALY_STYLE)))
    if io.get("ring_refused"):
        rows.append(("refused", Text(str(io["ring_refused"]), style=ANOMALY_STYLE)))
    return rows


def iotlb_summary(queue: QueueEntry) -> Text | None:
    """One line about a queue behind an IOMMU for ``vqscope snapshot``: its
    ring IOVAs with their translations and what the device waits for; None
    for a queue with guest-physical addresses."""
    io = iotlb_stats(queue)
    if io is None:
        return None
    rows = dict(iotlb_rows(io))
    line = Text.assemble((f"{queue.device} q{queue.index}: ", "bold"), "IOVA rings ", rows["IOVA rings"])
    for label in ("waits for", "refused"):
        if label in rows:
            line.append(f" · {label} ")
            line.append_text(rows[label] if isinstance(rows[label], Text) else Text(str(rows[label])))
    return line
