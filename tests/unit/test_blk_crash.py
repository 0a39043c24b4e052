"""Crash safety of ``vqscope serve blk`` (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD):
a back-end SIGKILLed with writes in flight, restarted on the same socket,
completes each of them exactly once and the image holds their data.

The first back-end runs with ``--inject hold-io=0``: it takes the writes
from the ring (the inflight area marks them) and submits none. The
built-in front-end (BlkFrontend(inflight=True)) reconnects as QEMU does
with ``reconnect=1``: the same memory and rings, each vring's base its used
index, and the inflight area handed to the new back-end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from inspector.introspect.client import IntrospectionClient
from inspector.spec.virtio import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from inspector.vhost_user.blk_frontend import BlkFrontend
from inspector.vhost_user.protocol import ProtocolFeature
from tests.conftest import ROOT, VQSCOPE, wait_for

IMAGE_SIZE = 4 << 20
WRITES = 16


def _serve(sock: str, img: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(VQSCOPE + ["serve", "blk", "--socket", sock, "--file", img, *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: _listening(sock + ".introspect") or proc.poll() is not None, 30)
    assert proc.poll() is None, proc.stderr.read()
    return proc


def _listening(path: str) -> bool:
    """Someone accepts on ``path`` (a killed back-end leaves its socket files:
    the new one replaces them)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def _blk(sock: str) -> dict:
    """requestq 0's extras ``blk`` from the back-end's snapshot."""
    client = IntrospectionClient(sock + ".introspect")
    try:
        return client.request("snapshot")["queues"][0]["blk"]
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_sigkill_with_writes_in_flight_then_restart_completes_each_once(tmp_path):
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="vqs-blkcrash-")
    img, sock = os.path.join(d, "img"), os.path.join(d, "vu.sock")
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    b1 = b2 = fe = None
    try:
        b1 = _serve(sock, img, "--inject", "hold-io=0")
        fe = BlkFrontend(sock, inflight=True)
        assert fe.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
        data = {i: bytes([0x40 + i]) * 4096 for i in range(WRITES)}
        heads = {fe.submit(0, VIRTIO_BLK_T_OUT, 8 * i, data[i], publish=False): i for i in data}
        fe.publish(0)
        assert wait_for(lambda: _blk(sock)["in_flight"] == WRITES, 20), _blk(sock)
        assert fe.complete(0, 0.2) == []                      # held: none completed

        b1.send_signal(signal.SIGKILL)
        b1.wait(10)
        b2 = _serve(sock, img)
        fe.reconnect()
        done = []
        deadline = time.monotonic() + 20
        while len(done) < WRITES and time.monotonic() < deadline:
            done += fe.complete(0, 0.5)
        # Each held write completes once (BlkFrontend raises ProtocolError on a
        # head that is not in flight, so a second completion cannot pass).
        assert sorted(c.head for c in done) == sorted(heads)
        assert all(c.status == VIRTIO_BLK_S_OK for c in done), done
        assert fe.complete(0, 0.3) == []
        blk = _blk(sock)
        assert blk["resubmitted"] == WRITES
        assert blk["requests"]["out"] == WRITES and blk["status"]["ok"] == WRITES
        # The queue goes on, and the image holds every write.
        for i in (0, WRITES - 1):
            assert fe.request(0, VIRTIO_BLK_T_IN, 8 * i, in_len=4096).data == data[i]
        with open(img, "rb") as f:
            for i, want in data.items():
                f.seek(8 * i * 512)
                assert f.read(4096) == want, i
        err = b2.stderr
    finally:
        if fe is not None:
            fe.close()
        for b in (b1, b2):
            if b is not None:
                if b.poll() is None:
                    b.terminate()
                b.wait(10)
        shutil.rmtree(d, ignore_errors=True)
    log = err.read()
    err.close()
    assert f"vring 0: resubmitting {WRITES} request(s) left in flight by the last back-end" in log, log
