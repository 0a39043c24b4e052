"""``vqscope doctor``: watch a source for a few seconds and say, per queue,
what is wrong (README "Diagnosing a stuck queue").

Exit status: 0 every queue healthy or idle, 1 a problem found, 2 could not
look (the source cannot be opened, or went away before the watch ended).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from ..analysis import MEANING, Analyzer, Diagnosis, Thresholds, Verdict, diagnosis_to_json
from ..errors import ArgumentError, SourceError
from ..sources import open_source
from ..sources.replay import ReplaySource

EXIT_HEALTHY, EXIT_PROBLEM, EXIT_COULD_NOT_LOOK = 0, 1, 2


def clock(t: float) -> str:
    """``HH:MM:SS.s`` (UTC) of a time in seconds since the epoch."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S.%f")[:10]


def problem_line(d: Diagnosis, now: float) -> str:
    """One line for a queue that is not healthy: ``device qN verdict since
    HH:MM:SS.s (T s) — evidence``."""
    return f"{d.device} q{d.index} {d.verdict.value} since {clock(d.since)} ({now - d.since:.1f} s) — {d.evidence}"


def summary_line(diagnoses: list[Diagnosis], watched: float, source: str) -> str:
    """The one-line summary: queues, how many ok, the problems by verdict."""
    bad = [d for d in diagnoses if not d.ok]
    counts: dict[str, int] = {}
    for d in diagnoses:
        counts[d.verdict.value] = counts.get(d.verdict.value, 0) + 1
    parts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    head = f"{len(bad)} problem{'s' if len(bad) != 1 else ''}" if bad else "no problem"
    return f"{head}: {len(diagnoses)} queues of {source} over {watched:.1f} s ({parts or 'none'})"


def thresholds(args: argparse.Namespace) -> Thresholds | None:
    """The Thresholds of ``--stall-after`` (None when not given: the
    defaults, or a recording's own); ArgumentError when it is not > 0."""
    stall = getattr(args, "stall_after", None)
    if stall is None:
        return None
    if not stall > 0:
        raise ArgumentError(f"--stall-after {stall} is invalid: give seconds > 0")
    return Thresholds(stall_s=stall)


def watch(source, analyzer: Analyzer, duration: float, interval: float,
          sleep=time.sleep) -> tuple[list[Diagnosis], float, list[Diagnosis]]:
    """Poll ``source`` every ``interval`` s for ``duration`` s, feeding
    ``analyzer`` with each snapshot and the events drained with it. Returns
    (the final diagnoses in queue order, seconds watched, every verdict
    change seen). SourceError from the first snapshot propagates; one later
    ends the watch early (its message printed to stderr)."""
    changes: list[Diagnosis] = []
    first = None
    last_time = 0.0
    order: list = []
    while True:
        started = time.monotonic()
        try:
            snap = source.snapshot()
            events = source.events()
        except SourceError as e:
            if first is None:
                raise
            print(f"vqscope doctor: {e}; verdicts as of {clock(last_time)}", file=sys.stderr)
            break
        if snap.time != last_time:   # a file source, or a back-end that did not move: nothing new
            changes += analyzer.update(snap, events)
            last_time = snap.time
        order = [q.id for q in snap.queues]
        if first is None:
            first = started
        if time.monotonic() - first >= duration:
            break
        sleep(max(0.0, interval - (time.monotonic() - started)))
    diag = analyzer.diagnoses
    return [diag[qid] for qid in order if qid in diag], time.monotonic() - first, changes


def doctor_main(args: argparse.Namespace) -> int:
    """``vqscope doctor``: see the module docstring."""
    given = thresholds(args)
    th = given or Thresholds()
    if not args.duration > 0 or not args.interval > 0:
        raise ArgumentError(f"--duration {args.duration} and --interval {args.interval} must be > 0 seconds")
    if args.duration < th.stall_s:
        print(f"vqscope doctor: --duration {args.duration} s is shorter than the stall threshold "
              f"{th.stall_s} s: only queues already known stuck can be named", file=sys.stderr)
    with open_source(args) as src:
        if isinstance(src, ReplaySource):
            return _replay(src, args, given)
        analyzer = Analyzer(th, notifications_seen=src.has_events)
        final, watched, changes = watch(src, analyzer, args.duration, args.interval)
        name = src.name
    if not final:
        print(f"vqscope doctor: {name} shows no queue to look at (no driver has set one up, or "
              f"every queue was skipped: see `vqscope snapshot`)", file=sys.stderr)
        return EXIT_COULD_NOT_LOOK
    return _report(final, watched, changes, name, args.json, now=max(d.time for d in final))


def _replay(src: ReplaySource, args: argparse.Namespace, th: Thresholds | None) -> int:
    """``doctor --replay FILE``: the verdict timeline of a recording (the
    one the recorder stored, or recomputed with ``th`` when given), then the
    verdicts at its end."""
    changes = src.verdict_changes(th)
    times = src.recording.snapshot_times()
    t0, t1 = (times[0], times[-1]) if times else (0.0, 0.0)
    final: dict = {}
    for d in changes:
        final[d.id] = d
    diagnoses = list(final.values())
    if args.json:
        print(json.dumps({"source": src.name, "watched_s": t1 - t0,
                          "timeline": [diagnosis_to_json(d) for d in changes],
                          "queues": [diagnosis_to_json(d) for d in diagnoses]}))
    else:
        for d in changes:
            if not d.ok or any(c.id == d.id and not c.ok and c.time < d.time for c in changes):
                print(f"{clock(d.time)} {d.device} q{d.index} -> {d.verdict.value}"
                      + (f" — {d.evidence}" if d.evidence else ""))
        print(summary_line(diagnoses, t1 - t0, src.name)
              + f"; {sum(not d.ok for d in changes)} problem verdicts over the recording")
    return EXIT_PROBLEM if any(not d.ok for d in changes) else EXIT_HEALTHY


def _report(final: list[Diagnosis], watched: float, changes: list[Diagnosis], name: str, as_json: bool,
            now: float) -> int:
    bad = [d for d in final if not d.ok]
    cleared = {d.id: d for d in changes if not d.ok and d.id not in {b.id for b in bad}}
    if as_json:
        print(json.dumps({"source": name, "watched_s": watched,
                          "queues": [diagnosis_to_json(d) for d in final],
                          "cleared": [diagnosis_to_json(d) for d in cleared.values()]}))
    else:
        for d in bad:
            print(problem_line(d, now))
        for d in cleared.values():
            print(f"(cleared) {d.device} q{d.index} was {d.verdict.value} at {clock(d.time)} — {d.evidence}")
        print(summary_line(final, watched, name))
    return EXIT_PROBLEM if bad else EXIT_HEALTHY


VERDICT_HELP = "\n".join(f"  {v.value:<18} {MEANING[v]}" for v in Verdict)
