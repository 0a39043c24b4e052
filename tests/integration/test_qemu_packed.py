"""``vqscope snapshot --qmp``: QEMU-serviced packed virtqueues (VIRTIO 1.2
§2.8). ONE virtme-ng guest (tests/support/peers.py AttachVM with
``packed=True``): virtio-net-pci on ``-netdev user`` and virtio-blk-pci,
both ``packed=on``, under ping and O_DIRECT disk traffic, shared by the tests
of this module.

QMP's ``x-query-virtio-queue-status`` gives a packed queue's ``used-idx`` and
``last-avail-idx`` as bare slots (QEMU keeps the wrap counters to itself):
the source decodes with them and derives the wrap counters from the ring
(``positions`` "derived", inspector/ring/reference_packed.py).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from inspector.ring.packed import packed_counter, packed_distance
from tests.conftest import ROOT, VQSCOPE
from tests.support.peers import AttachVM, require_guest

pytestmark = pytest.mark.qemu
QEMU_QUEUES = [("unet", 0), ("unet", 1), ("vblk", 0)]


@pytest.fixture(scope="module")
def vm():
    require_guest("reading QEMU's memory and the vhost-user guest need root")
    pytest.importorskip("inspector.memory.process")
    with AttachVM(packed=True) as v:
        yield v


@pytest.fixture
def qmp(vm):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    q = QEMUMonitorProtocol(vm.qmp_test)
    q.connect()
    yield q.cmd
    try:
        if not q.cmd("query-status")["running"]:
            q.cmd("cont")
    finally:
        q.close()


def snapshot(vm) -> dict[tuple[str, int], dict]:
    r = subprocess.run([*VQSCOPE, "snapshot", "--qmp", vm.qmp, "--json"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{r.stderr}\n{vm.tail()}"
    return {(q["device"], q["index"]): q for q in json.loads(r.stdout)["queues"]}


def counter(q: dict, which: str) -> int:
    wrap = "used_wrap_counter" if which == "next_used" else \
        "avail_wrap_counter" if which == "next_avail" else "last_avail_wrap_counter"
    return packed_counter(q[which], q[wrap], q["size"])


@pytest.mark.timeout(900)
def test_packed_queues_advance_under_traffic(vm) -> None:
    a = snapshot(vm)
    time.sleep(4)
    b = snapshot(vm)
    for key in QEMU_QUEUES:
        qa, qb = a[key], b[key]
        assert qb["layout"] == "packed" and qb["avail_idx"] is None and qb["used_idx"] is None, qb
        assert qb["positions"] in ("derived", "flags"), qb   # "flags": QMP older than the ring, asked again
        assert not [x for x in qb["anomalies"] if x["kind"] != "indirect_not_read"], qb
        moved = packed_distance(counter(qa, "next_used"), counter(qb, "next_used"), qb["size"])
        assert moved > 0, f"{key}: next_used did not move: {qa['next_used']} -> {qb['next_used']}"


@pytest.mark.timeout(900)
def test_stopped_vm_positions_equal_qemus(vm, qmp) -> None:
    """VM stopped: our next_used / last_avail_idx are QEMU's used-idx /
    last-avail-idx, and the derived wrap counters are consistent: next_used
    <= last_avail <= next_avail within one ring (distances as counters), the
    decode has no anomaly, and the chains listed are those from last_avail."""
    qmp("stop")
    time.sleep(1)
    snap = snapshot(vm)
    listed = 0
    for key in QEMU_QUEUES:
        q = snap[key]
        st = qmp("x-query-virtio-queue-status", path=q["qemu"]["path"], queue=key[1])
        assert q["positions"] == "derived", q
        assert (q["next_used"], q["last_avail_idx"]) == (st["used-idx"], st["last-avail-idx"]), (q, st)
        assert (q["qemu"]["desc"], q["qemu"]["avail"], q["qemu"]["used"]) == \
            (st["vring-desc"], st["vring-avail"], st["vring-used"])
        size, nu, la, na = q["size"], counter(q, "next_used"), counter(q, "last_avail_idx"), counter(q, "next_avail")
        assert packed_distance(nu, la, size) <= packed_distance(nu, na, size) == q["inflight"] <= size, q
        assert q["anomalies"] == [], q
        if q["chains"]:
            assert q["chains"][0]["slot"] == q["last_avail_idx"], q
        listed += len(q["chains"])
        # QEMU's in-use buffers (popped, not returned) are no more than the
        # slots between next_used and last_avail
        assert st["inuse"] <= packed_distance(nu, la, size), (q, st)
    rx = snap[("unet", 0)]
    assert rx["inflight"] > 0 and rx["chains"], "virtio-net's RX queue always holds the guest's buffers"
    assert listed > 0
