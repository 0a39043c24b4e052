"""Hostile VHOST_USER_IOTLB_MSGs against ``vqscope serve net`` (issue 17,
part 4): each is rejected (REPLY_ACK non-zero) with exactly one log line
naming the field and its value, the IOTLB is left as it was, the connection
stays up and moves frames afterwards, and the back-end holds no more fds
than before. An INVALIDATE of a range that holds no entry, and an UPDATE
identical to an entry, are accepted (QEMU sends the first all the time).
An INVALIDATE of size 0 or past 2^64 is the exception README documents:
logged and counted, but carried out to the end of the IOVA space.

The back-end is one ``serve net --loopback`` process for the module; each
case is a new front-end connection behind the IOMMU
(inspector/vhost_user/frontend_iommu.py).
"""

from __future__ import annotations

import os
import time

import pytest

from inspector.spec.vhost import (VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_IOTLB_ACCESS_FAIL,
                                  VHOST_IOTLB_MISS, VHOST_IOTLB_MSG_STRUCT,
                                  VHOST_IOTLB_UPDATE)
from inspector.errors import ProtocolError
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.frontend_iommu import IOTLB_PAGE, iotlb_payload

from tests.conftest import wait_for
from tests.support.iotlb import echoed, exchange, fd_count, frame, new_lines, premap, serve_net

MEM = 1 << 20
#: An IOVA outside the front-end's three windows: its responder never maps there.
FRESH = 0x0002_0000_0000_0000
U64 = 1 << 64


@pytest.fixture(scope="module")
def serve():
    with serve_net() as (be, sock, look):
        look.queues()                 # its introspection connection open: counted in what follows
        be.idle_fds = fd_count(be.peer.proc.pid)   # with no front-end connected
        yield be, sock, look


@pytest.fixture
def conn(serve):
    """A front-end behind the IOMMU, its windows mapped up front, whose
    frames already moved: (back-end, front-end, introspection)."""
    be, sock, look = serve
    with VhostUserFrontend(sock, queue_pairs=1, queue_size=64, mem_size=MEM, packed=False, iommu=True,
                           timeout=10) as fe:
        premap(fe)
        assert exchange(fe, 0, [frame(i) for i in range(4)]) == [echoed(frame(i)) for i in range(4)], be.tail()
        # A known entry of our own at FRESH (for the overlap cases).
        assert fe.iotlb_update(FRESH, 2 * IOTLB_PAGE, fe.uva, VHOST_ACCESS_RO) == 0, be.tail()
        yield be, fe, look


def upd(iova, size, uaddr, perm=VHOST_ACCESS_RW, type_=VHOST_IOTLB_UPDATE) -> bytes:
    return iotlb_payload(iova, size, uaddr, perm, type_)


#: name -> (payload from the front-end, the fields the log line may name, the value it shows).
HOSTILE = {
    "update_size_0": (lambda fe: upd(FRESH + 0x10000, 0, fe.uva), ("size",), 0),
    "update_iova_size_overflow": (lambda fe: upd(U64 - IOTLB_PAGE, 2 * IOTLB_PAGE, fe.uva), ("iova", "size"),
                                  U64 - IOTLB_PAGE),
    "update_uaddr_past_memory": (lambda fe: upd(FRESH + 0x10000, IOTLB_PAGE, fe.uva + MEM), ("uaddr",),
                                 None),
    "update_uaddr_before_memory": (lambda fe: upd(FRESH + 0x10000, IOTLB_PAGE, fe.uva - IOTLB_PAGE), ("uaddr",),
                                   None),
    "update_uaddr_straddles_region_end": (lambda fe: upd(FRESH + 0x10000, IOTLB_PAGE, fe.uva + MEM - 0x800),
                                          ("uaddr", "size"), None),
    "update_uaddr_size_overflow": (lambda fe: upd(FRESH + 0x10000, U64 - fe.uva, fe.uva),
                                   ("uaddr", "size", "iova"), None),
    "update_perm_0": (lambda fe: upd(FRESH + 0x10000, IOTLB_PAGE, fe.uva, perm=0), ("perm",), 0),
    "update_perm_4": (lambda fe: upd(FRESH + 0x10000, IOTLB_PAGE, fe.uva, perm=4), ("perm",), 4),
    "update_overlaps_an_entry": (lambda fe: upd(FRESH + IOTLB_PAGE, 2 * IOTLB_PAGE, fe.uva + IOTLB_PAGE,
                                                VHOST_ACCESS_RO), ("iova",), FRESH + IOTLB_PAGE),
    "update_same_range_other_perm": (lambda fe: upd(FRESH, 2 * IOTLB_PAGE, fe.uva, VHOST_ACCESS_RW),
                                     ("iova", "perm"), None),
    "update_inside_an_entry": (lambda fe: upd(FRESH + IOTLB_PAGE, IOTLB_PAGE, fe.uva + IOTLB_PAGE,
                                              VHOST_ACCESS_RO), ("iova",), FRESH + IOTLB_PAGE),
    "type_miss": (lambda fe: upd(FRESH, IOTLB_PAGE, fe.uva, type_=VHOST_IOTLB_MISS), ("type",), VHOST_IOTLB_MISS),
    "type_access_fail": (lambda fe: upd(FRESH, IOTLB_PAGE, fe.uva, type_=VHOST_IOTLB_ACCESS_FAIL), ("type",),
                         VHOST_IOTLB_ACCESS_FAIL),
    "type_255": (lambda fe: upd(FRESH, IOTLB_PAGE, fe.uva, type_=255), ("type",), 255),
    "payload_short": (lambda fe: upd(FRESH, IOTLB_PAGE, fe.uva)[:31], ("size", "payload"), 31),
    "payload_long": (lambda fe: upd(FRESH, IOTLB_PAGE, fe.uva) + bytes(8), ("size", "payload"), 40),
    "payload_empty": (lambda fe: b"", ("size", "payload"), 0),
}


