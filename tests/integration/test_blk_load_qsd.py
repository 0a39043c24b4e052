"""``vqscope load blk --verify`` across back-ends: data written through one
vhost-user-blk back-end is read back, sector by sector, through another on
the same image (a tmpfs file), each a real process: qemu-storage-daemon
(libvhost-user) and ``vqscope serve blk``.

The writer runs ``--rw randwrite --verify`` on two queues (random offsets;
the fill after ``--seconds`` writes every block not yet written, so the
whole region holds the pattern), the reader ``--rw read --verify`` with
the same ``--seed``: every sector read must match. The same read with
another seed must fail (exit 1): the check is real. The image itself is
read too: a sector of it holds the pattern of its number.

``serve blk`` offers packed rings (qemu-storage-daemon 7.2 does not): a
``--packed`` write through it is read back through qemu-storage-daemon's
split ring.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager

import pytest

from inspector.datapath.blkload import sector_pattern
from tests.conftest import VQSCOPE, require
from tests.support.peers import Peer, PeerError, wait_path
from tests.support.qsd import QSD, running_qsd

IMAGE_SIZE = 32 << 20
REGION = "16m"
SEED = 77


PAIRS = [("qsd", "qsd"), ("qsd", "vqscope"), ("vqscope", "qsd")]


@contextmanager
def _backend(kind: str, img: str, sock: str):
    """A back-end of ``kind`` exporting ``img`` with 2 queues on ``sock``."""
    if kind == "qsd":
        require(QSD is not None, "qemu-storage-daemon is not installed (Debian qemu-system-common)")
        with running_qsd(img, sock, num_queues=2):
            yield
        return
    with Peer([*VQSCOPE, "serve", "blk", "--socket", sock, "--file", img, "--queues", "2"],
              "vqscope serve blk") as peer:
        try:
            wait_path(sock, 20, peer.alive)
        except PeerError as e:
            raise PeerError(f"{e}\n{peer.tail()}") from None
        yield


def _load(sock: str, *args: str) -> tuple[int, dict]:
    r = subprocess.run([*VQSCOPE, "load", "blk", "--connect", sock, "--size", REGION, "--json", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout, f"load blk printed nothing (exit {r.returncode}): {r.stderr}"
    return r.returncode, json.loads(r.stdout)


@pytest.mark.parametrize("writer, reader, packed", [(*p, False) for p in PAIRS] + [("vqscope", "qsd", True)],
                         ids=[f"{w}-{r}" for w, r in PAIRS] + ["vqscope_packed-qsd"])
def test_written_through_one_back_end_read_back_through_another(writer, reader, packed):
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="vqs-blkload-it-")
    img = os.path.join(d, "img")
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    try:
        with _backend(writer, img, os.path.join(d, "w.sock")):
            rc, w = _load(os.path.join(d, "w.sock"), "--rw", "randwrite", "--queues", "2", "--seconds", "1",
                          "--verify", "--seed", str(SEED), *(["--packed"] if packed else []))
        assert rc == 0 and w["errors"] == 0 and w["broken"] is None, w
        assert w["ring"] == ("packed" if packed else "split"), w
        assert w["write"]["ios"] >= (16 << 20) // 4096        # every block once at least (the fill)
        with open(img, "rb") as f:
            f.seek(12345 * 512)
            assert f.read(512) == sector_pattern(12345, 1, SEED)
        with _backend(reader, img, os.path.join(d, "r.sock")):
            rc, r = _load(os.path.join(d, "r.sock"), "--rw", "read", "--queues", "2", "--seconds", "1",
                          "--verify", "--seed", str(SEED))
            assert rc == 0 and r["errors"] == 0 and r["broken"] is None, r
            assert r["verify"]["mismatches"] == 0 and r["verify"]["sectors_checked"] >= 8 * r["read"]["ios"] > 0
            rc, other = _load(os.path.join(d, "r.sock"), "--rw", "randread", "--seconds", "0.3",
                              "--verify", "--seed", str(SEED + 1))
            assert rc == 1 and other["verify"]["mismatches"] == other["verify"]["sectors_checked"] > 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
