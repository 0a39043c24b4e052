"""The queue screen's rates: kicks/s, calls/s and packets/s now, and over
the last minute as sparklines."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static

from ..rates import QueueRates, RateHistory
from ..render import rate_text

#: (QueueRates field, label) of each sparkline.
SERIES = (("kicks", "kicks/s"), ("calls", "calls/s"), ("packets", "pkts/s"))


class RateSparklines(Horizontal):
    """``rates  kicks/s 100 ▁▂▃▅  calls/s 20.0 ▁▁▂  pkts/s 120 ▃▅▇  (last 60 s)``."""

    def compose(self) -> ComposeResult:
        yield Static("rates", classes="label")
        for field, label in SERIES:
            yield Static(label, id=f"{field}-now", classes="rate-now")
            yield Sparkline([], id=f"{field}-spark", classes="rate-spark")
        yield Static(f"(last {self.app.history.window_s:g} s)", id="rates-window", classes="rate-window")

    def show(self, rates: QueueRates, history: RateHistory, qid) -> None:
        """The rates of the last snapshot and ``history`` of queue ``qid``."""
        for field, label in SERIES:
            # A fixed width (vqscope.tcss): no layout for a new number.
            self.query_one(f"#{field}-now", Static).update(f"{label} {rate_text(getattr(rates, field))}",
                                                           layout=False)
            self.query_one(f"#{field}-spark", Sparkline).data = history.series(qid, field)
