"""The queue screen's latency histograms (vhost-net probes), when the
source has them (``extras["histograms"]``)."""

from __future__ import annotations

from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from inspector.snapshot.model import QueueEntry

from ..pictures import HISTOGRAM_LABELS, histogram_series, histogram_text


class LatencyPanel(Vertical):
    """One row per histogram: its name in words, a sparkline of its log2
    buckets (lowest left), the buckets of p50 and p99 and the sample count;
    hidden when the queue has none. A row is made the first time its
    histogram shows up, then only updated."""

    def show(self, queue: QueueEntry | None) -> None:
        hists = (queue.extras.get("histograms") if queue is not None else None) or {}
        self.display = bool(hists)
        for i, (name, buckets) in enumerate(hists.items()):
            series = histogram_series(buckets)
            text = histogram_text(buckets) + "  (since the probes attached)"
            rows = self.query(f"#hist-{name}")
            if rows:
                row = rows.first()
                row.query_one(Sparkline).data = series
                row.query_one(".hist-text", Static).update(text)
            else:
                self.mount(Horizontal(
                    Static("latency" if i == 0 else "", classes="label"),
                    Static(HISTOGRAM_LABELS.get(name, name), classes="hist-name"),
                    Sparkline(series, classes="hist-spark"),
                    Static(text, classes="hist-text"),
                    id=f"hist-{name}", classes="hist-row"))
