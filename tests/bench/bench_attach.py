"""Benchmark: refreshing the split rings of another process.

64 queues of 256 entries live in a child process (tests/unit/test_remote_read.py
RingChild, scenario "bench": one block of "guest RAM", 32 virtio-net-like
queue pairs; RX queues one writable buffer per chain, TX queues an indirect
table of 3 descriptors per chain, packed in a slab as Linux's kmalloc gives
them; half of each ring in flight, 128 chains). One refresh of a queue is
inspector.ring.remote.snapshot_remote_split: one process_vm_readv of its three
ring areas, the C decoder, and for TX queues one more process_vm_readv of
its indirect tables and a second decode — up to a RingSnapshot.

Prints ONE JSON line:
{"bench": "attach", "refresh_us_per_queue": median over rounds of (time to
 refresh all 64 queues once) / 64, "queues": 64, "max_hz_64q": 1e6 / median
 round time (back to back, measured), "cpu_pct_at_20hz": % of one core
 (time.process_time over wall time) refreshing the 64 queues at a paced 20
 Hz for several seconds, "goal_met": max_hz_64q >= 20 and cpu_pct_at_20hz
 <= 25}.

A second line on stderr gives the median per queue for RX (direct) and TX
(indirect) queues alone, and the same round for the worst case of the second
read: the tables scattered one per page (each its own region), in the same
run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inspector.memory.process import ProcessMemory  # noqa: E402
from inspector.ring.remote import snapshot_remote_split  # noqa: E402
from tests.unit.test_remote_read import RingChild  # noqa: E402

QUEUES = 64
ROUNDS = 41
PACED_SECONDS = 4.0
HZ = 20


def refresher(child: RingChild, pm: ProcessMemory):
    ram = child.ram
    rings = [(r["size"], *r["addrs"], r["last"]) for r in child.info["rings"]]

    def one(q: int):
        return snapshot_remote_split(pm, ram, *rings[q])

    def all_queues():
        return [snapshot_remote_split(pm, ram, *args) for args in rings]

    return one, all_queues


def median_us(fn, rounds: int = ROUNDS, inner: int = 1) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter_ns() - t0) / inner / 1000.0)
    return statistics.median(samples)


def paced_cpu_pct(fn, hz: int, seconds: float) -> float:
    """% of one core used calling ``fn`` ``hz`` times a second."""
    period = 1.0 / hz
    wall0, cpu0 = time.monotonic(), time.process_time()
    deadline = wall0
    while True:
        fn()
        deadline += period
        now = time.monotonic()
        if now - wall0 >= seconds:
            break
        if deadline > now:
            time.sleep(deadline - now)
    return 100.0 * (time.process_time() - cpu0) / (time.monotonic() - wall0)


def main() -> None:
    with RingChild("bench", str(QUEUES), "slab") as child, \
            RingChild("bench", str(QUEUES), "scattered") as worst, \
            ProcessMemory(child.pid) as pm, ProcessMemory(worst.pid) as pw:
        one, all_queues = refresher(child, pm)
        _, all_worst = refresher(worst, pw)
        for c, fn in ((child, all_queues), (worst, all_worst)):
            for snap, ring in zip(fn(), c.info["rings"]):  # warm up, and check
                assert snap.as_dict() == ring["local"], "remote decode differs from the child's"
                assert snap.n_chains == 128 and not snap.anomalies
        before = pm.syscalls
        all_queues()
        reads_per_round = pm.syscalls - before
        assert reads_per_round == QUEUES + QUEUES // 2, reads_per_round
        round_us, worst_us, rx_us, tx_us = [], [], [], []
        for _ in range(ROUNDS):  # side by side, interleaved
            round_us.append(median_us(all_queues, rounds=1))
            worst_us.append(median_us(all_worst, rounds=1))
            rx_us.append(median_us(lambda: one(0), rounds=1, inner=20))
            tx_us.append(median_us(lambda: one(1), rounds=1, inner=20))
        per_round = statistics.median(round_us)
        cpu = paced_cpu_pct(all_queues, HZ, PACED_SECONDS)
        cpu_worst = paced_cpu_pct(all_worst, HZ, PACED_SECONDS)
    max_hz = 1e6 / per_round
    print(json.dumps({"bench": "attach",
                      "refresh_us_per_queue": round(per_round / QUEUES, 1),
                      "queues": QUEUES,
                      "max_hz_64q": round(max_hz, 1),
                      "cpu_pct_at_20hz": round(cpu, 1),
                      "goal_met": bool(max_hz >= 20 and cpu <= 25)}))
    worst_round = statistics.median(worst_us)
    print(json.dumps({"rx_direct_us": round(statistics.median(rx_us), 1),
                      "tx_indirect_us": round(statistics.median(tx_us), 1),
                      "syscalls_per_round": reads_per_round,
                      "scattered_tables_us_per_queue": round(worst_round / QUEUES, 1),
                      "scattered_tables_max_hz_64q": round(1e6 / worst_round, 1),
                      "scattered_tables_cpu_pct_at_20hz": round(cpu_worst, 1)}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
