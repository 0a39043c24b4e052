"""vhost-net's device IOTLB on the guest kernel (runs in the VM only, see
conftest.py): the userspace driver acks VIRTIO_F_ACCESS_PLATFORM, gives
every ring and buffer address as an IOVA (gpa + IOVA_OFFSET) and answers
the kernel's IOTLB misses; the vhost_net probe mirrors the IOTLB and the
vhost-net source reads both vrings through it.

The probes attach before the driver opens the device (one BCC compile for
the module); the CLI test attaches after (``vqscope snapshot`` of a running
``load vhost-net --iotlb``), which only the walk of the maps already in the
IOTLB can translate.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from inspector.ring.anomalies import AnomalyKind
from inspector.tools.vhost_net_load import (BUF_SIZE, IOVA_OFFSET, VHOST_NET_VQ_RX, VHOST_NET_VQ_TX,
                                            VhostNetDriver)
from tests.conftest import ROOT, VQSCOPE
from tests.support.peers import Peer

N_TX, M_RX = 10, 9


@pytest.fixture(scope="module")
def run():
    from probes.vhost_ioctl import VhostIoctlProbe
    from probes.vhost_net import VhostNetProbe

    pid = os.getpid()
    probes = []
    try:
        vhost = VhostNetProbe(pids=[pid])
        probes.append(vhost)
        vhost.attach()
        ioctl = VhostIoctlProbe(pids=[pid])
        probes.append(ioctl)
        ioctl.attach()
        with VhostNetDriver(size=64, iotlb=True) as drv:
            drv.send(N_TX)
            drv.receive(M_RX)
            yield drv, vhost, ioctl
    finally:
        for p in probes:
            p.close()


def snapshot_of(run):
    from inspector.sources.vhost_net import VhostNetSource

    drv, vhost, ioctl = run
    with VhostNetSource(os.getpid(), probes=(vhost, ioctl)) as source:
        snap = source.snapshot()
    device = f"vhost-net:{os.getpid()}:{drv.vhost_fd}"
    return {i: snap.queue(device, i) for i in (VHOST_NET_VQ_RX, VHOST_NET_VQ_TX)}


def test_packets_move_both_ways_through_the_iotlb(run):
    drv = run[0]
    assert drv.features >> 33 & 1                      # VIRTIO_F_ACCESS_PLATFORM acked
    assert drv.counters[VHOST_NET_VQ_TX].used == N_TX and drv.counters[VHOST_NET_VQ_RX].used == M_RX
    io = drv.iotlb
    assert io.msg == "v2"
    assert io.misses > 0 and io.answered == io.misses and io.unanswered == 0
    # the used rings were mapped ahead (one page each), every answer one page
    assert io.updates == io.answered + 2
    for s in drv.setups:                               # vhost was given IOVAs, not user addresses
        assert s.desc_user_addr >= IOVA_OFFSET and drv.uaddr_of(s.desc_user_addr) is not None


def test_probe_mirrors_the_device_iotlb(run):
    drv, vhost, _ = run
    states = {s.index: s for s in vhost.queue_states().values() if s.owner_pid == os.getpid()}
    assert sorted(states) == [VHOST_NET_VQ_RX, VHOST_NET_VQ_TX]
    iotlbs = {s.iotlb for s in states.values()}
    assert len(iotlbs) == 1 and 0 not in iotlbs       # one device IOTLB, both vrings on it
    m = vhost.iotlb(iotlbs.pop())
    assert m is not None and m.complete and vhost.iotlb_lost() == 0
    maps = m.maps()
    assert len(maps) == drv.iotlb.updates, (len(maps), drv.iotlb)   # nothing invalidated yet
    for x in maps:                                     # each as the driver sent it
        assert x.size == 4096 and x.addr == drv.uaddr_of(x.start), x


def test_source_reads_both_vrings_through_the_iotlb(run):
    """RX buffers and TX frames published without a kick (vhost leaves
    them in flight): the source decodes their chains at IOVAs through the
    mirrored IOTLB: no addr_out_of_range, no ring_unmapped, no
    mem_table_unknown (the memory table does not translate here)."""
    drv = run[0]
    rx = drv.rings[VHOST_NET_VQ_RX]
    for _ in range(3):                                 # buffers reused: their pages are mapped
        gpa = drv._take_buf(VHOST_NET_VQ_RX)
        drv._bufs[VHOST_NET_VQ_RX][rx.add_chain([(drv.dma(gpa), BUF_SIZE, True)])] = gpa
    rx.publish()
    assert len(drv.publish_tx(2, kick=False)) == 2
    qs = snapshot_of(run)
    for index, inflight in ((VHOST_NET_VQ_RX, 3), (VHOST_NET_VQ_TX, 2)):
        q, s, ring = qs[index], drv.setups[index], drv.rings[index]
        assert q is not None
        assert q.anomalies == [], (index, q.anomalies)
        ds, io = q.extras["device_state"], q.extras["iotlb"]
        assert (ds["desc"], ds["avail"], ds["used"]) == (s.desc_user_addr, s.avail_user_addr, s.used_user_addr)
        assert io["ring"]["desc"] == {"iova": s.desc_user_addr, "uaddr": drv.uva + ring.desc_addr, "perm": "ro"}
        assert io["ring"]["used"]["uaddr"] == drv.uva + ring.used_addr and io["ring"]["used"]["perm"] == "rw"
        assert io["entries"] == drv.iotlb.updates and io["complete"] and io["ranges"] < io["entries"]
        assert (q.avail_idx, q.used_idx) == (ring.avail_idx, ring.used_idx)
        assert q.inflight == inflight and len(q.chains) == inflight
        for ch in q.chains:
            assert all(d.addr >= IOVA_OFFSET and drv.uaddr_of(d.addr) is not None for d in ch.descs)


def test_an_iova_never_mapped_is_untranslated_not_garbage(run):
    """A TX descriptor at an IOVA the driver never mapped (published, no
    kick: vhost never missed on it): its chain carries iova_untranslated,
    the others decode."""
    drv = run[0]
    tx = drv.rings[VHOST_NET_VQ_TX]
    bad = IOVA_OFFSET + drv.mem_size + 0x10000
    head = tx.add_chain([(bad, 64, False)])
    tx.publish()
    q = snapshot_of(run)[VHOST_NET_VQ_TX]
    kinds = [a.kind for a in q.anomalies]
    assert kinds == [AnomalyKind.IOVA_UNTRANSLATED], q.anomalies
    assert q.anomalies[0].head == head and f"{bad:#x}" in q.anomalies[0].detail
    assert len(q.chains) == 3


def test_an_invalidated_ring_is_untranslated_not_read(run):
    """VHOST_IOTLB_INVALIDATE of the TX descriptor table's page: the mirror
    drops the map (vhost_iotlb_del_range) and the TX vring is said to be
    at an IOVA without translation instead of being read; RX still
    translates. Last in this module: TX stays so."""
    drv, vhost, _ = run
    s = drv.setups[VHOST_NET_VQ_TX]
    drv.invalidate(s.desc_user_addr, 1)
    assert drv.iotlb.invalidations == 1
    qs = snapshot_of(run)
    tx = qs[VHOST_NET_VQ_TX]
    assert [a.kind for a in tx.anomalies] == [AnomalyKind.IOVA_UNTRANSLATED], tx.anomalies
    assert f"desc at IOVA {s.desc_user_addr:#x}" in tx.anomalies[0].detail and not tx.chains
    assert tx.extras["iotlb"]["entries"] < drv.iotlb.updates       # the page's map(s) dropped
    assert tx.extras["iotlb"]["ring"]["desc"]["uaddr"] is None
    assert qs[VHOST_NET_VQ_RX].anomalies == []


def test_cli_snapshot_of_a_running_iotlb_load_walks_the_iotlb():
    """``vqscope snapshot --vhost-net PID`` attaches after ``load vhost-net
    --iotlb`` mapped its rings: only the walk of the maps already in vhost's
    IOTLB (at the first handler run it sees) can translate them; both
    vrings are read, nothing is untranslated."""
    with Peer([*VQSCOPE, "load", "vhost-net", "--iotlb", "--size", "64", "--tx", "6", "--rx", "5",
               "--hold", "600", "--every", "1"], "vqscope load --iotlb", cwd=ROOT) as load:
        m = load.wait_for(r"^\{.*\}$", 60)
        summary = json.loads(m.group(0))
        assert summary["iotlb"]["misses"] > 0 and summary["iotlb"]["msg"] == "v2"
        r = subprocess.run([*VQSCOPE, "snapshot", "--vhost-net", str(summary["pid"]), "--json"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr + load.tail()
    snap = json.loads(r.stdout)
    qs = {q["index"]: q for q in snap["queues"]}
    assert sorted(qs) == [0, 1], snap
    for vr in summary["vrings"]:
        q = qs[vr["index"]]
        io = q["iotlb"]
        assert io["walked"] and io["complete"] and io["entries"] > 0, io
        assert io["ring"]["desc"]["iova"] == vr["desc_user_addr"] and io["ring"]["desc"]["uaddr"] is not None
        kinds = {a["kind"] for a in q["anomalies"]}
        assert not kinds & {"iova_untranslated", "addr_out_of_range", "ring_unmapped"}, q["anomalies"]
        assert q["used_idx"] >= (6 if vr["name"] == "tx" else 5)


def test_v1_messages_when_v2_is_not_asked_for():
    """Without VHOST_SET_BACKEND_FEATURES(IOTLB_MSG_V2) vhost speaks v1
    (struct vhost_msg: int type, the iotlb message at offset 8 too): the
    driver reads its misses and answers in v1; frames still move both ways."""
    with VhostNetDriver(size=16, iotlb=True, iotlb_v2=False) as drv:
        drv.send(4)
        drv.receive(3)
        io = drv.iotlb
        assert io.msg == "v1" and io.misses > 0 and io.answered == io.misses and io.unanswered == 0
        assert drv.counters[VHOST_NET_VQ_TX].used == 4 and drv.counters[VHOST_NET_VQ_RX].used == 3
