"""1000 connect / handshake / disconnect cycles against ``vqscope serve``
: nothing grows.

Each cycle is the built-in front-end's full handshake, QEMU's sequence
(features, owner, protocol features, queue count, backend channel, features
ack, SET_MEM_TABLE with a memfd, then size, base, addresses, kick, call and
enable of both vrings, so the loopback device starts its worker), then a
close. The back-end runs as its own process, so its counts are its own:
after the cycles its fd count, thread count and mapping count
(/proc/PID/maps lines) are back at the baseline taken after a warm-up, and
its RSS grew by less than ``RSS_SLACK`` (all mappings: see MAPS_SLACK).
"""

from __future__ import annotations

import os
import time

import pytest

from inspector.vhost_user.frontend import VhostUserFrontend

from tests.conftest import wait_for
from tests.support.peers import VqscopeNet, socket_dir

CYCLES = 1000
WARMUP = 50
RSS_SLACK = 5 << 20
# Python's allocator maps its arenas (1 MiB, anonymous, private) as it needs
# them and keeps some: seen +1 after 1000 cycles. Anonymous private memory is
# bounded by RSS_SLACK; shared mappings (front-end memory) must match exactly.
MAPS_SLACK = 3


def counts(pid: int) -> dict[str, int]:
    """fds, threads, mappings (all, and the MAP_SHARED ones: every mapping
    of front-end memory, memfd regions, log and inflight areas, is shared)
    and RSS (bytes) of process ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        perms = [line.split()[1] for line in f]
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"]),
            "maps": len(perms), "shared_maps": sum(p.endswith("s") for p in perms),
            "rss": int(status["VmRSS"].split()[0]) * 1024}


def cycle(sock: str, pid: int | None = None) -> None:
    """One handshake and close; with ``pid``, first check that the cycle
    really maps the memory table and starts the device's worker there."""
    with VhostUserFrontend(sock, queue_pairs=1, queue_size=64, mem_size=256 << 10, timeout=10) as fe:
        assert fe.queues and fe.features
        if pid is not None:
            assert wait_for(lambda: counts(pid)["threads"] > 1 and counts(pid)["shared_maps"] > 1), counts(pid)


@pytest.mark.timeout(300)
def test_1000_handshake_cycles_leave_nothing_behind():
    d = socket_dir()
    sock = os.path.join(d, "vu.sock")
    with VqscopeNet(sock) as be:
        pid = be.peer.proc.pid
        assert counts(pid)["threads"] == 1
        cycle(sock, pid)
        for _ in range(WARMUP):
            cycle(sock)
        time.sleep(0.5)   # the last close's worker and event drain finish
        base = counts(pid)
        t0 = time.monotonic()
        for _ in range(CYCLES):
            cycle(sock)
        elapsed = time.monotonic() - t0

        def settled() -> bool:
            now = counts(pid)
            return (all(now[k] == base[k] for k in ("fds", "threads", "shared_maps"))
                    and now["maps"] <= base["maps"] + MAPS_SLACK)

        assert wait_for(settled, timeout=10), (base, counts(pid))
        after = counts(pid)
        assert after["rss"] - base["rss"] < RSS_SLACK, (base, after)
        assert be.peer.alive() and "protocol violation" not in be.peer.output, be.tail()
        print(f"{CYCLES} cycles in {elapsed:.1f} s; back-end {base} -> {after}")
