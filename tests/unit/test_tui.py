"""The TUI: rate arithmetic, shared formatting, the queue screen's pictures
(ring, notifications, histograms), screen snapshots (SVG, from
tests/data/snapshot_sample.json, and the same queues with device types, a
block queue and verdicts), pilot tests of keys and of a source that goes
away, the analyzer's feed, and the CLI's refusal of a source it cannot read.

Snapshots: `pytest tests/unit/test_tui.py --snapshot-update` after a deliberate
change of the screens, then review the SVGs under tests/__snapshots__/.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from inspector.analysis import Analyzer, Diagnosis, Verdict
from inspector.errors import InspectorError, SourceError
from inspector.events import Event
from inspector.snapshot import Snapshot, from_json
from inspector.snapshot.model import QueueEntry
from inspector.sources.base import Source
from inspector.sources.file import FileSource
from tui import bench, pictures, render
from tui.app import VqscopeApp, run_tui
from tui.rates import NO_RATES, QueueRates, RateHistory, per_second, queue_rates
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen
from tui.screens.queue import QueueScreen
from tui.widgets.anomaly_table import AnomalyTable
from tui.widgets.chain_table import ChainTable
from tui.widgets.problem_list import ProblemList
from tui.widgets.queue_table import QueueTable
from tui.widgets.status_header import StatusHeader

from tests.conftest import ROOT, VQSCOPE

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


class FakeAnalyzer(Analyzer):
    """The Analyzer's API with fixed verdicts (queue -> (verdict, evidence)),
    since 3.2 s before each snapshot; every queue not listed healthy.
    Records what it was fed."""

    def __init__(self, verdicts: dict, notifications_seen: bool = True):
        super().__init__(notifications_seen=notifications_seen)
        self.verdicts = verdicts
        self.fed: list[tuple[float, list]] = []
        self._fixed: dict = {}

    def update(self, snap, events=()):
        self.fed.append((snap.time, list(events)))
        for q in snap.queues:
            v, evidence = self.verdicts.get(q.id, (Verdict.HEALTHY, ""))
            self._fixed[q.id] = Diagnosis(q.device, q.index, v, since=snap.time - 3.2, evidence=evidence,
                                          time=snap.time)
        return []

    @property
    def diagnoses(self):
        return dict(self._fixed)

    def diagnosis(self, qid):
        return self._fixed.get(qid)


@pytest.fixture(autouse=True)
def steady_verdicts(monkeypatch):
    """Every app of these tests gets a FakeAnalyzer that finds every queue
    healthy (tests that need a verdict set their own): the screens and keys
    under test do not depend on the analyzer's rules, which have their own
    tests."""
    monkeypatch.setattr("tui.app.Analyzer", lambda thresholds, notifications_seen:
                        FakeAnalyzer({}, notifications_seen))


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


def test_run_tui_takes_the_first_snapshot_before_the_app(monkeypatch):
    # A source that cannot be read at all is an error of the command, not a screen.
    ran = []
    monkeypatch.setattr(VqscopeApp, "run", lambda self: ran.append(self))
    args = argparse.Namespace(connect="/nonexistent/vq.sock", file=None, interval=0.25)
    with pytest.raises(SourceError, match="cannot connect to the introspection socket /nonexistent/vq.sock"):
        run_tui(args)
    assert ran == []


def test_tui_on_a_missing_socket_exits_2_with_the_snapshot_error():
    out = subprocess.run(VQSCOPE + ["tui", "--connect", "/missing.sock"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    snap = subprocess.run(VQSCOPE + ["snapshot", "--connect", "/missing.sock"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [snap.stderr.strip().replace("vqscope snapshot:", "vqscope tui:", 1)]
    assert out.stderr.startswith("vqscope tui: cannot connect to the introspection socket /missing.sock")


# --- verdicts, roles, features (formatting) ------------------------------------

T0 = load().time


def diag(device: str, index: int, verdict: Verdict, since: float = T0 - 3.2, evidence: str = "") -> Diagnosis:
    return Diagnosis(device, index, verdict, since=since, evidence=evidence, time=T0)


@pytest.mark.parametrize("device_type, index, num_queues, text", [
    ("net", 0, 2, "RX"), ("net", 1, 2, "TX"), ("net", 2, 3, "CTRL"), ("net", 2, 4, "RX"),
    ("virtio-net", 1, None, "TX"), ("block", 0, 1, "REQ"), ("console", 0, 4, "RX"), ("console", 3, 4, "TX"),
    ("rng", 0, 1, "FILL"), ("9p", 0, 1, "CONSUME"), (None, 0, 2, "—"), ("net0", 0, 2, "—"),
])
def test_role_text(device_type, index, num_queues, text):
    assert render.role_text(device_type, index, num_queues) == text


def test_features_by_name_with_and_without_the_device_type():
    features = load().queues[0].features  # 0x130018023
    assert render.features_text(features, "net") == "CSUM GUEST_CSUM MAC MRG_RXBUF STATUS INDIRECT_DESC EVENT_IDX VERSION_1"
    # Device-specific bits need the device type; the common ones do not.
    assert render.features_text(features) == "bit 0 bit 1 bit 5 bit 15 bit 16 INDIRECT_DESC EVENT_IDX VERSION_1"
    assert render.features_text(1 << 12, "block") == "MQ"
    assert render.features_text(0) == "0"


def test_the_queue_screen_shows_features_by_name_not_in_hex():
    assert not any(name == "features" for name, _ in render.queue_fields(load().queues[0]))


def test_health_text_says_the_verdict_and_for_how_long():
    assert render.health_text(None).plain == "…"
    assert render.health_text(diag("net0", 1, Verdict.HEALTHY), T0).plain == "● healthy"
    assert render.health_text(diag("net0", 0, Verdict.IDLE), T0).plain == "● idle"
    stalled = render.health_text(diag("blk0", 0, Verdict.DEVICE_STALLED), T0)
    assert stalled.plain == "▲ device_stalled 3.2 s" and "red" in str(stalled.style)
    assert render.health_text(diag("net0", 0, Verdict.STARVED, since=T0 - 75), T0).plain == "▲ starved 75 s"


def test_problem_line():
    d = diag("blk0", 0, Verdict.DEVICE_STALLED, evidence="41 requests available, none returned for 3.2 s")
    assert render.problem_line(d).plain == ("▲ blk0 q0 device_stalled since 08:24:58.0 — 41 requests available, "
                                            "none returned for 3.2 s")


@pytest.mark.parametrize("inflight, size, bar", [
    (0, 256, "[            ]"), (1, 256, "[▏           ]"), (128, 256, "[██████      ]"),
    (256, 256, "[████████████]"), (41, 128, "[███▉        ]"), (999, 256, "[████████████]"),
])
def test_occupancy_bar(inflight, size, bar):
    assert render.occupancy_bar(inflight, size) == bar


def test_durations_and_latencies_for_people():
    assert [render.seconds_text(s) for s in (0.04, 3.24, 42.4, 750, 7560)] == ["0.0 s", "3.2 s", "42 s",
                                                                             "12 min", "2.1 h"]
    assert [render.ns_text(n) for n in (512, 8192, 16384, 1_048_576, 2e9)] == ["512 ns", "8.2 µs", "16 µs",
                                                                             "1.0 ms", "2.0 s"]
    assert render.clock_text(T0) == "08:25:01.2"


# --- the ring picture ------------------------------------------------------------


def queue(**fields) -> QueueEntry:
    base = dict(device="net0", index=1, size=8, features=0, event_idx=True)
    return QueueEntry(**(base | fields))


def test_ring_regions_from_the_indices():
    # used 10, last_avail 13, avail 15 in a ring of 8: slots 2,3,4 taken, 5,6 available.
    r = pictures.ring_regions(queue(used_idx=10, last_avail_idx=13, avail_idx=15))
    assert (r.start, r.taken, r.unknown, r.available, r.free, r.notes) == (2, 3, 0, 2, 3, ())
    assert pictures.ring_bar(r, 8).plain == "░░███▓▓░"


def test_ring_regions_across_the_16_bit_wrap():
    # used_idx 65534, last_avail 1, avail 3 (mod 2^16): 3 taken, 2 available, from slot 6 on.
    r = pictures.ring_regions(queue(used_idx=65534, last_avail_idx=1, avail_idx=3))
    assert (r.start, r.taken, r.available, r.free) == (6, 3, 2, 3)
    assert pictures.ring_bar(r, 8).plain == "█▓▓░░░██"


def test_ring_regions_without_last_avail_idx_never_guess():
    # shadow_avail_idx: what the device read, taken or not, cannot tell; after it: available.
    r = pictures.ring_regions(queue(used_idx=10, avail_idx=15, shadow_avail_idx=12))
    assert (r.taken, r.unknown, r.available) == (0, 2, 3)
    assert pictures.ring_bar(r, 8).plain == "░░▒▒▓▓▓░"
    r = pictures.ring_regions(queue(used_idx=10, avail_idx=15))
    assert (r.taken, r.unknown, r.available) == (0, 5, 0)
    assert "cannot tell" in pictures.ring_legend(r, 8).plain


def test_ring_regions_that_do_not_add_up_are_clamped_and_said():
    r = pictures.ring_regions(queue(used_idx=0, avail_idx=20, last_avail_idx=3))
    assert r.taken + r.unknown + r.available == 8 and "more than the size 8" in r.notes[0]
    r = pictures.ring_regions(queue(used_idx=10, avail_idx=12, last_avail_idx=9))
    assert (r.taken, r.unknown) == (0, 2) and "not between used_idx 10 and avail_idx 12" in r.notes[0]


def test_ring_bar_scales_slots_into_cells():
    q = queue(size=256, used_idx=0, last_avail_idx=1, avail_idx=2)
    r = pictures.ring_regions(q)
    bar = pictures.ring_bar(r, 100)
    assert len(bar.plain) == 100 and bar.plain[0] == "█"  # one slot in flight still shows
    assert bar.plain[1:].count("░") >= 98
    assert len(pictures.ring_bar(pictures.ring_regions(queue(size=8)), 100).plain) == 96  # 12 cells a slot
    assert "1 cell = 2.6 slots" in pictures.ring_legend(r, 100).plain


def test_ring_markers_share_a_label_and_keep_to_the_bar():
    q = queue(size=8, used_idx=10, last_avail_idx=13, avail_idx=15, used_event=10, avail_event=13)
    rows = [t.plain for t in pictures.ring_markers(q, 40)]  # 5 cells a slot
    # ▲ under slot 2 (used, used_event), 5 (last_avail, avail_event), 7 (avail); labels
    # that would run past the bar end at their ▲; overlapping ones take the next row.
    assert rows == ["last_avail/avail_event 13▲ avail 15▲",
                    " " * 10 + "▲used/used_event 10"]
    assert (rows[0].index("▲"), rows[0].rindex("▲"), rows[1].index("▲")) == (25, 35, 10)


def test_ring_picture_of_a_packed_ring_not_read_says_so():
    """A packed queue whose positions were not read (the ring is drawn from
    them: tests/unit/test_tui_packed.py)."""
    lines = [t.plain for t in pictures.ring_picture(queue(layout="packed"), 80)]
    assert lines[-1] == "! the ring's positions were not read"


# --- notifications in words (VIRTIO 1.2 §2.7.7, §2.7.10) ---------------------------


def test_notifications_under_event_idx():
    q = queue(avail_idx=8453, used_idx=8432, avail_event=8449, used_event=8440, kicks=3, calls=9,
              calls_suppressed=16)
    assert pictures.kick_text(q, True) == ("enabled; the device asks for one when avail_idx passes 8449 "
                                           "(EVENT_IDX), avail_idx is 8453; 3 received")
    assert pictures.call_text(q, True) == ("the driver asks for one when used_idx passes 8440 (EVENT_IDX), "
                                           "used_idx is 8432; 9 sent; 16 suppressed so far")
    # The flags do not count under EVENT_IDX (§2.7.10): said, not obeyed.
    q.used_flags = q.avail_flags = 1
    assert "VRING_USED_F_NO_NOTIFY set, ignored under EVENT_IDX" in pictures.kick_text(q, True)
    assert "VRING_AVAIL_F_NO_INTERRUPT set, ignored under EVENT_IDX" in pictures.call_text(q, True)
    q.avail_event = None
    assert pictures.kick_text(q, False).startswith("avail_event not known")


def test_notifications_by_flags_without_event_idx():
    q = queue(event_idx=False, used_flags=1, avail_flags=0)
    assert pictures.kick_text(q, False).startswith("suppressed: VRING_USED_F_NO_NOTIFY set")
    assert pictures.kick_text(q, False).endswith("this source does not see kicks")
    assert pictures.call_text(q, True).startswith("enabled: VRING_AVAIL_F_NO_INTERRUPT clear")
    q.used_flags, q.avail_flags = 0, 1
    assert pictures.kick_text(q, True).startswith("enabled: VRING_USED_F_NO_NOTIFY clear")
    assert pictures.call_text(q, True).startswith("suppressed: VRING_AVAIL_F_NO_INTERRUPT set")


def test_verdict_lines_give_the_evidence_and_the_meaning():
    d = diag("blk0", 0, Verdict.DEVICE_STALLED, evidence="41 requests available, none returned")
    head, meaning = (t.plain for t in pictures.verdict_lines(d, T0))
    assert head == "▲ device_stalled  since 08:24:58.0 (3.2 s) — 41 requests available, none returned"
    assert meaning.startswith("the device holds buffers")
    assert pictures.verdict_lines(None, T0)[0].plain == "… no verdict yet"


# --- latency histograms (vhost-net probes' log2 buckets) --------------------------

HIST = {"1024": 3, "2048": 40, "4096": 120, "8192": 30, "65536": 2}


def test_histogram_series_fills_empty_buckets():
    assert pictures.histogram_series(HIST) == [3, 40, 120, 30, 0, 0, 2]  # 2^10 .. 2^16 ns
    assert pictures.histogram_series({}) == []


def test_histogram_percentiles_are_bucket_ranges():
    assert pictures.percentile_bucket(HIST, 50) == (4096, 8192)
    assert pictures.percentile_bucket(HIST, 98) == (8192, 16384)
    assert pictures.percentile_bucket(HIST, 99) == (65536, 131072)  # 193 of 195 below 65536: not 99 %
    assert pictures.percentile_bucket({}, 50) is None
    assert pictures.histogram_text(HIST) == "p50 4.1–8.2 µs  p99 66–131 µs  (195 samples)"


# --- rate history ---------------------------------------------------------------


def test_rate_history_bins_the_last_minute():
    h = RateHistory(window_s=60.0)
    qid = ("net0", 1)
    for t in range(0, 100):  # one sample a second, kicks/s = t
        h.record(1000.0 + t, {qid: QueueRates(kicks=float(t), calls=None, packets=1.0)})
    # 10 s a bin over the last 60 s (t = 39..99), the last bin up to the last sample.
    assert h.series(qid, "kicks", bins=6) == [43.5, 53.5, 63.5, 73.5, 83.5, 94.0]
    assert h.series(qid, "calls", bins=6) == [0.0] * 6  # never known
    h.record(1100.0, {})
    assert h.series(qid, "kicks") == [0.0] * 60  # the queue left the snapshot
    with pytest.raises(InspectorError, match="window"):
        RateHistory(window_s=0)


# --- the analyzer's feed ----------------------------------------------------------


class EventSource(ScriptedSource):
    """A ScriptedSource that has events: ``events()`` hands out ``batches`` in turn."""

    has_events = True

    def __init__(self, *script, batches=()):
        super().__init__(*script)
        self.batches = list(batches)

    def events(self):
        return self.batches.pop(0) if self.batches else []


def test_the_analyzer_gets_each_new_snapshot_with_the_events_since_the_last():
    first, later = load(SAMPLE), load(LATER)
    kicks = [[Event(1, "net0", 1, "kick")], [Event(2, "net0", 1, "kick")], [Event(3, "net0", 0, "call")]]
    src = EventSource(first, first, later, batches=kicks)
    app = VqscopeApp(src, interval=0.02)
    assert app.analyzer.notifications_seen is True
    fake = app.analyzer = FakeAnalyzer({})

    async def body(pilot):
        await wait_for(pilot, lambda: len(fake.fed) == 2)
        await pilot.pause(0.1)
        # The same snapshot twice is fed once; its events wait for the next new one.
        assert [t for t, _ in fake.fed] == [first.time, later.time]
        assert fake.fed[0][1] == kicks[0] and fake.fed[1][1] == kicks[1] + kicks[2]
        assert set(app.diagnoses) == {("net0", 0), ("net0", 1)}

    run_app(app, body)


class BrokenAnalyzer(FakeAnalyzer):
    """An analyzer whose rules raise (a bug): the live view must go on."""

    def update(self, snap, events=()):
        self.fed.append((snap.time, list(events)))
        raise ZeroDivisionError("a rule divided by zero")


def test_an_analyzer_that_raises_is_reported_once_and_snapshots_go_on():
    first, later = load(SAMPLE), load(LATER)
    app = VqscopeApp(EventSource(first, later, batches=[]), interval=0.02)
    broken = app.analyzer = BrokenAnalyzer({})

    async def body(pilot):
        await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.time == later.time)
        assert len(broken.fed) == 2
        notes = [n.message for n in app._notifications]
        assert len(notes) == 1 and "analyzer error" in notes[0] and "divided by zero" in notes[0]

    run_app(app, body)


def test_a_source_without_events_says_so_to_the_analyzer():
    assert VqscopeApp(sample_source()).analyzer.notifications_seen is False


# --- verdicts on screen --------------------------------------------------------------

STALLED_EVIDENCE = "41 requests available, none returned for 3.2 s; 3 kicks received"


def doctor_snapshot() -> Snapshot:
    """The sample with device types, and a block queue: 30 requests taken
    and not returned, 11 available and not taken."""
    obj = json.loads(SAMPLE.read_text())
    rx, tx = obj["queues"]
    for q in (rx, tx):
        q["device_type"] = "net"
    tx["calls_suppressed"] = 16
    tx["histograms"] = {"kick_to_handler_ns": HIST, "used_to_call_ns": {"512": 10, "1024": 90, "2048": 5}}
    blk = copy.deepcopy(tx)
    del blk["histograms"]
    blk.update(device="blk0", index=0, device_type="block", size=128, features=(1 << 32) | (1 << 29) | (1 << 9),
               avail_idx=1201, used_idx=1160, last_avail_idx=1190, inflight=41, used_event=1160, avail_event=1191,
               avail_flags=0, used_flags=0, kicks=3, calls=1160, calls_suppressed=0, anomalies=[],
               chains=tx["chains"][:1])
    obj["queues"].append(blk)
    return from_json(obj)


def doctor_app(**kw) -> VqscopeApp:
    src = ScriptedSource(doctor_snapshot())
    src.has_events = True
    app = VqscopeApp(src, **kw)
    app.analyzer = FakeAnalyzer({("blk0", 0): (Verdict.DEVICE_STALLED, STALLED_EVIDENCE),
                                 ("net0", 0): (Verdict.IDLE, "")})
    return app


def test_snapshot_queue_table_with_health(snap_compare):
    """Main screen: blk0 q0 device_stalled first (▲ red, 3.2 s), then net0 RX idle and TX healthy;
    roles, occupancy bars; under the table the stalled queue's line with its evidence; "1 problem"."""
    assert snap_compare(doctor_app(), terminal_size=SIZE, run_before=_first_snapshot)


