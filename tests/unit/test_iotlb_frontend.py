"""The built-in front-end's IOMMU mode itself (inspector/vhost_user/frontend_iommu.py):
its IOVA windows, the responder's answer to a miss by policy, the UPDATE
it puts on the wire, and its refusal to start behind a back-end that cannot
take IOVAs (qemu-storage-daemon: libvhost-user offers no
VIRTIO_F_ACCESS_PLATFORM). The back-end's side is test_iotlb_backend.py."""

from __future__ import annotations

import os
import shutil
import socket
import struct

import pytest

from inspector.errors import InspectorError, ProtocolError
from inspector.spec.vhost import (VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO, VHOST_IOTLB_MISS,
                                  VHOST_IOTLB_MSG_STRUCT, VHOST_IOTLB_UPDATE)
from inspector.vhost_user import transport as t
from inspector.ring.driver import DriverRing
from inspector.vhost_user.blk_frontend import BlkFrontend
from inspector.vhost_user.driver_queue import DriverQueue
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.frontend_iommu import (IOTLB_PAGE, IOVA_RING_BASE, IOVA_RO_BASE, IOVA_WO_BASE,
                                                 IotlbPolicy, iotlb_payload)
from inspector.vhost_user.protocol import FLAG_NEED_REPLY, FLAG_REPLY, VERSION, BackendRequest, Request

from tests.conftest import require
from tests.support.peers import socket_dir
from tests.support.qsd import QSD, running_qsd

MEM = 1 << 20


@pytest.fixture
def fe():
    """A front-end in IOMMU mode, connected but without a handshake, to a
    listening socket the test answers on: (front-end, the accepted peer)."""
    d = socket_dir()
    path = os.path.join(d, "s")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    f = VhostUserFrontend(path, queue_pairs=1, queue_size=64, mem_size=MEM, packed=False, iommu=True,
                          handshake=False)
    peer, _ = lsock.accept()
    peer.settimeout(5)
    for i in range(f.num_vrings):   # the vrings a handshake would set up, without one
        f.queues.append(DriverQueue(i, DriverRing(f.mem, f.ring_base[i], f.queue_size), f._eventfd(), f._eventfd()))
    try:
        yield f, peer
    finally:
        f.close()
        peer.close()
        lsock.close()
        shutil.rmtree(d, ignore_errors=True)


def test_iova_windows_are_neither_gpa_nor_uva(fe):
    f, _ = fe
    gpa = f.slots_base + 3 * f.slot_size
    assert f.dma_addr(gpa, False) == IOVA_RO_BASE + gpa and f.dma_addr(gpa, True) == IOVA_WO_BASE + gpa
    assert f.ring_addr(f.ring_base[1]) == IOVA_RING_BASE + f.ring_base[1]
    for base in (IOVA_RING_BASE, IOVA_RO_BASE, IOVA_WO_BASE):
        assert base >= 1 << 47 and base > f.uva + MEM     # never a user-space address, never a gpa
        assert f.iova_window(base + gpa) == (base, gpa)
        assert f.iova_window(base + MEM) is None and f.iova_window(base - 1) is None
    f.iommu = False
    assert f.dma_addr(gpa, True) == gpa and f.ring_addr(0) == f.uva


def test_answer_by_policy(fe):
    f, _ = fe
    f.post_rx_buffers(0, 1)                   # vring 0 holds one slot: the owner of its pages
    [slot] = f.rx(0).slots.values()
    gpa = f.slots_base + slot * f.slot_size
    miss_iova = IOVA_WO_BASE + gpa + 100

    def answer(policy, iova=miss_iova, asked=VHOST_ACCESS_WO):
        f.iotlb_policy = policy
        base, g = f.iova_window(iova)
        return f._choose(iova, asked, base, g, *f._owner(g, base))

    assert answer(IotlbPolicy()) == (IOVA_WO_BASE + gpa, IOTLB_PAGE, f.uva + gpa, VHOST_ACCESS_WO)
    assert answer(IotlbPolicy(granularity="area"))[:2] == (IOVA_WO_BASE + gpa, f.slot_size)
    assert answer(IotlbPolicy(granularity="all")) == (IOVA_WO_BASE, MEM, f.uva, VHOST_ACCESS_WO)
    assert answer(IotlbPolicy(perm="rw"))[3] == VHOST_ACCESS_RW
    assert answer(IotlbPolicy(perm="asked"), asked=VHOST_ACCESS_RO)[3] == VHOST_ACCESS_RO
    assert answer(IotlbPolicy(buffer_perm={0: VHOST_ACCESS_RO}))[3] == VHOST_ACCESS_RO
    assert answer(IotlbPolicy(buffer_perm={1: VHOST_ACCESS_RO}))[3] == VHOST_ACCESS_WO
    assert answer(IotlbPolicy(silent={0})) is None and answer(IotlbPolicy(answer=False)) is None
    assert answer(IotlbPolicy(silent={1})) is not None
    # A ring: its vring's area, RW as coherent DMA is mapped; buffer_perm does not apply.
    ring = IOVA_RING_BASE + f.ring_base[1] + 8
    assert answer(IotlbPolicy(granularity="area", buffer_perm={1: VHOST_ACCESS_RO}), ring) == \
        (IOVA_RING_BASE + f.ring_base[1], f.ring_bytes, f.uva + f.ring_base[1], VHOST_ACCESS_RW)
    assert answer(IotlbPolicy(silent={1}), ring) is None
    with pytest.raises(InspectorError, match="granularity"):
        IotlbPolicy(granularity="huge")
    with pytest.raises(InspectorError, match="buffer_perm"):
        IotlbPolicy(buffer_perm={0: 4})


