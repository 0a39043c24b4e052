"""One queue: why it is in the state it is, with the numbers that prove it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from rich.text import Text
from textual.widgets import Footer, Static

from inspector.snapshot.model import QueueEntry

from ..pictures import call_text, kick_text, verdict_lines
from ..rates import NO_RATES
from ..render import features_text, labeled, role_text
from ..render_blk import blk_stats
from ..widgets.anomaly_table import AnomalyTable
from ..widgets.blk_panel import BlkPanel
from ..widgets.iotlb_panel import IotlbPanel
from ..widgets.chain_table import ChainTable
from ..widgets.latency_panel import LatencyPanel
from ..widgets.queue_fields import QueueFields
from ..widgets.rate_sparklines import RateSparklines
from ..widgets.ring_view import RingView
from ..widgets.status_header import StatusHeader
from .live import LiveScreen


def title_text(queue: QueueEntry, num_queues: int | None = None) -> str:
    """``net0 · queue 1 (TX) · split · size 256 · VERSION_1 EVENT_IDX ...``."""
    return (f"{queue.device} · queue {queue.index} ({role_text(queue.device_type, queue.index, num_queues)}) · "
            f"{queue.layout} · size {queue.size} · {features_text(queue.features, queue.device_type)}")


class QueueScreen(LiveScreen):
    """Follows queue ``index`` of ``device`` through every new snapshot: the
    title (role, layout, size, features by name), the ring, the
    notification state in words, the verdict with its evidence, the rates of
    the last minute, latency histograms where the source has them, a block
    queue's back-end counters (BlkPanel), an IOVA-addressed queue's IOTLB
    (IotlbPanel), every field, the in-flight chains
    (built for this queue only; a block queue's with their requests) and
    the anomalies."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, device: str, index: int) -> None:
        super().__init__()
        self.queue = (device, index)
        self._shown: dict[str, tuple[str, ...]] = {}

    def compose(self) -> ComposeResult:
        device, index = self.queue
        yield StatusHeader()
        yield from self.verdict_timeline()
        yield Static(f"{device} · queue {index}", classes="title", id="title")
        with VerticalScroll(id="upper"):
            yield RingView(id="ring")
            yield Static(id="notifications", classes="panel")
            yield Static(id="verdict", classes="panel")
            yield RateSparklines(id="rates")
            yield LatencyPanel(id="latency")
            yield BlkPanel(id="blk", classes="panel")
            yield IotlbPanel(id="iotlb", classes="panel")
            yield QueueFields()
        yield Static("in-flight chains (made available, not yet taken by the device)", classes="section")
        yield ChainTable(id="chains")
        yield Static("anomalies", classes="section")
        yield AnomalyTable(id="anomalies")
        yield from self.replay_bar()
        yield Footer()

    def show_queues(self, queues: list[QueueEntry]) -> None:
        app = self.app
        queue = next((q for q in queues if q.id == self.queue), None)
        if queue is not None:
            num_queues = max(q.index for q in queues if q.device == queue.device) + 1
            self._update("#title", title_text(queue, num_queues))
            seen = app.notifications_seen
            self._update("#notifications", (("kicks", f"driver → device: {kick_text(queue, seen)}"),
                                            ("calls", f"device → driver: {call_text(queue, seen)}")))
        else:
            self._update("#notifications", ())
        now = app.snapshot.time if app.snapshot is not None else None
        lines = verdict_lines(app.diagnoses.get(self.queue), now)
        self._update("#verdict", tuple(("verdict" if i == 0 else "", t) for i, t in enumerate(lines)))
        self.query_one(RingView).show(queue)
        self.query_one(RateSparklines).show(app.rates.get(self.queue, NO_RATES), app.history, self.queue)
        self.query_one(LatencyPanel).show(queue)
        self.query_one(BlkPanel).show(queue)
        self.query_one(IotlbPanel).show(queue)
        self.query_one(QueueFields).show(queue)
        chains = queue.chains if queue else []
        # A block queue's chains with their requests (decoded, or the back-end counts them).
        self.query_one(ChainTable).show(chains, blk=blk_stats(queue) is not None
                                        or any(c.request is not None for c in chains))
        self.query_one(AnomalyTable).show(queue.anomalies if queue else [])

    def _update(self, selector: str, content: str | tuple[tuple[str, Text | str], ...]) -> None:
        """Update the Static ``selector`` with ``content`` (a string, or
        labeled rows) only when it changed: each update lays the screen out."""
        key = (content,) if isinstance(content, str) else tuple(str(t) for _, t in content)
        old = self._shown.get(selector)
        if old == key:
            return
        self._shown[selector] = key
        # Lines of the same lengths wrap the same: no layout needed.
        same_size = old is not None and [len(t) for t in old] == [len(t) for t in key]
        self.query_one(selector, Static).update(content if isinstance(content, str) else labeled(list(content)),
                                                layout=not same_size)
