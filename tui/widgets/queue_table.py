"""The table of every queue of a snapshot, one row per queue, updated in place."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.message import Message

from inspector.analysis import Diagnosis
from inspector.snapshot.model import QueueEntry, QueueId

from ..rates import NO_RATES, QueueRates
from ..render import TABLE_COLUMNS, TEXT_COLUMNS, queue_cells, rate_cells, status_cells
from .line_table import LineTable

COLUMNS = TABLE_COLUMNS
_KEYS = [k for k, _ in COLUMNS]


def row_key(qid: QueueId) -> str:
    """The row key of a queue: ``device#index``."""
    return f"{qid[0]}#{qid[1]}"


class QueueTable(LineTable):
    """One row per queue (key ``device#index``); a new snapshot rewrites
    only the rows whose cells changed, so the cursor and the scroll position
    stay where the user left them.

    ``problems_first``: queues that are not healthy or idle on top, the
    worst first (then device order); else device order (the snapshot's).
    The cursor stays on its queue when the order changes (not on the first
    rows: it starts on top). Enter posts :class:`QueueTable.Selected`.
    """

    @dataclass
    class Selected(Message):
        """Enter on a row: the queue ``(device, index)``."""

        queue: QueueId

    def __init__(self, **kwargs) -> None:
        super().__init__(COLUMNS, right=frozenset(_KEYS) - TEXT_COLUMNS, **kwargs)
        self._ids: dict[str, QueueId] = {}
        self._sorted: list[str] | None = None  # the order last applied; None before the first rows
        self.problems_first = True

    def queue_at(self, row_key: str) -> QueueId:
        """The (device, index) of the row with ``row_key``."""
        return self._ids[row_key]

    def selected(self, row_key: str) -> None:
        self.post_message(self.Selected(self._ids[row_key]))

    def show(self, queues: list[QueueEntry], rates: dict[QueueId, QueueRates],
             diagnoses: dict[QueueId, Diagnosis] | None = None, now: float | None = None) -> None:
        """Bring the rows to ``queues``: update cells, add and drop rows, and
        order them. ``diagnoses``: the verdict per queue; ``now``: the
        snapshot's time (how long a problem has held)."""
        diagnoses = diagnoses or {}
        num_queues: dict[str, int] = {}
        for q in queues:
            num_queues[q.device] = max(num_queues.get(q.device, 0), q.index + 1)
        keys = []
        for q in queues:
            qid = q.id
            key = row_key(qid)
            keys.append(key)
            self._ids[key] = qid
            cells = (queue_cells(q) | rate_cells(rates.get(qid, NO_RATES))
                     | status_cells(q, diagnoses.get(qid), now, num_queues[q.device]))
            self.set_row(key, [(v.plain, str(v.style) or None) if isinstance(v, Text) else (v, None)
                               for v in map(cells.__getitem__, _KEYS)])
        if len(keys) != self.row_count:
            gone = set(self._ids) - set(keys)
            self.remove_rows(gone)
            for key in gone:
                del self._ids[key]
        self._sort(keys, diagnoses)
        self.refresh_rows()

    def toggle_order(self) -> bool:
        """Switch between problems first and device order; returns ``problems_first``."""
        self.problems_first = not self.problems_first
        if self._sorted is not None:
            self._sorted = []  # re-sort at the next show()
        return self.problems_first

    def _sort(self, keys: list[str], diagnoses: dict[QueueId, Diagnosis]) -> None:
        """Order the rows (``keys`` in device order)."""
        if self.problems_first:
            def worst_first(i_key: tuple[int, str]) -> tuple[int, int]:
                d = diagnoses.get(self._ids[i_key[1]])
                return (-d.severity if d is not None else 0, i_key[0])
            order = [k for _, k in sorted(enumerate(keys), key=worst_first)]
        else:
            order = keys
        if order != self._sorted:
            self.set_order(order, keep_cursor=self._sorted is not None)
            self._sorted = order
