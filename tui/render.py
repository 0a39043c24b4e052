"""Formatting of snapshot values (inspector.snapshot.model), shared by the
TUI widgets and by ``vqscope snapshot`` (without ``--json``).

Every cell of every queue view comes from here, so the terminal table and the
live screens agree: spec flag names instead of numbers, "—" for null (a field
the source cannot know, or one that ``VIRTIO_RING_F_EVENT_IDX`` left out).
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import lru_cache

from rich import box
from rich.table import Table
from rich.text import Text

from inspector.analysis import Diagnosis, Role, Severity, Verdict, role_of
from inspector.analysis.roles import device_type_of
from inspector.snapshot.model import Chain, QueueEntry, Snapshot
from inspector.spec import virtio
from inspector.spec.virtio import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    feature_names,
)

from .rates import NO_RATES, QueueRates

DASH = "—"

# Bit → name tables (VIRTIO 1.2 §2.7.5 desc, §2.7.6 avail, §2.7.8 used).
AVAIL_FLAGS = ((VRING_AVAIL_F_NO_INTERRUPT, "NO_INTERRUPT"),)
USED_FLAGS = ((VRING_USED_F_NO_NOTIFY, "NO_NOTIFY"),)
DESC_FLAGS = ((VRING_DESC_F_NEXT, "NEXT"), (VRING_DESC_F_WRITE, "WRITE"), (VRING_DESC_F_INDIRECT, "INDIRECT"))
# A packed descriptor's flags (§2.8.13): the split ones and the wrap-counter bits.
PACKED_DESC_FLAGS = DESC_FLAGS + ((VIRTQ_DESC_F_AVAIL, "AVAIL"), (VIRTQ_DESC_F_USED, "USED"))
# ``struct pvirtq_event_suppr.flags`` values (§2.8.10): a value, not a mask.
EVENT_FLAGS = {RING_EVENT_FLAGS_ENABLE: "ENABLE", RING_EVENT_FLAGS_DISABLE: "DISABLE", RING_EVENT_FLAGS_DESC: "DESC"}

ANOMALY_STYLE = "bold white on red"


def dash(value: object) -> str:
    """``str(value)``, or "—" for None (JSON null)."""
    return DASH if value is None else str(value)


def decode_flags(flags: int, names: tuple[tuple[int, str], ...]) -> str:
    """``NAME|NAME`` for the known bits of ``flags``, unknown bits appended as
    hex (so nothing a hostile driver sets is hidden); "0" when none is set."""
    parts = []
    rest = flags
    for bit, name in names:
        if flags & bit:
            parts.append(name)
            rest &= ~bit
    if rest:
        parts.append(f"{rest:#x}")
    return "|".join(parts) if parts else "0"


def avail_flags_text(flags: int) -> str:
    return decode_flags(flags, AVAIL_FLAGS)


def used_flags_text(flags: int) -> str:
    return decode_flags(flags, USED_FLAGS)


def desc_flags_text(flags: int) -> str:
    return decode_flags(flags, DESC_FLAGS)


def packed_desc_flags_text(flags: int) -> str:
    return decode_flags(flags, PACKED_DESC_FLAGS)


def position_text(slot: int | None, wrap: int | None) -> str:
    """A packed ring position (§2.8.1) as ``slot/wrap``: ``12/1``; the slot
    alone when its wrap counter is unknown, "—" when the slot is."""
    if slot is None:
        return DASH
    return str(slot) if wrap is None else f"{slot}/{wrap}"


def event_flags_text(flags: int | None) -> str:
    """An event suppression structure's ``flags`` (§2.8.10) by name:
    ``ENABLE``, ``DISABLE``, ``DESC``; another value in hex (reserved: a
    hostile side may write it); "—" for None."""
    if flags is None:
        return DASH
    return EVENT_FLAGS.get(flags, f"{flags:#x}")


def event_off_text(flags: int | None, off: int | None, wrap: int | None) -> str:
    """The ``desc_event_off``/``desc_event_wrap`` of an event suppression
    structure as a position (``12/1``) when its flags are DESC, where they
    mean something (§2.8.10); "—" otherwise."""
    return position_text(off, wrap) if flags == RING_EVENT_FLAGS_DESC else DASH


def rate_text(rate: float | None) -> str:
    """Events per second: one decimal below 100, whole numbers above."""
    if rate is None:
        return DASH
    return f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}"


def time_text(t: float | None) -> str:
    """A snapshot's ``time`` as UTC with milliseconds (recorded files and
    hosts in other time zones then read the same)."""
    if t is None:
        return DASH
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def clock_text(t: float) -> str:
    """The time of day of ``t`` (s since the epoch), UTC, to a tenth of a
    second: ``08:25:01.2`` (the date and zone are in the status line)."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S.%f")[:-5]