def shows(line: str, value: int) -> bool:
    return str(value) in line or f"{value:#x}" in line


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_iotlb_message_rejected_with_one_line(conn, name):
    be, fe, look = conn
    build, fields, value = HOSTILE[name]
    payload = build(fe)
    before = look.iotlb(1)
    fds = fd_count(be.peer.proc.pid)
    start = len(be.peer.output)
    ack = fe.send_iotlb(payload)
    assert ack not in (0, None), f"{name}: accepted (ack {ack})\n{be.tail()}"
    assert wait_for(lambda: new_lines(be.peer, start), 3), be.tail()
    time.sleep(0.3)                                    # a second line, if any, would come now
    lines = new_lines(be.peer, start)
    assert len(lines) == 1, lines
    line = lines[0]
    assert any(f in line for f in fields), (fields, line)
    if value is not None:
        assert shows(line, value), (value, line)
    after = look.iotlb(1)
    for k in ("entries", "updates", "invalidations", "invalidations_unmapped"):
        assert after[k] == before[k], (k, before, after)
    assert after["rejected"] == before["rejected"] + 1, (before, after)
    # The connection goes on, and the device too.
    more = [frame(100 + i) for i in range(4)]
    assert exchange(fe, 0, more) == [echoed(f) for f in more], be.tail()
    assert fd_count(be.peer.proc.pid) == fds
    assert be.peer.alive()


@pytest.mark.parametrize("size", [0, U64 - FRESH + IOTLB_PAGE], ids=["size_0", "past_2^64"])
def test_malformed_invalidate_is_carried_out_to_the_end_of_the_iova_space(conn, size):
    """An INVALIDATE of size 0 or past 2^64 is logged (one line) and
    counted as rejected, but carried out from its iova to the end of the
    IOVA space (README: QEMU's whole-space flush has size 0); what lies
    below stays, the connection goes on."""
    be, fe, look = conn
    before = look.iotlb(1)
    start = len(be.peer.output)
    assert fe.iotlb_invalidate(FRESH, size) == 0
    assert wait_for(lambda: new_lines(be.peer, start), 3), be.tail()
    time.sleep(0.3)
    lines = new_lines(be.peer, start)
    assert len(lines) == 1 and "size" in lines[0] and f"{FRESH:#x}" in lines[0], lines
    after = look.iotlb(1)
    assert after["rejected"] == before["rejected"] + 1, (before, after)
    assert after["entries"] == before["entries"] - 1, (before, after)     # our entry at FRESH, only
    # The windows below FRESH are still mapped: frames move without a miss.
    seen = fe.iotlb_misses_seen
    more = [frame(100 + i) for i in range(4)]
    assert exchange(fe, 0, more) == [echoed(f) for f in more], be.tail()
    assert fe.iotlb_misses_seen == seen


def test_identical_update_is_accepted_without_a_line(conn):
    be, fe, look = conn
    before = look.iotlb(1)
    start = len(be.peer.output)
    assert fe.iotlb_update(FRESH, 2 * IOTLB_PAGE, fe.uva, VHOST_ACCESS_RO) == 0
    time.sleep(0.3)
    assert new_lines(be.peer, start) == []
    after = look.iotlb(1)
    assert (after["entries"], after["rejected"]) == (before["entries"], before["rejected"]), (before, after)


def test_invalidate_of_a_range_never_mapped_is_accepted_and_counted(conn):
    be, fe, look = conn
    before = look.iotlb(1)
    start = len(be.peer.output)
    assert fe.iotlb_invalidate(FRESH + 0x100000, 16 * IOTLB_PAGE) == 0
    time.sleep(0.3)
    assert new_lines(be.peer, start) == []
    after = look.iotlb(1)
    assert after["invalidations_unmapped"] == before["invalidations_unmapped"] + 1, (before, after)
    assert (after["entries"], after["rejected"]) == (before["entries"], before["rejected"]), (before, after)
    # And an INVALIDATE of our own entry removes it.
    assert fe.iotlb_invalidate(FRESH, 2 * IOTLB_PAGE) == 0
    assert look.iotlb(1)["entries"] == after["entries"] - 1