def test_snapshot_queue_screen_of_a_stalled_queue(snap_compare):
    """Queue screen of blk0 q0: REQ, features by name; the ring (30 taken █, 11 available ▓, markers
    used/used_event 1160, last_avail 1190, avail_event 1191, avail 1201); kicks and calls in words;
    the verdict device_stalled with its evidence and meaning."""
    assert snap_compare(doctor_app(), terminal_size=(160, 40), run_before=_first_snapshot, press=["enter"])


def test_snapshot_queue_screen_with_latency_histograms(snap_compare):
    """Queue screen of net0 q1 (TX) with the vhost-net probes' histograms: kick → handler and
    used → call, each a sparkline of its log2 buckets with p50/p99."""
    assert snap_compare(doctor_app(), terminal_size=(160, 40), run_before=_first_snapshot,
                        press=["down", "down", "enter"])


def test_problems_first_and_s_toggles_device_order_keeping_the_cursor_on_its_queue():
    app = doctor_app(interval=0.02)

    async def body(pilot):
        await _first_snapshot(pilot)
        table = app.screen.query_one(QueueTable)
        assert table.order == ["blk0#0", "net0#0", "net0#1"] and table.cursor_row == 0
        assert "1 problem" in header_text(app)
        problems = str(app.screen.query_one(ProblemList).render())
        assert problems == f"▲ blk0 q0 device_stalled since 08:24:58.0 — {STALLED_EVIDENCE}"
        assert table.get_cell("blk0#0", "health").plain == "▲ device_stalled 3.2 s"
        assert table.get_cell("net0#0", "role").plain == "RX" and table.get_cell("blk0#0", "role").plain == "REQ"
        await pilot.press("s")
        await wait_for(pilot, lambda: table.order == ["net0#0", "net0#1", "blk0#0"])
        assert table.cursor_row == 2  # still on blk0
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, QueueScreen) and app.screen.queue == ("blk0", 0)

    run_app(app, body)


def test_a_verdict_that_clears_leaves_the_problem_lines():
    app = doctor_app(interval=0.02)
    later = doctor_snapshot()
    later.time += 1

    async def body(pilot):
        await _first_snapshot(pilot)
        assert "1 problem" in header_text(app)
        app.analyzer.verdicts = {}
        app.source.script.append(later)
        await wait_for(pilot, lambda: "no problems" in header_text(app))
        assert str(app.screen.query_one(ProblemList).render()).startswith("● no problems")
        assert app.screen.query_one(QueueTable).order == ["net0#0", "net0#1", "blk0#0"]  # device order again

    run_app(app, body)


def test_bench_frame_time_runs_headless():
    r = bench.frame_time(queues=16, refreshes=3, size=(120, 30))
    assert r["queues"] == 16 and r["refreshes"] == 3 and r["frame_ms_median"] > 0