def seconds_text(s: float) -> str:
    """A duration in seconds for people: ``0.4 s``, ``3.2 s``, ``42 s``,
    ``12 min``, ``2.1 h``."""
    if s < 10:
        return f"{max(s, 0.0):.1f} s"
    if s < 100:
        return f"{s:.0f} s"
    if s < 6000:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def ns_text(ns: float) -> str:
    """A latency in ns with two significant digits and a unit: ``512 ns``,
    ``8.2 µs``, ``16 µs``, ``1.0 ms``."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            v = ns / scale
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{ns:.0f} ns"


# --- features ---------------------------------------------------------------


def device_id(device_type: str | None) -> int | None:
    """The ``VIRTIO_ID_*`` (VIRTIO 1.2 §5) of a device type as a snapshot
    names it (``net``, ``block``, or an alias of
    :func:`inspector.analysis.roles.device_type_of`), None when unknown."""
    t = device_type_of(device_type)
    return None if t is None else getattr(virtio, f"VIRTIO_ID_{t.upper()}", None)


def features_text(features: int, device_type: str | None = None) -> str:
    """The negotiated feature bits by name, lowest bit first, without the
    ``VIRTIO_F_`` / ``VIRTIO_RING_F_`` / ``VIRTIO_NET_F_`` ... prefix:
    ``INDIRECT_DESC EVENT_IDX VERSION_1``; device-specific bits by name when
    the device type is known, else ``bit N`` (names:
    :func:`inspector.spec.virtio.feature_names`); "0" when none is set."""
    names = [n.split("_F_", 1)[-1] for n in feature_names(features, device_id(device_type))]
    return " ".join(names) if names else "0"


# --- roles and health -------------------------------------------------------


@lru_cache(maxsize=4096)
def role_text(device_type: str | None, index: int, num_queues: int | None = None) -> str:
    """The queue's role in a word: ``RX``/``TX``/``CTRL`` for net (§5.1.2),
    ``RX``/``TX`` for console (§5.3.2), ``REQ`` for block (§5.2.2), else
    ``FILL`` (the driver posts buffers for the device to fill) or
    ``CONSUME`` (the device consumes the driver's buffers), from
    :func:`inspector.analysis.role_of`; "—" when the device type is unknown."""
    role = role_of(device_type, index, num_queues)
    if role is Role.UNKNOWN:
        return DASH
    t = device_type_of(device_type)
    if t == "net":
        return "RX" if role is Role.FILL else ("TX" if index % 2 else "CTRL")
    if t == "console":
        return "RX" if role is Role.FILL else "TX"
    if t == "block":
        return "REQ"
    return role.value.upper()


#: The style of each severity: colour helps, the word and the mark carry it.
SEVERITY_STYLE = {Severity.OK: "green", Severity.WARNING: "bold yellow", Severity.ERROR: "bold red"}
#: The mark before a verdict word: ● nothing to do, ▲ a problem.
SEVERITY_MARK = {Severity.OK: "●", Severity.WARNING: "▲", Severity.ERROR: "▲"}


def health_text(d: Diagnosis | None, now: float | None = None) -> Text:
    """A queue's health cell: ``● healthy``, ``● idle``, or for a problem
    the verdict and how long it has held at snapshot time ``now`` (s since
    the epoch): ``▲ device_stalled 3.2 s``; "…" before the first diagnosis."""
    if d is None:
        return Text("…", style="dim")
    text = f"{SEVERITY_MARK[d.severity]} {d.verdict.value}"
    if not d.ok and now is not None:
        text += f" {seconds_text(now - d.since)}"
    return Text(text, style="dim green" if d.verdict is Verdict.IDLE else SEVERITY_STYLE[d.severity])


def problem_line(d: Diagnosis) -> Text:
    """One line about a queue that is not healthy: ``▲ net0 q1
    device_stalled since 08:25:01.2 — evidence``."""
    line = Text.assemble((f"{SEVERITY_MARK[d.severity]} {d.device} q{d.index} {d.verdict.value}",
                          SEVERITY_STYLE[d.severity]), f" since {clock_text(d.since)}")
    if d.evidence:
        line.append(f" — {d.evidence}")
    return line


# --- labeled panels (the queue screen) --------------------------------------

#: Cells of the label column of the queue screen's panels.
LABEL_WIDTH = 10


def labeled(rows: list[tuple[str, Text | str]]) -> Table:
    """``(label, content)`` rows as a grid: the label bold in a column of
    LABEL_WIDTH cells, the content beside it (wrapped lines stay indented)."""
    grid = Table.grid(padding=0, expand=True)
    grid.add_column(width=LABEL_WIDTH, no_wrap=True, style="bold")
    grid.add_column(ratio=1)
    for label, content in rows:
        grid.add_row(label, content)
    return grid


# --- occupancy --------------------------------------------------------------

_EIGHTHS = " ▏▎▍▌▋▊▉"


def occupancy_bar(inflight: int, size: int, width: int = 12) -> str:
    """``inflight`` of ``size`` slots as a bar of ``width`` cells in eighths,
    between brackets: ``[██████▌     ]``; full (and no more) when the
    indices say more than ``size``."""
    if size <= 0:
        return "[" + " " * width + "]"
    eighths = min(width * 8, round(max(inflight, 0) * width * 8 / size))
    if inflight > 0 and eighths == 0:
        eighths = 1  # one buffer is not nothing
    full, part = divmod(eighths, 8)
    bar = "█" * full + (_EIGHTHS[part] if part else "")
    return "[" + bar.ljust(width) + "]"


def anomaly_count(queue: QueueEntry) -> Text:
    """The number of anomalies, highlighted when not zero."""
    n = len(queue.anomalies)
    return Text(str(n), style=ANOMALY_STYLE if n else "")


# The queue table: (column key, header) in order. RATE_COLUMNS only in the
# live view, where a previous snapshot exists.
QUEUE_COLUMNS = (
    ("device", "device"),
    ("index", "q"),
    ("size", "size"),
    ("avail_idx", "avail_idx"),
    ("used_idx", "used_idx"),
    ("last_avail_idx", "last_avail_idx"),
    ("inflight", "inflight"),
    ("avail_flags", "avail_flags"),
    ("used_flags", "used_flags"),
    ("used_event", "used_event"),
    ("avail_event", "avail_event"),
    ("kicks", "kicks"),
    ("calls", "calls"),
    ("packets", "pkts"),
)
RATE_COLUMNS = (("kicks_s", "kicks/s"), ("calls_s", "calls/s"), ("packets_s", "pkts/s"))
ANOMALY_COLUMN = ("anomalies", "anom")

#: The TUI's queue table: who and how it is first (visible in 80 columns),
#: then the indices, the rates, and the rest of QUEUE_COLUMNS.
TABLE_COLUMNS = (
    ("device", "device"), ("index", "q"), ("role", "role"), ("health", "health"),
    ("size", "size"), ("occupancy", "occupancy"),
    ("avail_idx", "avail_idx"), ("used_idx", "used_idx"), ("last_avail_idx", "last_avail_idx"),
    ("inflight", "inflight"),
) + RATE_COLUMNS + (ANOMALY_COLUMN,) + (
    ("avail_flags", "avail_flags"), ("used_flags", "used_flags"),
    ("used_event", "used_event"), ("avail_event", "avail_event"),
    ("kicks", "kicks"), ("calls", "calls"), ("packets", "pkts"),
)

TEXT_COLUMNS = frozenset({"device", "role", "health", "occupancy", "avail_flags", "used_flags"})
"""Left-aligned columns; every other queue column is a number (right-aligned)."""


def queue_cells(queue: QueueEntry) -> dict[str, str | Text]:
    """The QUEUE_COLUMNS and ANOMALY_COLUMN cells of one queue. A packed
    queue (§2.8) shows in the split columns what plays their part: its
    driver's position ``next_avail/avail_wrap_counter`` under avail_idx,
    the device's ``next_used/used_wrap_counter`` under used_idx,
    ``last_avail_idx/last_avail_wrap_counter``, the driver's event
    suppression (governs calls) under avail_flags and used_event, the
    device's (governs kicks) under used_flags and avail_event."""
    if queue.layout == "packed":
        return _packed_cells(queue)
    return {
        "device": queue.device,
        "index": str(queue.index),
        "size": str(queue.size),
        "avail_idx": str(queue.avail_idx),
        "used_idx": str(queue.used_idx),
        "last_avail_idx": dash(queue.last_avail_idx),
        "inflight": str(queue.inflight),
        "avail_flags": avail_flags_text(queue.avail_flags),
        "used_flags": used_flags_text(queue.used_flags),
        "used_event": dash(queue.used_event),
        "avail_event": dash(queue.avail_event),
        "kicks": str(queue.kicks),
        "calls": str(queue.calls),
        "packets": str(queue.packets),
        "anomalies": anomaly_count(queue),
    }


def _packed_cells(q: QueueEntry) -> dict[str, str | Text]:
    return {
        "device": q.device,
        "index": str(q.index),
        "size": str(q.size),
        "avail_idx": position_text(q.next_avail, q.avail_wrap_counter),
        "used_idx": position_text(q.next_used, q.used_wrap_counter),
        "last_avail_idx": position_text(q.last_avail_idx, q.last_avail_wrap_counter),
        "inflight": str(q.inflight),
        "avail_flags": event_flags_text(q.driver_event_flags),
        "used_flags": event_flags_text(q.device_event_flags),
        "used_event": event_off_text(q.driver_event_flags, q.driver_event_off, q.driver_event_wrap),
        "avail_event": event_off_text(q.device_event_flags, q.device_event_off, q.device_event_wrap),
        "kicks": str(q.kicks),
        "calls": str(q.calls),
        "packets": str(q.packets),
        "anomalies": anomaly_count(q),
    }


def status_cells(queue: QueueEntry, diagnosis: Diagnosis | None, now: float | None,
                 num_queues: int | None = None) -> dict[str, str | Text]:
    """The ``role``, ``health`` and ``occupancy`` cells of TABLE_COLUMNS;
    ``now``: the snapshot's time (how long a problem has held);
    ``num_queues``: the device's queue count (net's controlq is its last)."""
    return {
        "role": role_text(queue.device_type, queue.index, num_queues),
        "health": health_text(diagnosis, now),
        "occupancy": occupancy_bar(queue.inflight, queue.size),
    }


def rate_cells(rates: QueueRates = NO_RATES) -> dict[str, str]:
    """The RATE_COLUMNS cells."""
    return {
        "kicks_s": rate_text(rates.kicks),
        "calls_s": rate_text(rates.calls),
        "packets_s": rate_text(rates.packets),
    }


#: The queue screen's scalar fields in order, each with how its value is shown
#: (``features``, by name, is on the screen's title line: the list is long).
QUEUE_FIELDS = (
    ("device", str), ("index", str), ("layout", str), ("size", str),
    ("device_type", dash), ("event_idx", lambda v: "yes" if v else "no"),
    ("avail_idx", str), ("used_idx", str), ("last_avail_idx", dash), ("inflight", str),
    ("shadow_avail_idx", dash),
    ("avail_flags", avail_flags_text), ("used_flags", used_flags_text),
    ("used_event", dash), ("avail_event", dash),
    ("kicks", str), ("calls", str), ("calls_suppressed", dash), ("packets", str), ("bytes", str),
    ("dropped", dash),
)


def _field(name: str, show) -> tuple:
    """A QUEUE_FIELDS entry as a PACKED_QUEUE_FIELDS one (shown from the queue)."""
    return (name, lambda q: show(getattr(q, name)))


_SHOW = dict(QUEUE_FIELDS)
#: A packed queue's fields for the queue screen (§2.8), each shown from the
#: queue: its positions as ``slot/wrap`` and its event suppression
#: structures in place of the split ring's fields.
PACKED_QUEUE_FIELDS = tuple(_field(n, _SHOW[n]) for n in ("device", "index", "layout", "size", "device_type",
                                                          "event_idx")) + (
    ("next_avail", lambda q: position_text(q.next_avail, q.avail_wrap_counter)),
    ("next_used", lambda q: position_text(q.next_used, q.used_wrap_counter)),
    ("last_avail_idx", lambda q: position_text(q.last_avail_idx, q.last_avail_wrap_counter)),
    ("inflight", lambda q: str(q.inflight)), ("positions", lambda q: dash(q.positions)),
    ("driver_event", lambda q: _event_text(q.driver_event_flags, q.driver_event_off, q.driver_event_wrap)),
    ("device_event", lambda q: _event_text(q.device_event_flags, q.device_event_off, q.device_event_wrap)),
) + tuple(_field(n, _SHOW[n]) for n in ("kicks", "calls", "calls_suppressed", "packets", "bytes", "dropped"))


def _event_text(flags: int | None, off: int | None, wrap: int | None) -> str:
    """``DESC 12/1``, ``ENABLE``, ``DISABLE``."""
    text = event_flags_text(flags)
    return f"{text} {position_text(off, wrap)}" if flags == RING_EVENT_FLAGS_DESC else text


def queue_fields(queue: QueueEntry) -> list[tuple[str, str]]:
    """Every scalar field of a queue but ``features`` as (spec name, text),
    for the queue screen; a packed queue's positions ``slot/wrap`` and
    event suppression (PACKED_QUEUE_FIELDS) instead of the split fields."""
    if queue.layout == "packed":
        return [(name, show(queue)) for name, show in PACKED_QUEUE_FIELDS]
    return [(name, show(getattr(queue, name))) for name, show in QUEUE_FIELDS]


def fields_grid(queue: QueueEntry, pairs_per_row: int = 4) -> Table:
    """queue_fields() laid out as a grid of name/value pairs."""
    grid = Table.grid(padding=(0, 2))
    for _ in range(pairs_per_row):
        grid.add_column(style="dim", justify="right")
        grid.add_column(style="bold")
    fields = queue_fields(queue)
    for i in range(0, len(fields), pairs_per_row):
        row: list[str] = []
        for name, value in fields[i:i + pairs_per_row]:
            row += [name, value]
        grid.add_row(*row)
    return grid


CHAIN_COLUMNS = (
    ("head", "head"), ("n", "#"), ("addr", "addr"), ("len", "len"), ("flags", "flags"),
    ("next", "next"), ("out_bytes", "out bytes"), ("in_bytes", "in bytes"),
)
#: A block queue's chain table (VIRTIO 1.2 §5.2.6): each chain's request too.
BLK_CHAIN_COLUMNS = CHAIN_COLUMNS + (("request", "request"),)


def chain_rows(chain: Chain, blk: bool = False) -> list[list[str]]:
    """One row per descriptor of an in-flight chain (CHAIN_COLUMNS); the head
    and the byte totals only on the chain's first row. A packed chain
    (``slot`` set, §2.8.6): head ``id 3 @ slot 12`` (its buffer id and first
    slot), each descriptor's ``id`` under next, AVAIL/USED flags named.
    ``blk`` (BLK_CHAIN_COLUMNS): the chain's virtio-blk request on its first
    row (:func:`request_text`, "—" when not decoded)."""
    rows = []
    descs = chain.descs or (None,)
    packed = chain.slot is not None
    head = f"id {chain.head} @ slot {chain.slot}" if packed else str(chain.head)
    flags_text = packed_desc_flags_text if packed else desc_flags_text
    for n, d in enumerate(descs):
        first = n == 0
        rows.append([
            head if first else "",
            DASH if d is None else str(n),
            DASH if d is None else f"{d.addr:#x}",
            DASH if d is None else str(d.len),
            DASH if d is None else flags_text(d.flags),
            DASH if d is None else (f"id {d.next}" if packed else str(d.next)),
            str(chain.out_bytes) if first else "",
            str(chain.in_bytes) if first else "",
        ])
    if blk:
        r = chain.request
        rows[0].append(DASH if r is None else request_text(r.type, r.sector, r.data_len, r.status, r.malformed))
        for row in rows[1:]:
            row.append("")
    return rows


# --- block queues (VIRTIO 1.2 §5.2; README "Block queues in the inspector") --

def request_text(type_: object, sector: object, data_len: object, status: object, bad: object = None) -> str:
    """One virtio-blk request in words: ``out 4096 B @ sector 2048 · pending``;
    ``flush · ok``; a malformed one ``malformed: header: ...``; a completed
    one the device called bad ``... · ioerr (out_of_range)``. Values come
    from a peer's JSON: anything is shown as given."""
    if type_ is None and bad is not None:
        return f"malformed: {bad} · {status}"
    text = str(type_)
    if isinstance(data_len, int) and data_len > 0:
        text += f" {data_len} B"
    if isinstance(sector, int) and (type_ in ("in", "out") or isinstance(type_, int)):
        text += f" @ sector {sector}"   # the others' ranges are in their data (§5.2.6)
    text += f" · {status}"
    if bad is not None:
        text += f" ({bad})"
    return text


def snapshot_table(snap: Snapshot) -> Table:
    """Every queue of a snapshot as one rich Table (``vqscope snapshot``)."""
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
        title_justify="left",
        title=f"{snap.source}  {time_text(snap.time)}  "
              f"{len(snap.queues)} queue{'' if len(snap.queues) == 1 else 's'}",
    )
    columns = QUEUE_COLUMNS + (ANOMALY_COLUMN,)
    for key, label in columns:
        table.add_column(label, justify="left" if key in TEXT_COLUMNS else "right", no_wrap=True)
    for q in snap.queues:
        cells = queue_cells(q)
        table.add_row(*(cells[key] for key, _ in columns))
    return table
