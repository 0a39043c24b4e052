"""Formatting of snapshot values (inspector.snapshot.model), shared by the
TUI widgets and by ``vqscope snapshot`` (without ``--json``).

Every cell of every queue view comes from here, so the terminal table and the
live screens agree: spec flag names instead of numbers, "—" for null (a field
the source cannot know, or one that ``VIRTIO_RING_F_EVENT_IDX`` left out).
"""

from __future__ import annotations

from datetime import datetime, timezone

from rich import box
from rich.table import Table
from rich.text import Text

from inspector.snapshot.model import Chain, QueueEntry, Snapshot
from inspector.spec.virtio import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)

from .rates import NO_RATES, QueueRates

DASH = "—"

# Bit → name tables (VIRTIO 1.2 §2.7.5 desc, §2.7.6 avail, §2.7.8 used).
AVAIL_FLAGS = ((VRING_AVAIL_F_NO_INTERRUPT, "NO_INTERRUPT"),)
USED_FLAGS = ((VRING_USED_F_NO_NOTIFY, "NO_NOTIFY"),)
DESC_FLAGS = ((VRING_DESC_F_NEXT, "NEXT"), (VRING_DESC_F_WRITE, "WRITE"), (VRING_DESC_F_INDIRECT, "INDIRECT"))

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

TEXT_COLUMNS = frozenset({"device", "avail_flags", "used_flags"})
"""Left-aligned columns; every other queue column is a number (right-aligned)."""


def queue_cells(queue: QueueEntry) -> dict[str, str | Text]:
    """The QUEUE_COLUMNS and ANOMALY_COLUMN cells of one queue."""
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


def rate_cells(rates: QueueRates = NO_RATES) -> dict[str, str]:
    """The RATE_COLUMNS cells."""
    return {
        "kicks_s": rate_text(rates.kicks),
        "calls_s": rate_text(rates.calls),
        "packets_s": rate_text(rates.packets),
    }


#: The queue screen's scalar fields in order, each with how its value is shown.
QUEUE_FIELDS = (
    ("device", str), ("index", str), ("layout", str), ("size", str),
    ("features", lambda v: f"{v:#x}"), ("event_idx", lambda v: "yes" if v else "no"),
    ("avail_idx", str), ("used_idx", str), ("last_avail_idx", dash), ("inflight", str),
    ("avail_flags", avail_flags_text), ("used_flags", used_flags_text),
    ("used_event", dash), ("avail_event", dash),
    ("kicks", str), ("calls", str), ("packets", str), ("bytes", str),
)


def queue_fields(queue: QueueEntry) -> list[tuple[str, str]]:
    """Every scalar field of a queue as (spec name, text), for the queue screen."""
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


def chain_rows(chain: Chain) -> list[list[str]]:
    """One row per descriptor of an in-flight chain (CHAIN_COLUMNS); the head
    and the byte totals only on the chain's first row."""
    rows = []
    descs = chain.descs or (None,)
    for n, d in enumerate(descs):
        first = n == 0
        rows.append([
            str(chain.head) if first else "",
            DASH if d is None else str(n),
            DASH if d is None else f"{d.addr:#x}",
            DASH if d is None else str(d.len),
            DASH if d is None else desc_flags_text(d.flags),
            DASH if d is None else str(d.next),
            str(chain.out_bytes) if first else "",
            str(chain.in_bytes) if first else "",
        ])
    return rows


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
