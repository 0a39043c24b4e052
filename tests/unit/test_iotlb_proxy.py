"""``vqscope proxy`` between the built-in front-end behind an IOMMU and
``vqscope serve net --loopback`` (issue 17): IOTLB_MSG UPDATEs go one way
and the back-end's misses (BACKEND_IOTLB_MSG on the back-end channel) the
other, relayed byte for byte; the proxy mirrors the IOTLB and shows the
same IOVA rings, translated, as the back-end does. Real processes, sockets
and memfds; no guest (tests/integration/test_vhost_user_viommu.py has the
QEMU one).
"""

from __future__ import annotations

import os
import shutil

from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.frontend_iommu import IOVA_RING_BASE, IOVA_RO_BASE, IOVA_WINDOWS, IOVA_WO_BASE

from tests.support.iotlb import Introspect, anomalies, echoed, exchange, frame
from tests.support.peers import VqscopeNet, socket_dir
from tests.support.proxy import VqscopeProxy

MEM = 1 << 20


def test_misses_and_updates_through_the_proxy():
    d = socket_dir()
    back, front = os.path.join(d, "be.sock"), os.path.join(d, "fe.sock")
    try:
        with VqscopeNet(back) as be, VqscopeProxy(front, back) as px, \
                VhostUserFrontend(front, queue_pairs=1, queue_size=64, mem_size=MEM, packed=False, iommu=True,
                                  timeout=10) as fe:
            # Rings and RX buffers mapped up front; TX buffers (the RO window) by misses, which
            # leave their chain waiting in the ring (an RX-buffer miss would cost the frame today).
            fe.iotlb_policy.answer = False
            fe.serve_misses(0.2)
            for base in (IOVA_RING_BASE, IOVA_WO_BASE):
                assert fe.iotlb_update(base, MEM, fe.uva, IOVA_WINDOWS[base]) == 0, be.tail() + px.tail()
            fe.serve_misses(0.2)
            fe.iotlb_policy.answer = True
            frames = [frame(i) for i in range(8)]
            assert exchange(fe, 0, frames) == [echoed(f) for f in frames], be.tail() + px.tail()
            relayed = [m for m in fe.missed() if m.answer and fe.iova_window(m.iova)[0] == IOVA_RO_BASE]
            assert relayed and all(m.ack == 0 for m in relayed), fe.missed()
            fe.post_rx_buffers(0, 4)      # chains for both views to decode
            served = Introspect(back).queues()
            seen = {q["index"]: q for q in px.snapshot()["queues"]}
            for vring in (0, 1):
                mine, theirs = served[vring]["iotlb"], seen[vring]["iotlb"]
                # The proxy's mirror holds what the back-end holds, and shows the rings the same way.
                assert theirs["entries"] == mine["entries"] and theirs["ring"] == mine["ring"], (theirs, mine)
                for area in ("desc", "avail", "used"):
                    assert theirs["ring"][area]["gpa"] is not None, theirs["ring"]
                assert not anomalies(seen[vring], "addr_out_of_range"), seen[vring]["anomalies"]
            rx = [d["addr"] for c in seen[0]["chains"] for d in c["descs"]]
            assert len(rx) == 4 and all(IOVA_WO_BASE <= a < IOVA_WO_BASE + MEM for a in rx), seen[0]["chains"]
            assert fe.iotlb_invalidate(IOVA_WO_BASE, MEM) == 0
            after = {q["index"]: q for q in px.snapshot()["queues"]}
            assert after[0]["iotlb"]["entries"] == mine["entries"] - 1, after[0]["iotlb"]
            assert be.peer.alive() and px.peer.alive()
    finally:
        shutil.rmtree(d, ignore_errors=True)
