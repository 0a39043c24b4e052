"""Packet rate of vqscope's virtio-net loopback vs DPDK's own vhost back-end,
on split and on packed rings (VIRTIO 1.2 §2.7 / §2.8).

The same front-end, dpdk-testpmd with a virtio-user port in io forwarding
(--tx-first: it keeps one burst of 64-byte frames circulating; default ring
size and burst, identical argv for both back-ends), runs against (a)
``vqscope serve net --loopback`` and (b) ``dpdk-testpmd`` with ``net_vhost0``
in io forwarding, with split rings and with packed ones (virtio-user
``packed_vq=1``: both back-ends negotiate the layout it asks for).

The machine is shared and noisy, so only ratios taken close together mean
something: each round runs, per layout, the two back-ends back to back (the
order alternates from round to round, so a slow drift favours neither) and
takes that round's ratio vqscope / DPDK. A layout's ``ratio`` is the MEDIAN
OF THE PER-ROUND RATIOS, ``ratio_spread`` their [min, max]; the rates are the
medians over rounds of each run's rate, which is the median of testpmd's
per-second ``Rx-pps`` after a warm-up (its final totals are kept as a
cross-check).

Pinning, the same for both: the front-end forwards on CPU 0 (``-l 0,1
--main-lcore 1``); each back-end's data path runs on CPU 1 (DPDK: ``-l 0,1
--main-lcore 0``, forwarding lcore 1; vqscope: ``taskset -c 1``).

Prints ONE JSON line: {"bench": "net", "split": {"vqscope_mpps", "dpdk_mpps",
"ratio", "ratio_spread", "ratios", "vqscope_spread", "dpdk_spread", ...},
"packed": {...}, "frame_bytes", "seconds", "rounds"}.

  python tests/bench/bench_net.py [--seconds 6] [--rounds 5] [--layouts split,packed]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WARMUP_SAMPLES = 3


class Proc:
    """A child in its own process group, its output collected by a thread."""

    def __init__(self, argv: list[str], name: str, stdin=subprocess.DEVNULL):
        self.name = name
        self.p = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=ROOT)
        self.buf: list[str] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in iter(self.p.stdout.readline, b""):
            self.buf.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.buf)

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def close(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.alive():
            self.kill(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.p.wait(5)
        self.t.join(2)


def wait_path(path: str, proc: Proc, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path):
            return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited before creating {path}:\n{proc.output[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not create {path} in {timeout} s:\n{proc.output[-3000:]}")


def testpmd() -> str:
    exe = shutil.which("dpdk-testpmd")
    if not exe:
        raise SystemExit("bench_net: dpdk-testpmd not found (Debian: dpdk librte-net-virtio23 "
                         "librte-net-vhost23 librte-mempool-ring23); run `make deps`")
    return exe


#: virtio-user devargs of each ring layout.
LAYOUTS = {"split": "", "packed": ",packed_vq=1"}


def run_frontend(sock: str, prefix: str, seconds: float, layout: str) -> dict:
    """testpmd virtio-user front-end against ``sock`` for ``seconds`` with
    ``layout`` rings; its rates."""
    argv = [testpmd(), "-l", "0,1", "--main-lcore", "1", "--no-pci", "--no-huge", "-m", "1024",
            f"--file-prefix={prefix}", "--vdev", f"net_virtio_user0,path={sock},queues=1{LAYOUTS[layout]}",
            "--", "--nb-cores=1", "--forward-mode=io", "--tx-first", "--stats-period", "1"]
    fe = Proc(argv, "testpmd front-end")
    try:
        end = time.monotonic() + seconds + WARMUP_SAMPLES + 5
        while time.monotonic() < end and fe.alive():
            n = len(re.findall(r"Rx-pps:", fe.output))
            if n >= seconds + WARMUP_SAMPLES:
                break
            time.sleep(0.2)
        fe.close(signal.SIGINT, timeout=20)
    finally:
        fe.close(signal.SIGKILL)
    out = fe.output
    pps = [int(x) for x in re.findall(r"Rx-pps:\s+(\d+)", out)]
    samples = pps[WARMUP_SAMPLES:] or pps
    m = re.search(r"Accumulated forward statistics.*?RX-packets:\s+(\d+)", out, re.S)
    if not samples:
        raise RuntimeError(f"no statistics from the front-end:\n{out[-3000:]}")
    return {"mpps": statistics.median(samples) / 1e6, "samples": len(samples),
            "total_rx": int(m.group(1)) if m else None,
            "min_mpps": min(samples) / 1e6, "max_mpps": max(samples) / 1e6}


def bench_vqscope(tmp: str, seconds: float, tag: str, layout: str) -> dict:
    sock = os.path.join(tmp, f"vq-{tag}.sock")
    argv = ["taskset", "-c", "1", sys.executable, "-m", "inspector", "serve", "net", "--socket", sock,
            "--loopback"]
    be = Proc(argv, "vqscope serve")
    try:
        wait_path(sock, be)
        res = run_frontend(sock, f"vqbench-fe-{tag}-{os.getpid()}", seconds, layout)
    finally:
        be.close(signal.SIGINT)
    return res


@contextmanager
def dpdk_vhost(sock: str, prefix: str):
    """DPDK's vhost back-end (testpmd ``net_vhost0`` on ``sock``, io
    forwarding on CPU 1) until the block ends; yields its Proc once
    ``sock`` exists."""
    argv = [testpmd(), "-l", "0,1", "--main-lcore", "0", "--no-pci", "--no-huge", "-m", "1024",
            f"--file-prefix={prefix}", "--vdev", f"net_vhost0,iface={sock},queues=1", "--", "--nb-cores=1",
            "--forward-mode=io"]
    # Without -i testpmd forwards until a line arrives on stdin: keep it open.
    be = Proc(argv, "testpmd vhost back-end", stdin=subprocess.PIPE)
    try:
        wait_path(sock, be)
        yield be
    finally:
        try:
            be.p.stdin.write(b"\n")
            be.p.stdin.close()
        except OSError:
            pass
        try:
            be.p.wait(15)
        except subprocess.TimeoutExpired:
            pass
        be.close(signal.SIGINT)


def bench_dpdk(tmp: str, seconds: float, tag: str, layout: str) -> dict:
    sock = os.path.join(tmp, f"dpdk-{tag}.sock")
    with dpdk_vhost(sock, f"vqbench-be-{tag}-{os.getpid()}"):
        return run_frontend(sock, f"vqbench-fe-{tag}-{os.getpid()}", seconds, layout)


def summary(rounds: list[tuple[dict, dict]]) -> dict:
    """One layout's figures over its rounds, each (vqscope run, DPDK run)."""
    vq = [v for v, _ in rounds]
    dp = [d for _, d in rounds]
    ratios = [v["mpps"] / d["mpps"] for v, d in rounds if d["mpps"]]
    return {"vqscope_mpps": round(statistics.median(x["mpps"] for x in vq), 3),
            "dpdk_mpps": round(statistics.median(x["mpps"] for x in dp), 3),
            "ratio": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
            "ratios": [round(r, 3) for r in ratios],
            "vqscope_spread": [round(min(x["mpps"] for x in vq), 3), round(max(x["mpps"] for x in vq), 3)],
            "dpdk_spread": [round(min(x["mpps"] for x in dp), 3), round(max(x["mpps"] for x in dp), 3)],
            "vqscope_runs": vq, "dpdk_runs": dp}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6, help="measured seconds per back-end, layout and round")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds; each runs both back-ends back to back per layout and gives one ratio")
    ap.add_argument("--layouts", default="split,packed", help="comma-separated ring layouts (default both)")
    args = ap.parse_args()
    testpmd()
    layouts = [x for x in args.layouts.split(",") if x]
    for x in layouts:
        if x not in LAYOUTS:
            raise SystemExit(f"bench_net: layout {x!r} is not one of {', '.join(LAYOUTS)}")
    runs: dict[str, list[tuple[dict, dict]]] = {x: [] for x in layouts}
    with tempfile.TemporaryDirectory(prefix="vqbench-") as tmp:
        for r in range(args.rounds):
            for x in layouts:
                # back to back, the order alternating by round
                if r % 2 == 0:
                    v = bench_vqscope(tmp, args.seconds, f"v{x[0]}{r}", x)
                    d = bench_dpdk(tmp, args.seconds, f"d{x[0]}{r}", x)
                else:
                    d = bench_dpdk(tmp, args.seconds, f"d{x[0]}{r}", x)
                    v = bench_vqscope(tmp, args.seconds, f"v{x[0]}{r}", x)
                runs[x].append((v, d))
                print(f"bench_net: round {r + 1}/{args.rounds} {x}: vqscope {v['mpps']:.3f} Mpps, "
                      f"DPDK {d['mpps']:.3f} Mpps, ratio {v['mpps'] / d['mpps']:.3f}", file=sys.stderr,
                      flush=True)
    out = {"bench": "net", **{x: summary(runs[x]) for x in layouts},
           "frame_bytes": 64, "seconds": args.seconds, "rounds": args.rounds}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
