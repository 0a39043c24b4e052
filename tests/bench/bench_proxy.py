"""What ``vqscope proxy`` costs the data path: dpdk-testpmd virtio-user <->
dpdk-testpmd ``net_vhost`` (io forwarding, 64-byte frames, split rings)
(a) directly, (b) through ``vqscope proxy`` and (c) through ``vqscope proxy
--count-notifications`` (the proxy's own eventfds between the peers' kick
and call fds).

Without the flag the proxy forwards the kick and call fds unchanged, so the
frames never pass through it: the goal is a ratio (b)/(a) >= 0.98. With
it, every kick and call the peers do send crosses the proxy; the cost is
stated as the ratio (c)/(a).

The machine is shared and noisy, so only ratios taken close together mean
something: each round runs the three variants back to back (the order
reversed every other round) and takes that round's ratios to (a). A
variant's ``ratio`` is the MEDIAN OF THE PER-ROUND RATIOS, ``ratio_min`` /
``ratio_max`` their spread; ``*_mpps`` are medians over rounds of each
run's rate (the median of testpmd's per-second ``Rx-pps`` after a warm-up;
tests/bench/bench_net.py run_frontend). Pinning as in bench_net: the
front-end forwards on CPU 0, the back-end on CPU 1; the proxy is not pinned.

Prints ONE JSON line: {"bench": "proxy", "direct_mpps", "proxy_mpps",
"ratio", "ratio_min", "ratio_max", "ratios", "count_notifications":
{"mpps", "ratio", "ratio_min", "ratio_max", "ratios"}, "frame_bytes",
"seconds", "rounds"}.

  python tests/bench/bench_proxy.py [--seconds 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_net import Proc, dpdk_vhost, run_frontend, testpmd, wait_path  # noqa: E402

VARIANTS = ("direct", "proxy", "count_notifications")


def proxy(listen: str, connect: str, count_notifications: bool) -> Proc:
    """``vqscope proxy`` from ``listen`` to ``connect``, up once ``listen`` exists."""
    argv = [sys.executable, "-m", "inspector", "proxy", "--listen", listen, "--connect", connect]
    if count_notifications:
        argv.append("--count-notifications")
    px = Proc(argv, "vqscope proxy")
    try:
        wait_path(listen, px)
    except BaseException:
        px.close(signal.SIGINT)
        raise
    return px


def run(tmp: str, variant: str, seconds: float, tag: str) -> dict:
    """One run of ``variant``: back-end, the proxy unless direct, front-end."""
    back = os.path.join(tmp, f"be-{tag}.sock")
    pid = os.getpid()
    with dpdk_vhost(back, f"vqbench-pxbe-{tag}-{pid}"):
        px = None if variant == "direct" else proxy(os.path.join(tmp, f"fe-{tag}.sock"), back,
                                                    variant == "count_notifications")
        try:
            res = run_frontend(back if px is None else os.path.join(tmp, f"fe-{tag}.sock"),
                               f"vqbench-pxfe-{tag}-{pid}", seconds, "split")
        finally:
            if px is not None:
                px.close(signal.SIGINT)
        if px is not None and px.p.returncode not in (0, -signal.SIGINT):
            raise RuntimeError(f"vqscope proxy exited with {px.p.returncode}:\n{px.output[-3000:]}")
    return res


def spread(ratios: list[float]) -> dict:
    return {"ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "ratios": [round(r, 3) for r in ratios]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3, help="measured seconds per variant and round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs the three variants back to back")
    args = ap.parse_args()
    testpmd()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="vqbpx-", dir="/tmp") as tmp:
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
            for v in order:
                runs[v].append(run(tmp, v, args.seconds, f"{v[0]}{r}"))
            d, p, c = (runs[v][-1]["mpps"] for v in VARIANTS)
            print(f"bench_proxy: round {r + 1}/{args.rounds}: direct {d:.3f} Mpps, proxy {p:.3f} "
                  f"({p / d:.3f}), --count-notifications {c:.3f} ({c / d:.3f})", file=sys.stderr, flush=True)
    direct = [x["mpps"] for x in runs["direct"]]
    med = {v: round(statistics.median(x["mpps"] for x in runs[v]), 3) for v in VARIANTS}
    ratio = {v: spread([x["mpps"] / d for x, d in zip(runs[v], direct)]) for v in VARIANTS[1:]}
    out = {"bench": "proxy", "direct_mpps": med["direct"], "proxy_mpps": med["proxy"], **ratio["proxy"],
           "count_notifications": {"mpps": med["count_notifications"], **ratio["count_notifications"]},
           "frame_bytes": 64, "seconds": args.seconds, "rounds": args.rounds}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
