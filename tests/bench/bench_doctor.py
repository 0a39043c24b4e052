"""Benchmark: the doctor's cost.

Analyzer: 256 queues (128 net pairs as the back-end reports them, with
EVENT_IDX, device-side fields and counters) over snapshots whose indices
move like a busy device's, a tenth of the TX queues stalled (so the rules
that build evidence run too); ``Analyzer.update`` timed per snapshot. Side
by side, in the same rounds, the snapshot codec's ``from_json`` of the same
snapshots (what every live consumer of a back-end already pays): the ratio
says what the doctor adds to reading a snapshot.

TUI: the CPU time of one refresh with 256 queues (tui.bench.frame_time: a
headless app, every cell changing each round), of the queue table and of
the queue screen on top of it, median over 40 refreshes.

Rounds alternate the two sides; the JSON line carries the median of the
per-round values and their spread (min, max).

Prints ONE JSON line:
{"bench": "doctor", "queues": 256, "analyzer_us_per_queue": median µs per
queue per snapshot, "analyzer_us_spread": [min, max], "codec_us_per_queue":
the same for from_json, "analyzer_vs_codec": median of per-round ratios,
"tui_frame_ms_256q": median ms per refresh of the table,
"tui_queue_screen_frame_ms": the same with the queue screen, "tui_refresh_hz":
1000 / the slower, "goal_met": analyzer ≤ 20 µs and a refresh plus the
analyzer's 256 queues ≤ 100 ms (10 refreshes/s)}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inspector.analysis import Analyzer, Thresholds  # noqa: E402
from inspector.snapshot.codec import from_json, to_json  # noqa: E402
from inspector.snapshot.model import QueueEntry, Snapshot  # noqa: E402

QUEUES = 256
SNAPSHOTS = 200
ROUNDS = 7


def make_snapshot(k: int, t: float) -> Snapshot:
    """Snapshot ``k``: RX queues filled and refilled, TX queues sending,
    every tenth TX stalled with 4 buffers outstanding."""
    qs = []
    for i in range(QUEUES):
        rx = i % 2 == 0
        stalled = not rx and i % 20 == 1
        base = (k * 37 + i) & 0xFFFF
        if stalled:
            avail, used = 1004, 1000
        elif rx:
            avail, used = (base + 200) & 0xFFFF, base
        else:
            avail, used = base, (base - 2) & 0xFFFF
        qs.append(QueueEntry(device=f"net{i // 2}", index=i % 2, size=256, features=0, event_idx=True,
                             device_type="net", avail_idx=avail, used_idx=used,
                             last_avail_idx=used if rx else avail, inflight=(avail - used) & 0xFFFF,
                             used_event=used, avail_event=avail, shadow_avail_idx=avail,
                             kicks=k * 3, calls=k * 2, calls_suppressed=k, packets=k * 37, bytes=k * 37 * 64,
                             dropped=0 if rx else None))
    return Snapshot(source="bench", time=t, queues=qs)


def bench_analyzer() -> tuple[list[float], list[float], list[float]]:
    snaps = [make_snapshot(k, 1e9 + k * 0.1) for k in range(SNAPSHOTS)]
    jsons = [to_json(s) for s in snaps]
    an, co, ratio = [], [], []
    for _ in range(ROUNDS):
        a = Analyzer(Thresholds(stall_s=1.0), notifications_seen=True)
        t = time.perf_counter()
        for s in snaps:
            a.update(s, ())
        ta = (time.perf_counter() - t) / (SNAPSHOTS * QUEUES) * 1e6
        t = time.perf_counter()
        for j in jsons:
            from_json(j)
        tc = (time.perf_counter() - t) / (SNAPSHOTS * QUEUES) * 1e6
        an.append(ta)
        co.append(tc)
        ratio.append(ta / tc)
    stalled = sum(1 for i in range(QUEUES) if i % 20 == 1)
    assert sum(1 for d in a.diagnoses.values() if not d.ok) == stalled, "stalled queues not found"
    return an, co, ratio


def bench_tui() -> tuple[dict, dict]:
    """The TUI's refresh of 256 queues: the queue table, and the queue
    screen of one queue on top (tui.bench.frame_time: CPU time per
    refresh, this process's one core)."""
    from tui.bench import frame_time

    return frame_time(queues=QUEUES), frame_time(queues=QUEUES, queue_screen=True)


def main() -> None:
    an, co, ratio = bench_analyzer()
    table, screen = bench_tui()
    med = statistics.median(an)
    frame = max(table["frame_ms_median"], screen["frame_ms_median"])
    out = {"bench": "doctor", "queues": QUEUES, "analyzer_us_per_queue": round(med, 3),
           "analyzer_us_spread": [round(min(an), 3), round(max(an), 3)],
           "codec_us_per_queue": round(statistics.median(co), 3),
           "analyzer_vs_codec": round(statistics.median(ratio), 3),
           "analyzer_vs_codec_spread": [round(min(ratio), 3), round(max(ratio), 3)],
           "tui_frame_ms_256q": table["frame_ms_median"], "tui_frame_ms_max_256q": table["frame_ms_max"],
           "tui_queue_screen_frame_ms": screen["frame_ms_median"],
           "tui_refresh_hz": round(1000 / frame, 1)}
    # 10 refreshes/s with the analyzer's share of each (256 queues) added.
    out["goal_met"] = med <= 20 and frame + med * QUEUES / 1000 <= 100
    print(json.dumps(out))


if __name__ == "__main__":
    main()
