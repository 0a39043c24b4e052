"""The queue screen's pictures, as pure functions of one QueueEntry: the ring
drawn as its slots, the notification-suppression state in words, and the
vhost-net probes' latency histograms.

Index arithmetic is modulo 2^16 (VIRTIO 1.2 §2.7: ``idx`` fields are
free-running 16-bit counters); a slot is an index modulo the queue size. A
packed ring (§2.8) is drawn the same way from its positions (slot, wrap
counter), with distances from inspector.ring.packed.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

from inspector.analysis import MEANING, Diagnosis
from inspector.ring.packed import packed_counter, packed_distance
from inspector.snapshot.model import QueueEntry
from inspector.spec.virtio import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
                                   VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY)

from .render import SEVERITY_MARK, SEVERITY_STYLE, clock_text, event_flags_text, ns_text, position_text, seconds_text

U16 = 0xFFFF

# --- the ring ---------------------------------------------------------------

#: Slot states in ring order from ``used_idx``, with glyph, style and legend.
TAKEN, UNKNOWN, AVAILABLE, FREE = range(4)
GLYPH = {TAKEN: "█", UNKNOWN: "▒", AVAILABLE: "▓", FREE: "░"}
STYLE = {TAKEN: "yellow", UNKNOWN: "magenta", AVAILABLE: "cyan", FREE: "grey50"}
LEGEND = {
    FREE: "free",
    TAKEN: "taken by the device, not returned",
    AVAILABLE: "available, not yet taken",
    UNKNOWN: "available or taken: this source cannot tell (no last_avail_idx)",
}
#: A packed ring's words where they differ (§2.8): slots past next_avail up
#: to next_used hold used descriptors the driver may not have collected yet,
#: or slots it has reused; the ring does not tell which.
PACKED_LEGEND = LEGEND | {
    FREE: "used (returned to the driver) or free",
    TAKEN: "held by the device, not returned",
    UNKNOWN: "available or held: this source cannot tell (no last_avail_idx with its wrap counter)",
}
#: When two states share a cell, the one drawn (a single slot in flight shows).
PRIORITY = (TAKEN, AVAILABLE, UNKNOWN, FREE)


@dataclass(frozen=True)
class RingRegions:
    """How many slots from ``used_idx`` on are in each state, in ring order
    (taken, unknown, available; free the rest up to ``size``), and what
    did not add up (``notes``)."""

    size: int
    start: int  # slot of used_idx
    taken: int
    unknown: int
    available: int
    notes: tuple[str, ...] = ()
    packed: bool = False

    @property
    def free(self) -> int:
        return self.size - self.taken - self.unknown - self.available

    def bounds(self) -> list[tuple[int, int, int]]:
        """``(state, first, end)`` in slots after ``start`` (0 = used_idx's slot)."""
        a = self.taken
        b = a + self.unknown
        c = b + self.available
        return [(TAKEN, 0, a), (UNKNOWN, a, b), (AVAILABLE, b, c), (FREE, c, self.size)]


def ring_regions(q: QueueEntry) -> RingRegions:
    """The split ring's slots by state: from ``used_idx`` to
    ``last_avail_idx`` taken by the device and not returned (in flight), from
    there to ``avail_idx`` made available and not yet taken, the rest free.
    Without ``last_avail_idx``: from ``used_idx`` to ``shadow_avail_idx``
    (what the device last read) either, and from there to ``avail_idx``
    available; without either, everything up to ``avail_idx`` "cannot tell".
    Counts that exceed the ring are clamped, with a note."""
    n = q.size
    notes = []
    pending = (q.avail_idx - q.used_idx) & U16
    if pending > n:
        notes.append(f"avail_idx {q.avail_idx} − used_idx {q.used_idx} = {pending} is more than the size {n}")
        pending = n
    taken = unknown = 0
    if q.last_avail_idx is not None:
        taken = (q.last_avail_idx - q.used_idx) & U16
        if taken > pending:
            notes.append(f"last_avail_idx {q.last_avail_idx} is not between used_idx {q.used_idx} "
                         f"and avail_idx {q.avail_idx}")
            taken, unknown = 0, pending
    elif q.shadow_avail_idx is not None and ((q.shadow_avail_idx - q.used_idx) & U16) <= pending:
        unknown = (q.shadow_avail_idx - q.used_idx) & U16
    else:
        unknown = pending
    return RingRegions(n, q.used_idx % n if n else 0, taken, unknown, pending - taken - unknown, tuple(notes))


def packed_regions(q: QueueEntry) -> RingRegions:
    """A packed ring's slots by state (§2.8): from the device's
    ``next_used`` to its read position (``last_avail_idx`` with its wrap
    counter) held by the device, from there to the driver's ``next_avail``
    available and not yet taken, the rest used or free; without the read
    position, everything up to ``next_avail`` "cannot tell". Positions
    not read: the whole ring "used or free", with a note."""
    n = q.size
    if None in (q.next_avail, q.avail_wrap_counter, q.next_used, q.used_wrap_counter):
        return RingRegions(n, 0, 0, 0, 0, ("the ring's positions were not read",), True)
    used = packed_counter(q.next_used, q.used_wrap_counter, n)
    pending = packed_distance(used, packed_counter(q.next_avail, q.avail_wrap_counter, n), n)
    notes = []
    if pending > n:
        notes.append(f"next_avail {q.next_avail}/{q.avail_wrap_counter} is {pending} slots past next_used "
                     f"{q.next_used}/{q.used_wrap_counter}: more than the size {n}")
        pending = n
    taken, unknown = 0, pending
    if q.last_avail_idx is not None and q.last_avail_wrap_counter is not None:
        taken = packed_distance(used, packed_counter(q.last_avail_idx, q.last_avail_wrap_counter, n), n)
        if taken > pending:
            notes.append(f"last_avail_idx {q.last_avail_idx}/{q.last_avail_wrap_counter} is not between "
                         f"next_used and next_avail")
            taken = 0
        else:
            unknown = 0
    return RingRegions(n, q.next_used % n, taken, unknown, pending - taken - unknown, tuple(notes), True)


def _cells(n: int, width: int) -> tuple[int, int]:
    """``(cells, per_slot)``: the bar's width in cells for ``n`` slots in at
    most ``width`` cells, and cells per slot (0 when one cell holds several)."""
    if n <= width:
        k = max(width // n, 1)
        return n * k, k
    return width, 0


def slot_cell(slot: int, n: int, width: int) -> int:
    """The cell of slot ``slot`` (0 ≤ slot < n) in a bar of at most ``width``
    cells (see :func:`ring_bar`)."""
    cells, k = _cells(n, width)
    if k:
        return slot * k
    return ((slot + 1) * cells - 1) // n


def ring_bar(r: RingRegions, width: int) -> Text:
    """The ``size`` slots, slot 0 first, in at most ``width`` cells: with
    room, each slot ``width // size`` cells; else cell ``c`` holds slots
    ``c·size//width`` up to the next cell's first, drawn as the state of
    highest :data:`PRIORITY` among them."""
    n = r.size
    cells, k = _cells(n, width)
    bounds = r.bounds()
    out = Text()

    def states_in(a: int, b: int) -> set[int]:
        """States of slots a..b−1 (slot numbers; b − a ≤ n)."""
        d0 = (a - r.start) % n
        spans = [(d0, min(d0 + b - a, n))]
        if d0 + b - a > n:
            spans.append((0, d0 + b - a - n))
        return {s for s, lo, hi in bounds for x, y in spans if lo < hi and x < hi and lo < y}

    for c in range(cells):
        a, b = (c // k, c // k + 1) if k else (c * n // cells, (c + 1) * n // cells)
        present = states_in(a, b)
        state = next(s for s in PRIORITY if s in present)
        out.append(GLYPH[state], STYLE[state])
    return out


def ring_markers(q: QueueEntry, width: int) -> list[Text]:
    """Rows of ``▲name value`` labels under :func:`ring_bar`, the ▲ under
    the slot of each of ``used_idx``, ``last_avail_idx``, ``avail_idx``,
    ``used_event``, ``avail_event`` (and ``shadow_avail_idx`` without
    ``last_avail_idx``) that is known; names with the same value share a
    label; a label that would run past the bar ends at its ▲ instead;
    labels that would overlap go to the next row. ``width``: as
    :func:`ring_bar`'s."""
    n = q.size
    cells, _ = _cells(n, width)
    by_value: dict[tuple[int, str], list[str]] = {}
    for name, slot, value in _marks(q):
        by_value.setdefault((slot, value), []).append(name)
    labels = []
    for (slot, value), names in by_value.items():
        col = slot_cell(slot, n, width)
        text = f"{'/'.join(names)} {value}"
        if col + len(text) + 1 <= cells or col < len(text):
            labels.append((col, f"▲{text}"))  # (cropped at the edge when it fits neither way)
        else:
            labels.append((col - len(text), f"{text}▲"))
    rows: list[list[tuple[int, str]]] = []
    for start, text in sorted(labels):
        for row in rows:
            if row[-1][0] + len(row[-1][1]) < start:
                row.append((start, text))
                break
        else:
            rows.append([(start, text)])
    out = []
    for row in rows:
        line = Text()
        for start, text in row:
            line.append(" " * (start - len(line)))
            line.append(text, "bold")
        out.append(line)
    return out


def _marks(q: QueueEntry) -> list[tuple[str, int, str]]:
    """``(name, slot, value text)`` of each known index :func:`ring_markers`
    marks. Packed (§2.8): ``next_used``, ``last_avail``, ``next_avail`` and
    the event offsets in force (flags DESC: ``call_at`` the driver's,
    ``kick_at`` the device's), each ``slot/wrap``."""
    n = q.size
    if q.layout == "packed":
        named = [("next_used", q.next_used, q.used_wrap_counter),
                 ("last_avail", q.last_avail_idx, q.last_avail_wrap_counter),
                 ("next_avail", q.next_avail, q.avail_wrap_counter)]
        if q.driver_event_flags == RING_EVENT_FLAGS_DESC:
            named.append(("call_at", q.driver_event_off, q.driver_event_wrap))
        if q.device_event_flags == RING_EVENT_FLAGS_DESC:
            named.append(("kick_at", q.device_event_off, q.device_event_wrap))
        return [(name, slot % n, position_text(slot, wrap)) for name, slot, wrap in named if slot is not None]
    split = [("used", q.used_idx), ("last_avail", q.last_avail_idx), ("avail", q.avail_idx),
             ("used_event", q.used_event), ("avail_event", q.avail_event)]
    if q.last_avail_idx is None:
        split.insert(2, ("shadow_avail", q.shadow_avail_idx))
    return [(name, value % n, str(value)) for name, value in split if value is not None]


def ring_legend(r: RingRegions, width: int) -> Text:
    """The glyphs in words with each state's slot count, and the scale."""
    out = Text()
    counts = {TAKEN: r.taken, UNKNOWN: r.unknown, AVAILABLE: r.available, FREE: r.free}
    for state in (FREE, TAKEN, AVAILABLE, UNKNOWN):
        if state == UNKNOWN and not r.unknown:
            continue
        if len(out):
            out.append("   ")
        out.append(GLYPH[state], STYLE[state])
        out.append(f" {(PACKED_LEGEND if r.packed else LEGEND)[state]} ({counts[state]})")
    cells, k = _cells(r.size, width)
    if k != 1:
        scale = f"1 slot = {k} cells" if k else f"1 cell = {r.size / cells:.1f} slots"
        out.append(f"   [{scale}]", "dim")
    return out


def ring_picture(q: QueueEntry, width: int) -> list[Text]:
    """The ring of ``q`` in ``width`` columns: ``slot 0 … slot N−1``, the
    bar, the marker rows, the legend, and notes on indices that do not add
    up. A packed ring (§2.8) is its descriptor ring, drawn from its
    positions (:func:`packed_regions`)."""
    if q.size <= 0:
        return [Text(f"size {q.size}: the ring is not set up", "dim")]
    width = max(width, 16)
    r = packed_regions(q) if q.layout == "packed" else ring_regions(q)
    cells, _ = _cells(q.size, width)
    left, right = "slot 0", f"slot {q.size - 1}"
    head = Text(left + right.rjust(max(cells - len(left), len(right) + 1)), "dim")
    lines = [head, ring_bar(r, width), *ring_markers(q, width), ring_legend(r, width)]
    lines += [Text(f"! {note}", "bold red") for note in r.notes]
    return lines


# --- notifications (§2.7.7, §2.7.10) -----------------------------------------


def kick_text(q: QueueEntry, notifications_seen: bool) -> str:
    """Kicks (driver → device, available buffer notifications, §2.7.10)
    in words: under EVENT_IDX the driver kicks when ``avail_idx`` passes
    the device's ``avail_event`` (and ignores VRING_USED_F_NO_NOTIFY);
    else VRING_USED_F_NO_NOTIFY suppresses them. With the count when the
    source sees kicks. Packed (§2.8.10): the device's event suppression."""
    if q.layout == "packed":
        text = _packed_notify(q.device_event_flags, q.device_event_off, q.device_event_wrap, "device",
                              "the driver passes it", f"next_avail is {position_text(q.next_avail, q.avail_wrap_counter)}",
                              "the driver kicks after each publication", "the device polls, or is busy")
        return text + (f"; {q.kicks:,} received" if notifications_seen else "; this source does not see kicks")
    no_notify = bool(q.used_flags & VRING_USED_F_NO_NOTIFY)
    if q.event_idx:
        if q.avail_event is None:
            text = "avail_event not known (EVENT_IDX): cannot tell when the device wants one"
        else:
            text = (f"enabled; the device asks for one when avail_idx passes {q.avail_event} "
                    f"(EVENT_IDX), avail_idx is {q.avail_idx}")
        if no_notify:
            text += "; VRING_USED_F_NO_NOTIFY set, ignored under EVENT_IDX"
    elif no_notify:
        text = "suppressed: VRING_USED_F_NO_NOTIFY set (the device polls, or is busy)"
    else:
        text = "enabled: VRING_USED_F_NO_NOTIFY clear, the driver kicks after each publication"
    text += f"; {q.kicks:,} received" if notifications_seen else "; this source does not see kicks"
    return text


def call_text(q: QueueEntry, notifications_seen: bool) -> str:
    """Calls (device → driver, used buffer notifications, §2.7.7) in words:
    under EVENT_IDX the device calls when ``used_idx`` passes the driver's
    ``used_event`` (and ignores VRING_AVAIL_F_NO_INTERRUPT); else
    VRING_AVAIL_F_NO_INTERRUPT suppresses them. With the counts sent and
    suppressed when the source knows them. Packed (§2.8.10): the driver's
    event suppression."""
    if q.layout == "packed":
        text = _packed_notify(q.driver_event_flags, q.driver_event_off, q.driver_event_wrap, "driver",
                              "the device's next_used passes it",
                              f"next_used is {position_text(q.next_used, q.used_wrap_counter)}",
                              "the device calls after each used descriptor", "the driver polls, or is busy")
        text += f"; {q.calls:,} sent" if notifications_seen else "; this source does not see calls"
        if q.calls_suppressed is not None:
            text += f"; {q.calls_suppressed:,} suppressed so far"
        return text
    no_interrupt = bool(q.avail_flags & VRING_AVAIL_F_NO_INTERRUPT)
    if q.event_idx:
        if q.used_event is None:
            text = "used_event not known (EVENT_IDX): cannot tell when the driver wants one"
        else:
            text = (f"the driver asks for one when used_idx passes {q.used_event} "
                    f"(EVENT_IDX), used_idx is {q.used_idx}")
        if no_interrupt:
            text += "; VRING_AVAIL_F_NO_INTERRUPT set, ignored under EVENT_IDX"
    elif no_interrupt:
        text = "suppressed: VRING_AVAIL_F_NO_INTERRUPT set (the driver polls, or is busy)"
    else:
        text = "enabled: VRING_AVAIL_F_NO_INTERRUPT clear, the device calls after each return"
    text += f"; {q.calls:,} sent" if notifications_seen else "; this source does not see calls"
    if q.calls_suppressed is not None:
        text += f"; {q.calls_suppressed:,} suppressed so far"
    return text


def _packed_notify(flags: int | None, off: int | None, wrap: int | None, side: str, passes: str, now: str,
                   enabled: str, disabled: str) -> str:
    """One side's ``struct pvirtq_event_suppr`` (§2.8.10) in words:
    ``enabled`` / ``disabled`` / ``at slot N wrap W``."""
    if flags == RING_EVENT_FLAGS_ENABLE:
        return f"enabled: {side} event flags ENABLE, {enabled}"
    if flags == RING_EVENT_FLAGS_DISABLE:
        return f"disabled: {side} event flags DISABLE ({disabled})"
    if flags == RING_EVENT_FLAGS_DESC:
        return (f"at slot {off} wrap {wrap}: {side} event flags DESC, one is due when {passes} (EVENT_IDX), "
                f"{now}")
    if flags is None:
        return f"{side} event suppression not read: cannot tell"
    return f"{side} event flags {event_flags_text(flags)} (reserved, §2.8.10): cannot tell"


# --- the verdict ------------------------------------------------------------


def verdict_lines(d: Diagnosis | None, now: float | None) -> list[Text]:
    """The verdict, since when and for how long (at snapshot time ``now``),
    the evidence, and what the verdict means."""
    if d is None:
        return [Text("… no verdict yet", "dim")]
    head = Text.assemble((f"{SEVERITY_MARK[d.severity]} {d.verdict.value}", SEVERITY_STYLE[d.severity]),
                         f"  since {clock_text(d.since)}")
    if now is not None:
        head.append(f" ({seconds_text(now - d.since)})")
    if d.evidence:
        head.append(f" — {d.evidence}")
    return [head, Text(MEANING[d.verdict], "dim")]


# --- latency histograms (vhost-net probes) ----------------------------------

#: The vhost-net probe's histograms (``extras["histograms"]``) in words.
HISTOGRAM_LABELS = {"kick_to_handler_ns": "kick → handler", "handler_run_ns": "handler run",
                    "used_to_call_ns": "used → call"}


def _slot(low: int) -> int:
    """The log2 slot of a bucket's low bound: 0 for 0, k for 2^(k−1)."""
    return low.bit_length()


def histogram_series(buckets: dict[str, int]) -> list[float]:
    """The counts of a log2 histogram (``{"bucket low bound in ns":
    count}``) from its lowest bucket to its highest, empty buckets 0."""
    slots = {_slot(int(low)): n for low, n in buckets.items()}
    if not slots:
        return []
    return [float(slots.get(s, 0)) for s in range(min(slots), max(slots) + 1)]


def percentile_bucket(buckets: dict[str, int], p: float) -> tuple[int, int] | None:
    """``(low, high)`` ns of the log2 bucket that holds the ``p``-th
    percentile (0 < p ≤ 100), or None for an empty histogram."""
    items = sorted((int(low), n) for low, n in buckets.items() if n > 0)
    total = sum(n for _, n in items)
    if not total:
        return None
    want, seen = total * p / 100, 0
    for low, n in items:
        seen += n
        if seen >= want:
            return low, max(2 * low, 1)
    low = items[-1][0]
    return low, max(2 * low, 1)


def histogram_text(buckets: dict[str, int]) -> str:
    """``p50 8.2–16 µs  p99 66–131 µs  (1,234 samples)``: the buckets that
    hold the median and the 99th percentile (log2 buckets: a range, not a
    value)."""
    total = sum(buckets.values())
    parts = []
    for p in (50, 99):
        b = percentile_bucket(buckets, p)
        if b is not None:
            lo, hi = ns_text(b[0]), ns_text(b[1])
            if lo.split()[1] == hi.split()[1]:
                lo = lo.split()[0]  # one unit for both ends
            parts.append(f"p{p} {lo}–{hi}")
    parts.append(f"({total:,} sample{'' if total == 1 else 's'})")
    return "  ".join(parts)
