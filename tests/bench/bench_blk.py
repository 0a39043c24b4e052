"""4 KiB random read and random write at iodepth 32 through ``vqscope load
blk``, against ``vqscope serve blk`` and against qemu-storage-daemon
(libvhost-user), in the same run (issue 14's benchmark).

Each back-end exports its own raw image on tmpfs (``--image-mb``, default
256 MiB, written once before the rounds so that reads hit allocated pages),
with one requestq and the page cache (qsd: cache.direct=off; serve blk: no
--direct). Both stay up for the whole run.

The machine is shared and noisy, so only ratios taken close together mean
something: each round runs, per mode, the two back-ends back to back (the
order alternates from round to round) and takes that round's ratio
vqscope / qsd. ``ratio`` is the MEDIAN OF THE PER-ROUND RATIOS,
``ratio_min``/``ratio_max`` their range; the k-IOPS are the medians over
rounds.

Pinning, the same for both: the load generator runs on CPU 0 (``taskset -c
0``), each back-end on CPU 1 (``taskset -c 1``), so that they never take
each other's CPU on a 2-core machine.

Until ``vqscope serve blk`` exists, the "vqscope" side is a second
qemu-storage-daemon (``vqscope_backend`` says so): the harness checks
itself, and the ratio must be about 1.

Prints ONE JSON line: {"bench": "blk", "randread": {"vqscope_kiops",
"qsd_kiops", "ratio", "ratio_min", "ratio_max", "rounds", "ratios"},
"randwrite": {...}, "seconds", "vqscope_backend"}.

  python tests/bench/bench_blk.py [--seconds 3] [--rounds 5] [--image-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.qsd import QSD, qsd_command  # noqa: E402

VQSCOPE = [sys.executable, "-m", "inspector"]
MODES = ("randread", "randwrite")


def _has_serve_blk() -> bool:
    r = subprocess.run([*VQSCOPE, "serve", "blk", "--help"], capture_output=True, cwd=ROOT)
    return r.returncode == 0


def _pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") and os.cpu_count() > 1 else argv


class Backend:
    """One back-end process exporting ``image`` on ``sock``, pinned to CPU 1."""

    def __init__(self, kind: str, image: str, sock: str):
        self.kind, self.sock = kind, sock
        argv = (qsd_command(image, sock) if kind == "qsd"
                else [*VQSCOPE, "serve", "blk", "--socket", sock, "--file", image])
        self.log = open(sock + ".log", "w+")   # a file, not a pipe nobody reads: the back-end never blocks on it
        self.p = subprocess.Popen(_pinned(1, argv), stdout=subprocess.DEVNULL, stderr=self.log, cwd=ROOT,
                                  start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{kind} back-end did not start: {open(sock + '.log').read()[-2000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def load(sock: str, mode: str, seconds: float) -> float:
    """IOPS of one ``load blk`` run (4 KiB, iodepth 32, one queue)."""
    r = subprocess.run(_pinned(0, [*VQSCOPE, "load", "blk", "--connect", sock, "--rw", mode, "--bs", "4k",
                                   "--iodepth", "32", "--seconds", str(seconds), "--json"]),
                       capture_output=True, text=True, cwd=ROOT, timeout=seconds + 60)
    if r.returncode != 0 or not r.stdout:
        raise RuntimeError(f"load blk --rw {mode} on {sock} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return json.loads(r.stdout)["iops"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per load run (default 3)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--image-mb", type=int, default=256, help="image size per back-end (default 256)")
    args = ap.parse_args()
    if QSD is None:
        print("bench_blk: qemu-storage-daemon is not installed (Debian qemu-system-common)", file=sys.stderr)
        return 2
    vq_kind = "vqscope" if _has_serve_blk() else "qsd"
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="vqs-bench-blk-")
    backends = {}
    try:
        for name, kind in (("vqscope", vq_kind), ("qsd", "qsd")):
            img = os.path.join(d, f"{name}.img")
            with open(img, "wb") as f:
                chunk = os.urandom(1 << 20)
                for _ in range(args.image_mb):
                    f.write(chunk)
            backends[name] = Backend(kind, img, os.path.join(d, f"{name}.sock"))
        runs = {m: {"vqscope": [], "qsd": [], "ratios": []} for m in MODES}
        for rnd in range(args.rounds):
            for mode in MODES:
                order = ("vqscope", "qsd") if rnd % 2 == 0 else ("qsd", "vqscope")
                got = {name: load(backends[name].sock, mode, args.seconds) for name in order}
                for name in order:
                    runs[mode][name].append(got[name])
                runs[mode]["ratios"].append(got["vqscope"] / got["qsd"])
        out = {"bench": "blk"}
        for mode in MODES:
            r = runs[mode]
            out[mode] = {"vqscope_kiops": round(statistics.median(r["vqscope"]) / 1000, 1),
                         "qsd_kiops": round(statistics.median(r["qsd"]) / 1000, 1),
                         "ratio": round(statistics.median(r["ratios"]), 3),
                         "ratio_min": round(min(r["ratios"]), 3), "ratio_max": round(max(r["ratios"]), 3),
                         "rounds": args.rounds, "ratios": [round(x, 3) for x in r["ratios"]]}
        out.update(seconds=args.seconds, bs=4096, iodepth=32, vqscope_backend=(
            "vqscope serve blk" if vq_kind == "vqscope" else "qemu-storage-daemon (serve blk not available: "
                                                              "the harness checking itself)"))
        print(json.dumps(out), flush=True)
        return 0
    finally:
        for b in backends.values():
            b.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
