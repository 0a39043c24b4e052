"""The command line on a kernel with vhost-net and kprobes (runs in the VM
only, see conftest.py): ``vqscope snapshot --vhost-net PID`` against a
``vqscope load vhost-net --hold`` process, and ``vqscope probe --list``."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, VQSCOPE
from tests.support.peers import Peer

TX, RX = 6, 5


@pytest.fixture(scope="module")
def held():
    """A ``vqscope load vhost-net`` process holding its device open, moving
    one frame each way every second; yields (process, its first summary)."""
    with Peer([*VQSCOPE, "load", "vhost-net", "--size", "64", "--tx", str(TX), "--rx", str(RX),
               "--hold", "600", "--every", "1"], "vqscope load", cwd=ROOT) as load:
        m = load.wait_for(r"^\{.*\}$", 60)
        yield load, json.loads(m.group(0))


def test_snapshot_vhost_net_pid(held):
    load, summary = held
    pid = summary["pid"]
    r = subprocess.run([*VQSCOPE, "snapshot", "--vhost-net", str(pid), "--json"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr + load.tail()
    snap = json.loads(r.stdout)
    assert snap["pid"] == pid
    device = f"vhost-net:{pid}:{summary['vhost_fd']}"
    qs = {q["index"]: q for q in snap["queues"]}
    assert sorted(qs) == [0, 1], snap
    for vr in summary["vrings"]:
        q = qs[vr["index"]]
        ds = q["device_state"]
        assert q["device"] == device
        assert q["size"] == vr["num"] == 64
        # ring addresses the kernel holds are those the driver set
        assert (ds["desc"], ds["avail"], ds["used"]) == (
            vr["desc_user_addr"], vr["avail_user_addr"], vr["used_user_addr"])
        assert ds["owner_pid"] == pid
        # set up before vqscope attached: the features are the vq's own
        # acked_features (read by the probe), equal to VHOST_SET_FEATURES'
        assert q["features"] == summary["features"], (q["features"], summary["features"])
        assert q["event_idx"] == bool(summary["features"] >> 29 & 1)
        # the top-level last_avail_idx is vhost's own, unless the probe's
        # value (vhost's last handler run) is older than the ring read: then
        # it lies outside [used_idx, avail_idx] of that read and the
        # snapshot says null (inspector/ring/remote.py), as CI once saw
        la, u, a = ds["last_avail_idx"], q["used_idx"], q["avail_idx"]
        if q["last_avail_idx"] is None:
            assert (la - u) & 0xFFFF > (a - u) & 0xFFFF, (la, q)
        else:
            assert q["last_avail_idx"] == la
        # read from the process's memory after the probe's last hit: the
        # rings are at or (one burst a second) slightly ahead of vhost's view
        assert (q["avail_idx"] - ds["avail_idx"]) & 0xFFFF <= 2, q
        assert (q["used_idx"] - ds["last_used_idx"]) & 0xFFFF <= 2, q
        # the first burst alone put more than that on the rings
        initial = TX if vr["name"] == "tx" else RX
        assert q["avail_idx"] >= initial and q["used_idx"] >= initial
        assert set(ds) >= {"last_avail_idx", "avail_idx", "last_used_idx", "used_flags",
                           "signalled_used", "signalled_used_valid", "notify_enabled"}
        assert isinstance(q["histograms"], dict)
        # set up before vqscope attached: no memory table, said once
        assert [a["kind"] for a in q["anomalies"]] == ["mem_table_unknown"], q["anomalies"]


def test_probe_list_shows_kprobes_attachable():
    r = subprocess.run([*VQSCOPE, "probe", "--list", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)
    by = {(p["probe"], p["kind"], p["wanted"]): p for p in points}
    for fn in ("handle_tx_kick", "handle_rx_kick", "handle_tx", "handle_rx", "vhost_add_used_and_signal_n",
               "vhost_signal", "vhost_poll_wakeup"):
        assert by[("vhost_net", "kprobe", fn)]["status"] == "attached", by[("vhost_net", "kprobe", fn)]
    assert by[("vhost_ioctl", "tracepoint", "syscalls:sys_enter_ioctl")]["status"] == "attached"
    assert by[("eventfd", "tracepoint", "syscalls:sys_enter_write")]["status"] == "attached"
    # whatever is not attachable says why
    assert all(p["reason"] for p in points if p["status"] != "attached")


def test_exporter_serves_the_vhost_net_queues(held):
    """``vqscope exporter --vhost-net PID``: the probes' source read in the
    background; both vrings' used_idx move in /metrics (one frame each way
    a second) and the source says what it is."""
    from tests.conftest import wait_for
    from tests.support.prometheus import Exporter

    load, summary = held
    pid = summary["pid"]
    ex = Exporter(["--interval", "1", "--vhost-net", str(pid)], startup_timeout=60)
    try:
        def used():
            return {int(s.labels["queue"]): s.value for s in ex.samples("vqscope_queue_used_idx")
                    if s.labels["device"] == f"vhost-net:{pid}:{summary['vhost_fd']}"}

        assert wait_for(lambda: sorted(used()) == [0, 1], 300, 0.5), ex.tail() + load.tail()
        first = used()
        assert wait_for(lambda: all(used()[q] > first[q] for q in (0, 1)), 30, 0.5), (first, used(), ex.tail())
        info = ex.samples("vqscope_source_info")
        assert [(s.labels["source"], s.labels["kind"]) for s in info] == [(f"vhost-net:{pid}", "vhost-net")]
        up = ex.samples("vqscope_source_up")
        assert [s.value for s in up] == [1.0], ex.tail()
        verdicts = {s.labels["queue"] for s in ex.samples("vqscope_queue_verdict") if s.value == 1}
        assert verdicts == {"0", "1"}
    finally:
        ex.close()