def _miss(iova: int, perm: int) -> bytes:
    return iotlb_payload(iova, 0, 0, perm, VHOST_IOTLB_MISS)


def test_a_miss_is_answered_with_an_update_on_the_front_end_channel(fe):
    f, peer = fe
    mine, theirs = socket.socketpair()
    f.backend_channel = mine
    try:
        ring_iova = IOVA_RING_BASE + f.ring_base[0] + 0x10
        t.send_message(theirs, BackendRequest.IOTLB_MSG, _miss(ring_iova, VHOST_ACCESS_RO))
        t.send_message(theirs, BackendRequest.IOTLB_MSG, _miss(0x1234, VHOST_ACCESS_RO))   # in no window
        t.send_message(theirs, BackendRequest.CONFIG_CHANGE_MSG, b"")
        # The peer acks the UPDATE as a back-end does: REPLY_ACK 0.
        t.send_message(peer, Request.IOTLB_MSG, struct.pack("<Q", 0), flags=VERSION | FLAG_REPLY)
        assert f.serve_misses(1.0) == 2
        msg = t.recv_message(peer)
        assert (msg.request, msg.flags & FLAG_NEED_REPLY) == (Request.IOTLB_MSG, FLAG_NEED_REPLY)
        iova, size, uaddr, perm, type_ = VHOST_IOTLB_MSG_STRUCT.unpack(msg.payload)
        assert (iova, size, uaddr, perm, type_) == (IOVA_RING_BASE + f.ring_base[0], IOTLB_PAGE,
                                                    f.uva + f.ring_base[0], VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE)
        assert (f.iotlb_misses_seen, f.iotlb_updates_sent, f.iotlb_misses_ignored) == (2, 1, 1)
        assert [(m.vring, m.ack) for m in f.missed()] == [(0, 0), (None, None)]
        # The other message waits for its reader.
        assert f.recv_backend_request(0.1).request == BackendRequest.CONFIG_CHANGE_MSG
        # Left unanswered, then answered later: one UPDATE for the page, both misses covered.
        f.iotlb_policy = IotlbPolicy(answer=False)
        for _ in range(2):
            t.send_message(theirs, BackendRequest.IOTLB_MSG, _miss(ring_iova + 8, VHOST_ACCESS_RO))
        assert f.serve_misses(1.0) == 2 and f.iotlb_misses_ignored == 3
        f.iotlb_policy = IotlbPolicy()
        t.send_message(peer, Request.IOTLB_MSG, struct.pack("<Q", 0), flags=VERSION | FLAG_REPLY)
        assert f.answer_missed(0) == 1
        assert VHOST_IOTLB_MSG_STRUCT.unpack(t.recv_message(peer).payload)[0] == IOVA_RING_BASE + f.ring_base[0]
        assert [m.ack for m in f.missed(0)] == [0, 0, 0] and f.iotlb_updates_sent == 2
        # A malformed miss is the back-end's protocol error.
        t.send_message(theirs, BackendRequest.IOTLB_MSG, _miss(ring_iova, VHOST_ACCESS_RO)[:30])
        with pytest.raises(ProtocolError, match="30 bytes"):
            f.serve_misses(1.0)
        t.send_message(theirs, BackendRequest.IOTLB_MSG, iotlb_payload(ring_iova, 0, 0, VHOST_ACCESS_WO,
                                                                        VHOST_IOTLB_UPDATE))
        with pytest.raises(ProtocolError, match="type=2"):
            f.serve_misses(1.0)
    finally:
        theirs.close()


def test_iommu_front_end_refuses_a_back_end_without_access_platform(tmp_path):
    require(QSD is not None, "qemu-storage-daemon is not installed (Debian qemu-system-common)")
    d = socket_dir()
    img, sock = str(tmp_path / "img"), os.path.join(d, "vu.sock")
    with open(img, "wb") as fimg:
        fimg.truncate(1 << 20)
    try:
        with running_qsd(img, sock):
            with pytest.raises(ProtocolError, match="VIRTIO_F_ACCESS_PLATFORM"):
                BlkFrontend(sock, iommu=True)
            with BlkFrontend(sock) as plain:      # the same back-end, without the IOMMU
                assert plain.dma_addr(4096, True) == 4096
    finally:
        shutil.rmtree(d, ignore_errors=True)
