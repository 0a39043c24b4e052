"""The TUI: rate arithmetic, shared formatting, screen snapshots (SVG, from
tests/data/snapshot_sample.json) and pilot tests of keys and of a source
that goes away.

Snapshots: `pytest tests/unit/test_tui.py --snapshot-update` after a deliberate
change of the screens, then review the SVGs under tests/__snapshots__/.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from inspector.errors import InspectorError, SourceError
from inspector.snapshot import Snapshot, from_json
from inspector.sources.base import Source
from inspector.sources.file import FileSource
from tui import render
from tui.app import VqscopeApp, run_tui
from tui.rates import NO_RATES, QueueRates, per_second, queue_rates
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen
from tui.screens.queue import QueueScreen
from tui.widgets.anomaly_table import AnomalyTable
from tui.widgets.chain_table import ChainTable
from tui.widgets.queue_table import QueueTable
from tui.widgets.status_header import StatusHeader

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE = DATA / "snapshot_sample.json"
LATER = DATA / "snapshot_sample_later.json"  # SAMPLE 0.5 s later, counters advanced
SIZE = (200, 30)


def load(path: Path = SAMPLE) -> Snapshot:
    return from_json(json.loads(path.read_text()))


def sample_source() -> FileSource:
    src = FileSource(str(SAMPLE))
    src.name = "snapshot_sample.json"  # not the checkout's absolute path: snapshots stay stable
    return src


class ScriptedSource(Source):
    """Answers with the snapshots (or raises the SourceErrors) of ``script``
    in turn, then repeats the last entry; counts the calls."""

    name = "scripted"

    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0
        self.lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        with self.lock:
            item = self.script[min(self.calls, len(self.script) - 1)]
            self.calls += 1
        if isinstance(item, Exception):
            raise item
        return item


async def wait_for(pilot, condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.02)


def run_app(app: VqscopeApp, body) -> None:
    """Run ``body(pilot)`` against ``app`` headless."""

    async def main():
        async with app.run_test(size=SIZE) as pilot:
            await body(pilot)

    asyncio.run(main())


def header_text(app) -> str:
    return str(app.screen.query_one(StatusHeader).render())


# --- rates -----------------------------------------------------------------


def test_per_second_is_count_increase_over_time_increase():
    assert per_second(100, 150, 10.0, 10.5) == 100.0
    assert per_second(7, 7, 0.0, 2.0) == 0.0


def test_per_second_unknown_when_time_stands_still_or_goes_back():
    assert per_second(1, 5, 10.0, 10.0) is None
    assert per_second(1, 5, 10.0, 9.0) is None


def test_per_second_unknown_when_counter_was_reset():
    # A restarted back-end counts from 0 again; a negative rate would be a lie.
    assert per_second(500, 3, 10.0, 11.0) is None


def test_queue_rates_between_two_samples():
    rates = queue_rates(load(SAMPLE), load(LATER))
    # TX (queue 1): kicks 7390→7440, calls 512→522, packets 7418→7478 in 0.5 s
    assert rates[("net0", 1)] == QueueRates(kicks=100.0, calls=20.0, packets=120.0)
    # RX (queue 0): kicks 131→133, calls 4090→4140, packets 4098→4198
    assert rates[("net0", 0)] == QueueRates(kicks=4.0, calls=100.0, packets=200.0)


def test_queue_rates_without_history():
    cur = load(SAMPLE)
    assert queue_rates(None, cur) == {("net0", 0): NO_RATES, ("net0", 1): NO_RATES}
    prev = load(SAMPLE)
    prev.queues = prev.queues[:1]  # queue 1 appeared since
    cur.time += 1
    rates = queue_rates(prev, cur)
    assert rates[("net0", 1)] == NO_RATES
    assert rates[("net0", 0)] == QueueRates(0.0, 0.0, 0.0)


# --- formatting ------------------------------------------------------------


@pytest.mark.parametrize("fn, flags, text", [
    (render.avail_flags_text, 0, "0"),
    (render.avail_flags_text, 1, "NO_INTERRUPT"),
    (render.used_flags_text, 1, "NO_NOTIFY"),
    (render.used_flags_text, 0x8001, "NO_NOTIFY|0x8000"),  # unknown bits are shown, not dropped
    (render.desc_flags_text, 1, "NEXT"),
    (render.desc_flags_text, 2, "WRITE"),
    (render.desc_flags_text, 4, "INDIRECT"),
    (render.desc_flags_text, 3, "NEXT|WRITE"),
    (render.desc_flags_text, 0x17, "NEXT|WRITE|INDIRECT|0x10"),
])
def test_flag_decoding(fn, flags, text):
    assert fn(flags) == text


def test_null_fields_are_dashes():
    q = load().queues[0]
    q.last_avail_idx = q.used_event = q.avail_event = None
    cells = render.queue_cells(q)
    assert (cells["last_avail_idx"], cells["used_event"], cells["avail_event"]) == ("—", "—", "—")
    assert render.rate_text(None) == "—"
    assert render.rate_text(12.345) == "12.3" and render.rate_text(12345.6) == "12,346"


def test_time_is_utc_with_milliseconds():
    assert render.time_text(1763713501.25) == "2025-11-21 08:25:01.250 UTC"


def test_anomaly_count_highlighted_only_when_nonzero():
    rx, tx = load().queues
    assert render.anomaly_count(rx).plain == "0" and not render.anomaly_count(rx).style
    assert render.anomaly_count(tx).plain == "1" and render.anomaly_count(tx).style == render.ANOMALY_STYLE


def test_chain_rows_put_head_and_totals_on_first_descriptor():
    indirect = load().queues[1].chains[1]
    rows = render.chain_rows(indirect)
    assert len(rows) == 4
    assert rows[0][:2] == ["14", "0"] and rows[0][4] == "INDIRECT" and rows[0][6:] == ["1526", "0"]
    assert rows[1][0] == "" and rows[1][4] == "NEXT" and rows[1][6:] == ["", ""]


def test_snapshot_table_has_queue_columns_without_rates():
    snap = load()
    snap.queues[0].last_avail_idx = None
    table = render.snapshot_table(snap)
    headers = [c.header for c in table.columns]
    assert headers[:4] == ["device", "q", "size", "avail_idx"] and headers[-1] == "anom"
    assert not {"kicks/s", "calls/s", "pkts/s"} & set(headers)
    assert table.row_count == 2
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    text = out.getvalue()
    assert "NO_INTERRUPT" in text and "NO_NOTIFY" in text and "—" in text
    assert "2025-11-21 08:25:01.250 UTC" in text


# --- screens (SVG snapshots) -----------------------------------------------


async def _first_snapshot(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.snapshot is not None)
    await pilot.pause()


def test_snapshot_queue_table(snap_compare):
    """Main screen: both queues of net0, TX with NO_INTERRUPT/NO_NOTIFY and one anomaly."""
    assert snap_compare(VqscopeApp(sample_source()), terminal_size=SIZE, run_before=_first_snapshot)


def test_snapshot_queue_screen(snap_compare):
    """Queue screen of net0 queue 1: fields, three chains (one indirect), the anomaly."""
    assert snap_compare(VqscopeApp(sample_source()), terminal_size=SIZE,
                        run_before=_first_snapshot, press=["down", "enter"])


def test_snapshot_help_screen(snap_compare):
    assert snap_compare(VqscopeApp(sample_source()), terminal_size=SIZE,
                        run_before=_first_snapshot, press=["question_mark"])


# --- keys (pilot) ----------------------------------------------------------


def test_enter_opens_queue_screen_and_escape_returns():
    app = VqscopeApp(sample_source(), interval=0.02)

    async def body(pilot):
        await _first_snapshot(pilot)
        await pilot.press("down", "enter")
        await pilot.pause()
        assert isinstance(app.screen, QueueScreen) and app.screen.queue == ("net0", 1)
        chains = app.screen.query_one(ChainTable)
        heads = [chains.get_row_at(i)[0] for i in range(chains.row_count)]
        assert [h for h in heads if h] == ["12", "14", "20"]
        assert chains.row_count == 8  # 2 + (INDIRECT head + 3 table descs) + 2
        anomalies = app.screen.query_one(AnomalyTable)
        assert anomalies.get_row_at(0)[0] == "next_out_of_range"
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        assert app.screen.query_one(QueueTable).cursor_row == 1

    run_app(app, body)


def test_enter_on_first_row_opens_queue_zero():
    app = VqscopeApp(sample_source(), interval=0.02)

    async def body(pilot):
        await _first_snapshot(pilot)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, QueueScreen) and app.screen.queue == ("net0", 0)
        chains = app.screen.query_one(ChainTable)
        assert [chains.get_row_at(i)[4] for i in range(chains.row_count)] == ["WRITE", "WRITE"]
        assert app.screen.query_one(AnomalyTable).row_count == 0

    run_app(app, body)


def test_question_mark_opens_help_and_escape_closes_it():
    app = VqscopeApp(sample_source(), interval=0.02)

    async def body(pilot):
        await _first_snapshot(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        await pilot.press("question_mark", "question_mark")  # ? toggles; no help stacked on help
        await pilot.pause()
        assert isinstance(app.screen, MainScreen) and len(app.screen_stack) == 1

    run_app(app, body)


def test_q_quits():
    app = VqscopeApp(sample_source(), interval=0.02)
    seen = {}

    async def body(pilot):
        await _first_snapshot(pilot)
        await pilot.press("q")
        await pilot.pause()
        seen["running"] = app.is_running

    run_app(app, body)
    assert seen["running"] is False


def test_q_quits_from_queue_screen():
    app = VqscopeApp(sample_source(), interval=0.02)
    seen = {}

    async def body(pilot):
        await _first_snapshot(pilot)
        await pilot.press("enter", "q")
        await pilot.pause()
        seen["running"] = app.is_running

    run_app(app, body)
    assert seen["running"] is False


# --- live data -------------------------------------------------------------


def test_rows_update_in_place_with_rates_and_cursor_kept():
    src = ScriptedSource(load(SAMPLE), load(SAMPLE), load(LATER))
    app = VqscopeApp(src, interval=0.02)

    async def body(pilot):
        await _first_snapshot(pilot)
        table = app.screen.query_one(QueueTable)
        table.move_cursor(row=1)
        await wait_for(pilot, lambda: app.snapshot.time == load(LATER).time)
        await pilot.pause()
        assert table.row_count == 2 and table.cursor_row == 1
        assert table.get_cell("net0#1", "kicks").plain == "7440"
        assert table.get_cell("net0#1", "kicks_s").plain == "100"
        assert table.get_cell("net0#1", "calls_s").plain == "20.0"
        assert table.get_cell("net0#0", "packets_s").plain == "200"

    run_app(app, body)


def test_queue_screen_follows_new_snapshots():
    later = load(LATER)
    later.queues[1].chains = later.queues[1].chains[:1]
    later.queues[1].anomalies = []
    gate = threading.Event()

    class GatedSource(ScriptedSource):
        def snapshot(self):
            return load(SAMPLE) if not gate.is_set() else later

    app = VqscopeApp(GatedSource(), interval=0.02)

    async def body(pilot):
        await _first_snapshot(pilot)
        await pilot.press("down", "enter")
        await pilot.pause()
        chains = app.screen.query_one(ChainTable)
        assert chains.row_count == 8
        gate.set()
        await wait_for(pilot, lambda: chains.row_count == 2)
        assert app.screen.query_one(AnomalyTable).row_count == 0

    run_app(app, body)


def test_source_gone_keeps_last_data_and_keeps_retrying():
    gone = SourceError("back-end at /tmp/vq.sock.introspect closed the introspection connection")
    src = ScriptedSource(load(SAMPLE), gone)
    app = VqscopeApp(src, interval=0.02)

    async def body(pilot):
        await wait_for(pilot, lambda: "source gone" in header_text(app))
        assert "source gone: back-end at /tmp/vq.sock.introspect closed" in header_text(app)
        assert app.screen.query_one(StatusHeader).has_class("-gone")
        assert app.is_running
        # The last snapshot stays on screen.
        assert app.screen.query_one(QueueTable).row_count == 2
        assert "2 queues" in header_text(app) and "08:25:01.250" in header_text(app)
        calls = src.calls
        await wait_for(pilot, lambda: src.calls >= calls + 3)  # still asking
        # Back again: status returns to live.
        src.script.append(load(LATER))
        await wait_for(pilot, lambda: header_text(app).endswith("live"))
        assert not app.screen.query_one(StatusHeader).has_class("-gone")

    run_app(app, body)


def test_source_gone_from_the_start():
    src = ScriptedSource(SourceError("cannot connect to the introspection socket /x: No such file"))
    app = VqscopeApp(src, interval=0.02)

    async def body(pilot):
        await wait_for(pilot, lambda: "source gone: cannot connect" in header_text(app))
        assert app.snapshot is None and app.screen.query_one(QueueTable).row_count == 0
        assert app.is_running

    run_app(app, body)


# --- construction ----------------------------------------------------------


@pytest.mark.parametrize("interval", [0, -1.0])
def test_interval_must_be_positive(interval):
    with pytest.raises(InspectorError, match="interval"):
        VqscopeApp(sample_source(), interval=interval)


def test_run_tui_opens_the_named_source(monkeypatch):
    seen = {}

    def fake_run(self):
        seen.update(name=self.source.name, interval=self.interval, snap=self.source.snapshot())

    monkeypatch.setattr(VqscopeApp, "run", fake_run)
    args = argparse.Namespace(connect=None, file=str(SAMPLE), interval=0.1)
    assert run_tui(args) == 0
    assert seen == {"name": str(SAMPLE), "interval": 0.1, "snap": load(SAMPLE)}


def test_run_tui_without_source_is_an_inspector_error():
    with pytest.raises(SourceError, match="no source given"):
        run_tui(argparse.Namespace(connect=None, file=None, interval=0.25))


def test_default_interval_is_at_least_four_per_second():
    assert VqscopeApp(sample_source()).interval <= 0.25
