"""Below the queue table: one line per queue that is not healthy or idle."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from inspector.analysis import Diagnosis
from inspector.snapshot.model import QueueId

from ..render import problem_line


def problems(diagnoses: dict[QueueId, Diagnosis], order: list[QueueId] | None = None) -> list[Diagnosis]:
    """The diagnoses that are not healthy or idle, the worst first, then in
    ``order`` (queue ids; default: the dict's order)."""
    rank = {qid: i for i, qid in enumerate(order if order is not None else diagnoses)}
    bad = [d for d in diagnoses.values() if not d.ok]
    return sorted(bad, key=lambda d: (-d.severity, rank.get(d.id, len(rank))))


class ProblemList(Static):
    """``▲ net0 q1 device_stalled since 08:25:01.2 — evidence`` per problem,
    or one line saying there is none; redrawn only when the lines change."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        # The lines shown; None: "no verdict yet"; False: nothing yet.
        self._lines: list[str] | None | bool = False

    def show(self, diagnoses: dict[QueueId, Diagnosis], order: list[QueueId]) -> None:
        """The problems among ``diagnoses`` (queues of ``order``, the snapshot's)."""
        ids = set(order)
        bad = problems({k: d for k, d in diagnoses.items() if k in ids}, order)
        lines = [problem_line(d) for d in bad]
        shown = [line.plain for line in lines] if diagnoses else None
        if shown == self._lines:
            return
        self._lines = shown
        self.set_class(bool(bad), "-problems")
        if not diagnoses:
            self.update(Text("no verdict yet", style="dim"))
        elif not bad:
            self.update(Text("● no problems: every queue is healthy or idle", style="green"))
        else:
            self.update(Text("\n").join(lines))
