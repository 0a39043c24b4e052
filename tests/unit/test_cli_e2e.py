"""The CLI end to end: `vqscope serve net` in its own process, our built-in
front-end driving it over a real Unix socket and memfd, `vqscope snapshot`
reading the introspection socket, and `vqscope demo --headless`."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import pytest

from inspector.vhost_user.frontend import VhostUserFrontend
from tests.conftest import ROOT, VQSCOPE

FRAME = bytes.fromhex("0a0000000001" "525400123456" "0800") + bytes(50)


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def served(tmp_path):
    sock = str(tmp_path / "vq.sock")
    proc = subprocess.Popen(VQSCOPE + ["serve", "net", "--socket", sock, "--loopback"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock + ".introspect", proc)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


def _snapshot(sock: str) -> dict:
    out = subprocess.run(VQSCOPE + ["snapshot", "--connect", sock, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_serve_snapshot_and_clean_shutdown(served):
    sock, proc = served
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock + ".introspect").st_mode) == 0o600
    echoed = []
    with VhostUserFrontend(sock, event_idx=True, mrg_rxbuf=True) as fe:
        fe.post_rx_buffers(0, 64)
        sent = fe.send_frames(0, [FRAME] * 40)
        deadline = time.monotonic() + 10
        while len(echoed) < sent and time.monotonic() < deadline:
            fe.wait_call(0, 0.2)
            echoed += fe.recv_frames(0)
        assert sent == 40 and len(echoed) == 40
        # MACs swapped by the loopback device
        assert echoed[0][:6] == FRAME[6:12] and echoed[0][6:12] == FRAME[:6]
        snap = _snapshot(sock)
        by_index = {q["index"]: q for q in snap["queues"]}
        rx, tx = by_index[0], by_index[1]
        assert tx["packets"] == 40 and rx["packets"] == 40
        assert tx["bytes"] == 40 * len(FRAME)
        assert rx["calls"] + rx["calls_suppressed"] >= 1
        # Packed rings (§2.8, negotiated by default): the device's next used
        # slot and wrap counter, where the driver's next_avail is.
        assert rx["layout"] == tx["layout"] == "packed"
        assert (tx["next_used"], tx["used_wrap_counter"]) == (tx["next_avail"], tx["avail_wrap_counter"]) == (40, 1)
        assert (rx["next_avail"], rx["next_used"]) == (64, 40) and rx["inflight"] == 24
        assert len(rx["chains"]) == 24 and rx["chains"][0]["in_bytes"] == 2048
        assert rx["chains"][0]["slot"] == 40
        assert rx["event_idx"] and rx["driver_event_flags"] == 2      # DESC: call at the next used slot
        assert rx["anomalies"] == [] and tx["anomalies"] == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not os.path.exists(sock) and not os.path.exists(sock + ".introspect")


def test_snapshot_without_backend_is_a_clear_error(tmp_path):
    out = subprocess.run(VQSCOPE + ["snapshot", "--connect", str(tmp_path / "none.sock"), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "vqscope serve" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("layout", ["packed", "split"])
def test_demo_headless_indices_move(layout):
    """The demo's rings are packed (our back-end offers VIRTIO_F_RING_PACKED),
    split with --split; either way they move and stay sound."""
    out = subprocess.run(VQSCOPE + ["demo", "--headless", "--duration", "2", "--json"]
                         + (["--split"] if layout == "split" else []), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{layout} rings" in out.stderr
    snap = json.loads(out.stdout)
    queues = {q["index"]: q for q in snap["queues"]}
    assert set(queues) == {0, 1}
    assert {q["layout"] for q in queues.values()} == {layout}
    if layout == "split":
        assert queues[1]["used_idx"] > 100
    else:
        assert queues[1]["positions"] == "device" and queues[1]["next_used"] is not None
    assert queues[1]["packets"] > 100 and queues[0]["packets"] > 100
    assert all(q["anomalies"] == [] for q in queues.values())