def test_iotlb_msg_without_need_reply_rejected_all_the_same(conn):
    be, fe, look = conn
    before = look.iotlb(1)
    start = len(be.peer.output)
    fe.send_iotlb(upd(FRESH + 0x10000, 0, fe.uva), need_reply=False)
    assert wait_for(lambda: new_lines(be.peer, start), 3), be.tail()
    time.sleep(0.3)
    assert len(new_lines(be.peer, start)) == 1
    assert look.iotlb(1)["rejected"] == before["rejected"] + 1
    assert exchange(fe, 0, [frame(7)]) == [echoed(frame(7))], be.tail()


def test_iotlb_msg_with_an_fd_leaves_no_fd_behind(serve):
    """IOTLB_MSG carries no fd (vhost-user spec): one sent with a memfd is
    refused, the fd closed in the back-end, and the back-end serves a new
    front-end after it."""
    be, sock, look = serve
    pid = be.peer.proc.pid
    with VhostUserFrontend(sock, queue_pairs=1, queue_size=64, mem_size=MEM, packed=False, iommu=True,
                           timeout=10) as fe:
        premap(fe)
        assert exchange(fe, 0, [frame(0)]) == [echoed(frame(0))], be.tail()
        extra = os.memfd_create("vqscope-iotlb-extra")
        try:
            try:
                ack = fe.send_iotlb(upd(FRESH, IOTLB_PAGE, fe.uva), fds=[extra])
            except (ProtocolError, OSError):
                ack = "closed"
        finally:
            os.close(extra)
        assert ack != 0, be.tail()
    # Refused either way (REPLY_ACK non-zero, or the connection ended): once the
    # front-end is gone, the back-end holds what it held with none connected.
    assert wait_for(lambda: fd_count(pid) == be.idle_fds, 5), (fd_count(pid), be.idle_fds, be.tail())
    with VhostUserFrontend(sock, queue_pairs=1, queue_size=64, mem_size=MEM, packed=False, iommu=True,
                           timeout=10) as fe:
        premap(fe)
        assert exchange(fe, 0, [frame(1)]) == [echoed(frame(1))], be.tail()


def test_payload_struct_is_the_kernels():
    """struct vhost_iotlb_msg: 32 bytes, iova, size, uaddr, perm, type."""
    p = iotlb_payload(1, 2, 3, VHOST_ACCESS_RO, VHOST_IOTLB_UPDATE)
    assert len(p) == VHOST_IOTLB_MSG_STRUCT.size == 32
    assert p[24:26] == bytes([VHOST_ACCESS_RO, VHOST_IOTLB_UPDATE]) and p[26:] == bytes(6)


def test_a_flood_of_updates_stays_bounded_and_evicts(conn):
    """More distinct UPDATEs than the IOTLB holds (``capacity``): each is
    accepted, the table stays at its capacity by evicting, and an evicted
    translation the device needs is simply asked for again."""
    be, fe, look = conn
    cap = look.iotlb(1)["capacity"]
    before = look.iotlb(1)
    pages = MEM // IOTLB_PAGE
    extra = 64
    t0 = time.monotonic()
    for i in range(cap + extra):      # many IOVAs onto the same guest pages: allowed, as an IOMMU does
        assert fe.iotlb_update(FRESH + 0x1000_0000 + i * IOTLB_PAGE, IOTLB_PAGE,
                               fe.uva + (i % pages) * IOTLB_PAGE, VHOST_ACCESS_RO) == 0, i
    took = time.monotonic() - t0
    after = look.iotlb(1)
    assert after["entries"] <= cap and after["updates"] == before["updates"] + cap + extra, (before, after)
    assert after["evictions"] >= before["entries"] + extra, (before, after)
    assert after["rejected"] == before["rejected"]
    # Whatever was evicted (the windows' entries too, maybe) is asked again and answered.
    more = [frame(200 + i) for i in range(4)]
    assert exchange(fe, 0, more) == [echoed(f) for f in more], be.tail()
    assert be.peer.alive()
    print(f"{cap + extra} UPDATEs with REPLY_ACK in {took:.2f} s")


def test_iommu_connections_leave_nothing_behind(serve):
    """Connections behind the IOMMU (IOTLB, misses, back-end channel) come
    and go: the back-end's fds and threads are back where they were."""
    be, sock, look = serve
    pid = be.peer.proc.pid

    def cycle(i):
        with VhostUserFrontend(sock, queue_pairs=1, queue_size=64, mem_size=MEM, packed=bool(i % 2),
                               iommu=True, timeout=10) as fe:
            premap(fe)
            assert exchange(fe, 0, [frame(i)]) == [echoed(frame(i))], be.tail()
            fe.iotlb_invalidate(FRESH, IOTLB_PAGE)

    cycle(0)
    time.sleep(0.3)
    base = (fd_count(pid), thread_count(pid))
    for i in range(1, 31):
        cycle(i)
    assert wait_for(lambda: (fd_count(pid), thread_count(pid)) == base, 10), (base, fd_count(pid),
                                                                               thread_count(pid))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))
