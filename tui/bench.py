"""The TUI's frame time, for ``make bench-doctor``: a headless app shows a
snapshot of many queues again and again, every cell changing each time.

:func:`frame_time` is the entry point; it needs no source, no analyzer
rules and no terminal.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from inspector.analysis import Diagnosis, Verdict
from inspector.snapshot.model import Chain, Descriptor, QueueEntry, Snapshot
from inspector.spec.virtio import VRING_DESC_F_NEXT
from inspector.sources.base import Source

from .app import VqscopeApp
from .rates import queue_rates

T0 = 1763713501.25


def bench_chains(first_head: int, n: int) -> list[Chain]:
    """``n`` two-descriptor chains (a 12-byte header, a 1514-byte frame)."""
    out = []
    for k in range(n):
        head = (first_head + 2 * k) % 256
        descs = (Descriptor(0x10000 * head, 12, VRING_DESC_F_NEXT, head + 1), Descriptor(0x10000 * head + 64, 1514, 0, 0))
        out.append(Chain(head, descs, 1526, 0))
    return out


def bench_snapshot(queues: int, step: int, size: int = 256) -> Snapshot:
    """``queues`` net queues (``net{i // 2}``, RX and TX) at round ``step``:
    indices and counters advance with ``step``, so every moving cell of the
    queue table changes from one round to the next; the first queue has 64
    chains in flight that move each round (the queue screen's chain table)."""
    entries = []
    for i in range(queues):
        used = (1000 * i + 37 * step) & 0xFFFF
        inflight = (i + step) % size
        entries.append(QueueEntry(
            device=f"net{i // 2}", index=i % 2, device_type="net", size=size,
            features=(1 << 32) | (1 << 29) | (1 << 28) | (1 << 15), event_idx=True,
            avail_idx=(used + inflight) & 0xFFFF, used_idx=used, last_avail_idx=(used + inflight // 2) & 0xFFFF,
            inflight=inflight, used_event=used, avail_event=(used + inflight) & 0xFFFF,
            kicks=100 * step + i, calls=90 * step + i, packets=1000 * step + 3 * i, bytes=1500 * step,
            chains=bench_chains(step, 64) if i == 0 else None))
    return Snapshot(source="bench", time=T0 + 0.1 * step, queues=entries)


def bench_diagnoses(snap: Snapshot, step: int) -> dict:
    """Every eighth queue device_stalled (since round 0), the rest healthy;
    the stalled set moves by one queue every ten rounds (the order changes)."""
    out = {}
    for n, q in enumerate(snap.queues):
        bad = (n + step // 10) % 8 == 0
        v = Verdict.DEVICE_STALLED if bad else Verdict.HEALTHY
        out[q.id] = Diagnosis(q.device, q.index, v, since=T0, time=snap.time,
                              evidence=f"{q.inflight} buffers available, none returned" if bad else "")
    return out


class _First(Source):
    """Answers with round 0 (the poll worker asks once: the interval is an hour)."""

    name = "bench"

    def __init__(self, queues: int):
        self.queues = queues

    def snapshot(self) -> Snapshot:
        return bench_snapshot(self.queues, 0)


class _EncodingApp(VqscopeApp):
    """A VqscopeApp that encodes each screen update into terminal text, as
    a run in a terminal does (a headless app skips that step)."""

    def _display(self, screen, renderable) -> None:
        render_segments = getattr(renderable, "render_segments", None)  # a compositor update
        if render_segments is not None:
            render_segments(self.console)
        super()._display(screen, renderable)


async def _frames(queues: int, refreshes: int, size: tuple[int, int], queue_screen: bool) -> list[float]:
    app = _EncodingApp(_First(queues), interval=3600)
    times = []
    async with app.run_test(size=size) as pilot:
        prev = None
        for step in range(refreshes + 2):
            snap = bench_snapshot(queues, step)
            started = time.process_time()
            app.show(snap, queue_rates(prev, snap), bench_diagnoses(snap, step))
            await pilot.pause()
            times.append(time.process_time() - started)
            prev = snap
            if step == 0 and queue_screen:
                await pilot.press("enter")
                await pilot.pause()
    return times[2:]  # the first two build the rows and the screen


def frame_time(queues: int = 256, refreshes: int = 40, size: tuple[int, int] = (200, 50),
               queue_screen: bool = False) -> dict:
    """CPU seconds (this process, one core) to take one refresh of
    ``queues`` queues — set rates, diagnoses and snapshot, let the screens
    update their widgets, compose the frame and encode it for the terminal
    — over ``refreshes`` rounds of a headless app of ``size`` (columns,
    rows); ``queue_screen``: with the queue screen of the first queue (64
    chains in flight, all moving) open on top. The analyzer is not in it
    (its verdicts are given). Returns ``{"queues",
    "refreshes", "frame_ms_median", "frame_ms_max", "refreshes_per_s"}``
    (the last: 1 / median)."""
    times = asyncio.run(_frames(queues, refreshes, size, queue_screen))
    median = statistics.median(times)
    return {"queues": queues, "refreshes": len(times), "frame_ms_median": round(median * 1e3, 2),
            "frame_ms_max": round(max(times) * 1e3, 2), "refreshes_per_s": round(1 / median, 1)}


if __name__ == "__main__":
    import json

    print(json.dumps(frame_time()))
    print(json.dumps(frame_time(queue_screen=True)))
