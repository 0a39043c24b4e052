"""``vqscope serve`` behind a virtual IOMMU (issue 17): VIRTIO_F_ACCESS_PLATFORM,
VHOST_USER_IOTLB_MSG and misses on the back-end channel, against the
built-in front-end's IOMMU mode (inspector/vhost_user/frontend_iommu.py:
rings and buffers given as IOVAs from windows far from both gpa and uva,
misses answered with UPDATEs by policy). Real sockets, memfds and
processes: the back-end runs as ``python -m inspector serve``.

Hostile IOTLB messages and their one log line each: test_iotlb_hostile.py.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from inspector.errors import InspectorError
from inspector.spec.vhost import VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO
from inspector.spec.virtio import (VIRTIO_BLK_S_OK, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                   VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, has_feature)
from inspector.vhost_user.blk_frontend import BlkFrontend
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.frontend_iommu import (IOTLB_PAGE, IOVA_RING_BASE, IOVA_RO_BASE, IOVA_WO_BASE,
                                                 IotlbPolicy)

from tests.support.blk import VqscopeBlk
from tests.support.iotlb import Introspect, anomalies, collect, echoed, exchange, frame, serve_net
from tests.support.peers import socket_dir

QSIZE = 64
MEM = 1 << 20


@pytest.fixture
def net():
    """``serve net --loopback --queues 2`` on a private socket: (back-end,
    socket path, introspection)."""
    with serve_net(queues=2) as net:
        yield net


def net_fe(sock: str, *, pairs: int = 1, packed: bool = False, policy: IotlbPolicy | None = None,
           **kw) -> VhostUserFrontend:
    return VhostUserFrontend(sock, queue_pairs=pairs, queue_size=QSIZE, mem_size=MEM, packed=packed,
                             iommu=True, iotlb_policy=policy, timeout=10, **kw)


def ring_iovas(fe, vring: int) -> dict[str, int]:
    """The IOVAs the front-end gave SET_VRING_ADDR for ``vring``, by its
    fields (desc, used, avail; packed: desc, device event, driver event)."""
    ring = fe.queues[vring].ring
    if fe.packed:
        areas = (ring.desc_addr, ring.device_event_addr, ring.driver_event_addr)
    else:
        areas = (ring.desc_addr, ring.used_addr, ring.avail_addr)
    return dict(zip(("desc", "used", "avail"), (IOVA_RING_BASE + a for a in areas)))


def drain_tx(fe, pair: int, timeout: float) -> bool:
    """Reclaim ``pair``'s TX buffers (answering misses) until all are
    back or ``timeout`` s pass; whether all came back."""
    deadline = time.monotonic() + timeout
    while fe.tx(pair).ring.num_free < QSIZE and time.monotonic() < deadline:
        fe.wait_call(pair, 0.05, "tx")
        fe.poll_tx_done(pair)
    return fe.tx(pair).ring.num_free == QSIZE


# --- frames move through the IOTLB -------------------------------------------

@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_net_loopback_through_the_iotlb(net, packed):
    be, sock, look = net
    with net_fe(sock, packed=packed) as fe:
        assert has_feature(fe.features, VIRTIO_F_ACCESS_PLATFORM)
        assert fe.packed == packed and has_feature(fe.features, VIRTIO_F_RING_PACKED) == packed
        frames = [frame(i) for i in range(24)]
        got = exchange(fe, 0, frames)
        assert got == [echoed(f) for f in frames], be.tail()
        # Misses were sent and answered: rings (RW window) and both kinds of buffer.
        assert fe.iotlb_misses_seen > 0 and fe.iotlb_updates_sent > 0, be.tail()
        assert fe.iotlb_updates_rejected == 0 and fe.iotlb_misses_ignored == 0
        windows = {fe.iova_window(m.iova)[0] for m in fe.missed()}
        assert windows == {IOVA_RING_BASE, IOVA_RO_BASE, IOVA_WO_BASE}, fe.missed()
        assert all(m.ack == 0 for m in fe.missed())
        # Post buffers the device has not used, so RX shows chains of IOVAs.
        fe.post_rx_buffers(0, 4)
        snap = be.snapshot()   # through the CLI: vqscope snapshot --connect SOCK --json
        qs = {q["index"]: q for q in snap["queues"]}
        for vring in (0, 1):
            q = qs[vring]
            iotlb = q["iotlb"]
            assert iotlb["misses"] > 0 and iotlb["updates"] > 0 and iotlb["entries"] > 0, iotlb
            assert iotlb["rejected"] == 0 and iotlb["miss"] is None, iotlb
            for name, iova in ring_iovas(fe, vring).items():
                gpa = iova - IOVA_RING_BASE
                assert iotlb["ring"][name] == {"iova": iova, "uaddr": fe.uva + gpa, "gpa": gpa}, (name, iotlb)
            assert not anomalies(q, "addr_out_of_range"), q["anomalies"]
            assert not anomalies(q, "queue_broken"), q["anomalies"]
        # The device's own counters: the sum over both vrings of what it asked for.
        assert sum(qs[v]["iotlb"]["misses"] for v in (0, 1)) >= len({m.iova for m in fe.missed()}) > 0
        rx_chains = qs[0]["chains"]
        assert len(rx_chains) == 4, rx_chains
        for c in rx_chains:
            for d in c["descs"]:   # the IOVAs the driver wrote, decoded through the IOTLB
                assert IOVA_WO_BASE <= d["addr"] < IOVA_WO_BASE + MEM, d


def test_blk_writes_and_reads_through_the_iotlb(tmp_path):
    d = socket_dir()
    img, sock = str(tmp_path / "img"), os.path.join(d, "vu.sock")
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    try:
        with VqscopeBlk(sock, img) as be, BlkFrontend(sock, mem_size=4 << 20, iommu=True, timeout=10) as fe:
            assert has_feature(fe.features, VIRTIO_F_ACCESS_PLATFORM)
            blocks = {32 * i: os.urandom(4096 * (1 + i % 3)) for i in range(6)}   # up to 3 pages: several entries
            for sector, data in blocks.items():
                c = fe.request(0, VIRTIO_BLK_T_OUT, sector, data, timeout=10)
                assert c.status == VIRTIO_BLK_S_OK, (c, be.tail())
            for sector, data in blocks.items():
                c = fe.request(0, VIRTIO_BLK_T_IN, sector, in_len=len(data), timeout=10)
                assert (c.status, c.data) == (VIRTIO_BLK_S_OK, data), be.tail()
            assert fe.iotlb_misses_seen > 0 and fe.iotlb_updates_rejected == 0
            perms = {m.answer[3] for m in fe.missed() if m.answer}
            assert {VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW} <= perms, fe.missed()
            iotlb = Introspect(sock).iotlb(0)
            assert iotlb["misses"] > 0 and iotlb["updates"] >= 1 and iotlb["rejected"] == 0, iotlb
            with pytest.raises(InspectorError, match="IOVAs"):   # load blk's C engine writes gpas
                fe.take_request_slots(1)
        with open(img, "rb") as f:
            for sector, data in blocks.items():
                f.seek(sector * VIRTIO_BLK_SECTOR_SIZE)
                assert f.read(len(data)) == data
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_whole_window_answers_need_one_miss_per_window(net):
    """granularity "all": one UPDATE maps a window, so a second batch of
    frames through the same windows misses no more."""
    be, sock, look = net
    with net_fe(sock, policy=IotlbPolicy(granularity="all")) as fe:
        assert len(exchange(fe, 0, [frame(i) for i in range(8)])) == 8, be.tail()
        seen = fe.iotlb_misses_seen
        assert 0 < seen <= 6, fe.missed()   # about one per window (two vrings may ask at once)
        assert len(exchange(fe, 0, [frame(i) for i in range(8, 40)])) == 32, be.tail()
        assert fe.iotlb_misses_seen == seen, fe.missed()[seen:]


# --- a front-end that does not answer --------------------------------------------

def test_unanswered_miss_stalls_only_its_queue_until_answered(net):
    be, sock, look = net
    policy = IotlbPolicy(silent={3})          # pair 1's TX vring: its misses go unanswered
    with net_fe(sock, pairs=2, policy=policy) as fe:
        fe.post_rx_buffers(1, 8)
        assert fe.send_frames(1, [frame(100 + i) for i in range(8)]) == 8
        # Pair 0 keeps moving meanwhile, more than once.
        for rnd in range(3):
            frames = [frame(10 * rnd + i) for i in range(8)]
            assert exchange(fe, 0, frames) == [echoed(f) for f in frames], be.tail()
        assert collect(fe, 1, 8, 0.5) == []
        qs = look.wait(lambda qs: qs[3]["iotlb"]["miss"] and qs[3]["iotlb"]["miss"]["waiting_s"] > 1.2
                       and anomalies(qs[3], "iotlb_miss_unanswered"), timeout=10, serve=fe)
        miss = qs[3]["iotlb"]["miss"]
        assert miss and miss["perm"] in ("ro", "rw") and miss["waiting_s"] > 1.2, qs[3]["iotlb"]
        assert any(m.iova == miss["iova"] for m in fe.missed(3)), (miss, fe.missed(3))
        assert anomalies(qs[3], "iotlb_miss_unanswered"), qs[3]["anomalies"]
        assert not anomalies(qs[1], "iotlb_miss_unanswered") and qs[1]["iotlb"]["miss"] is None
        assert qs[3]["packets"] == 0 and not anomalies(qs[3], "queue_broken"), qs[3]
        # Asked again (or not), but at most once a second per page and access.
        ignored = fe.missed(3)
        for key in {(m.iova // IOTLB_PAGE, m.perm) for m in ignored}:
            times = [m.time for m in ignored if (m.iova // IOTLB_PAGE, m.perm) == key]
            assert len(times) <= 1 + (times[-1] - times[0]) / 0.9, (key, [round(t - times[0], 2) for t in times])
        # Answer now: pair 1 continues and its frames come back.
        policy.silent.clear()
        assert fe.answer_missed(3) >= 1
        got = collect(fe, 1, 8, 15)
        assert got == [echoed(frame(100 + i)) for i in range(8)], be.tail()
        qs = look.wait(lambda qs: qs[3]["iotlb"]["miss"] is None, timeout=5, serve=fe)
        assert qs[3]["iotlb"]["miss"] is None and not anomalies(qs[3], "iotlb_miss_unanswered"), qs[3]


# --- invalidation ----------------------------------------------------------------

def test_invalidated_buffer_page_misses_again_before_it_moves(net):
    be, sock, look = net
    with net_fe(sock) as fe:
        fe.post_rx_buffers(0, 2)
        assert fe.send_frames(0, [frame(0)]) == 1
        [slot] = fe.tx(0).slots.values()
        assert collect(fe, 0, 1, 15) == [echoed(frame(0))], be.tail()
        fe.free_slots.remove(slot)
        fe.free_slots.append(slot)                    # the next TX frame takes the same slot
        iova = fe.dma_addr(fe._slot_gpa(slot), False)
        assert any(m.answer and m.answer[0] == iova for m in fe.missed()), (hex(iova), fe.missed())
        before = look.iotlb(1)
        assert fe.iotlb_invalidate(iova, IOTLB_PAGE) == 0
        after = look.iotlb(1)
        assert after["invalidations"] == before["invalidations"] + 1, (before, after)
        assert after["entries"] < before["entries"], (before, after)
        seen = [m for m in fe.missed() if m.iova // IOTLB_PAGE == iova // IOTLB_PAGE]
        assert exchange(fe, 0, [frame(1)], post=False) == [echoed(frame(1))], be.tail()
        again = [m for m in fe.missed() if m.iova // IOTLB_PAGE == iova // IOTLB_PAGE]
        assert len(again) == len(seen) + 1 and again[-1].perm == VHOST_ACCESS_RO, again
        assert look.iotlb(1)["misses"] > before["misses"]


def test_invalidated_ring_is_translated_again(net):
    be, sock, look = net
    with net_fe(sock) as fe:
        assert len(exchange(fe, 0, [frame(0)])) == 1, be.tail()
        desc = ring_iovas(fe, 1)["desc"]
        assert fe.iotlb_invalidate(desc, IOTLB_PAGE) == 0
        n = len([m for m in fe.missed() if m.iova // IOTLB_PAGE == desc // IOTLB_PAGE])
        assert exchange(fe, 0, [frame(1)]) == [echoed(frame(1))], be.tail()
        ring_misses = [m for m in fe.missed() if m.iova // IOTLB_PAGE == desc // IOTLB_PAGE]
        assert len(ring_misses) == n + 1, ring_misses


# --- permissions -----------------------------------------------------------------

def test_device_write_through_a_read_only_mapping_breaks_only_that_queue(net):
    be, sock, look = net
    with net_fe(sock, pairs=2, policy=IotlbPolicy(buffer_perm={0: VHOST_ACCESS_RO})) as fe:
        pattern = b"\xa5" * 2048
        posted = fe.free_slots[-4:]
        for slot in posted:
            fe.mem.view(fe._slot_gpa(slot), 2048)[:] = pattern
        assert fe.post_rx_buffers(0, 4) == 4
        assert fe.send_frames(0, [frame(i) for i in range(4)]) == 4
        qs = look.wait(lambda qs: anomalies(qs[0], "queue_broken"), timeout=10, serve=fe)
        broken = anomalies(qs[0], "queue_broken")
        assert broken, (qs[0], be.tail())
        rx_iovas = {fe.dma_addr(fe._slot_gpa(s), True) for s in posted}
        assert any(f"{i:#x}" in broken[0]["detail"] for i in rx_iovas), (broken, [hex(i) for i in rx_iovas])
        assert "wo" in broken[0]["detail"].lower() or "write" in broken[0]["detail"].lower(), broken
        for slot in posted:                              # not a byte written into the RX buffers
            assert fe.mem.read(fe._slot_gpa(slot), 2048) == pattern
        assert fe.recv_frames(0) == []
        # TX 0 is not broken and gave its buffers back; the other pair moves.
        assert drain_tx(fe, 0, 10), be.tail()
        frames = [frame(50 + i) for i in range(8)]
        assert exchange(fe, 1, frames) == [echoed(f) for f in frames], be.tail()
        qs = look.queues()
        for v in (1, 2, 3):
            assert not anomalies(qs[v], "queue_broken"), qs[v]
        assert be.peer.alive()


def test_blk_in_through_a_read_only_mapping_breaks_only_that_requestq(tmp_path):
    """IN data mapped read-only on requestq 0: the device must not write it
    (nor the status after it); requestq 1 goes on."""
    d = socket_dir()
    img, sock = str(tmp_path / "img"), os.path.join(d, "vu.sock")
    data = os.urandom(8192)
    with open(img, "wb") as f:
        f.truncate(4 << 20)
        f.seek(0)
        f.write(data)
    try:
        with VqscopeBlk(sock, img, queues=2) as be, \
                BlkFrontend(sock, num_queues=2, mem_size=4 << 20, iommu=True, timeout=10,
                            iotlb_policy=IotlbPolicy(buffer_perm={0: VHOST_ACCESS_RO})) as fe:
            slot = fe.free_slots[-1]
            base = fe._slot_gpa(slot)
            fe.mem.view(base, fe.slot_size)[:] = b"\x5a" * fe.slot_size
            head = fe.submit(0, VIRTIO_BLK_T_IN, 0, in_len=len(data))
            look = Introspect(sock)
            qs = look.wait(lambda qs: anomalies(qs[0], "queue_broken"), timeout=10, serve=fe)
            broken = anomalies(qs[0], "queue_broken")
            assert broken, (qs[0], be.tail())
            data_iova = fe.dma_addr(base + BlkFrontend.DATA_OFFSET, True)
            assert f"{data_iova:#x}" in broken[0]["detail"], (hex(data_iova), broken)
            assert fe.complete(0, timeout=0.5) == [] and fe.in_flight(0) == [head]
            assert fe.mem.read(base + BlkFrontend.DATA_OFFSET, len(data)) == b"\x5a" * len(data)
            assert fe.mem.read(base + 16, 1) == b"\xff"            # the status byte: never written
            c = fe.request(1, VIRTIO_BLK_T_IN, 0, in_len=len(data), timeout=10)
            assert (c.status, c.data) == (VIRTIO_BLK_S_OK, data), be.tail()
            assert not anomalies(look.queue(1), "queue_broken")
            look.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)



@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_ring_areas_mapped_as_the_device_uses_them(net, packed):
    """Each ring area mapped with only the access the device needs there:
    a split ring's desc and avail read-only and its used ring write-only
    moves frames; a packed descriptor ring mapped read-only cannot, since
    the device writes used descriptors back into it (VIRTIO 1.2 §2.8.6):
    the vring does not move and not a byte of that ring is written."""
    be, sock, look = net
    policy = IotlbPolicy(answer=False)
    with net_fe(sock, packed=packed, policy=policy) as fe:
        fe.serve_misses(0.3)                   # the rings' first misses: left unanswered
        for vring in (0, 1):
            ring = fe.queues[vring].ring
            if packed:   # desc | driver event (device reads) | device event (device writes)
                areas = [(ring.desc_addr, ring.driver_event_addr - ring.desc_addr, VHOST_ACCESS_RO),
                         (ring.driver_event_addr, 4, VHOST_ACCESS_RO), (ring.device_event_addr, 4, VHOST_ACCESS_WO)]
            else:        # desc | avail (device reads) ... used (device writes)
                areas = [(ring.desc_addr, ring.used_addr - ring.desc_addr, VHOST_ACCESS_RO),
                         (ring.used_addr, ring.layout.total_size - ring.layout.used_offset, VHOST_ACCESS_WO)]
            for gpa, size, perm in areas:
                assert fe.iotlb_update(IOVA_RING_BASE + gpa, size, fe.uva + gpa, perm) == 0, be.tail()
        fe.serve_misses(0.3)                   # and those sent while the UPDATEs arrived
        policy.answer = True                   # buffers as the driver maps them
        frames = [frame(i) for i in range(8)]
        assert fe.post_rx_buffers(0, 8) == 8 and fe.send_frames(0, frames) == 8
        tx_desc = fe.tx(0).ring.desc_addr
        written = bytes(fe.mem.read(tx_desc, 16 * QSIZE))   # the driver's descriptors, as published
        got = collect(fe, 0, 8, 3 if packed else 15)
        if not packed:
            assert got == [echoed(f) for f in frames], be.tail()
            for vring in (0, 1):
                assert not anomalies(look.queue(vring), "queue_broken")
            return
        assert got == [], be.tail()
        assert fe.tx(0).ring.num_free == QSIZE - 8, "the device used TX descriptors through a read-only ring"
        assert bytes(fe.mem.read(tx_desc, 16 * QSIZE)) == written, "the device wrote a read-only ring"
        q = look.queue(1)
        assert anomalies(q, "queue_broken") or q["iotlb"]["miss"], (q, be.tail())


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_frames_across_pages_and_merged_rx_buffers(net, packed):
    """A TX frame whose one descriptor spans two IOTLB pages (two entries:
    two iovecs), looped into several MRG_RXBUF receive buffers each on a
    page of its own, the later ones missing in the middle of the frame:
    every frame arrives whole."""
    be, sock, look = net
    with net_fe(sock, packed=packed, mrg_rxbuf=True, slot_size=8192) as fe:
        frames = [frame(i, size=6000) for i in range(4)]
        assert fe.post_rx_buffers(0, 24, buf_len=1024) == 24
        assert fe.send_frames(0, frames) == 4
        got = collect(fe, 0, 4, 15)
        assert got == [echoed(f) for f in frames], (len(got), be.tail())
        tx_pages = {m.iova // IOTLB_PAGE for m in fe.missed(1) if fe.iova_window(m.iova)[0] == IOVA_RO_BASE}
        assert len(tx_pages) >= 8, sorted(hex(p * IOTLB_PAGE) for p in tx_pages)   # two pages a frame
        rx_pages = {m.iova // IOTLB_PAGE for m in fe.missed(0) if fe.iova_window(m.iova)[0] == IOVA_WO_BASE}
        assert len(rx_pages) >= 6 * 4 - 4, len(rx_pages)      # a page per RX buffer used (6 a frame)
        assert not anomalies(look.queue(0), "queue_broken") and look.queue(0)["dropped"] == 0


def test_a_reconnected_front_end_starts_from_an_empty_iotlb(net):
    """The IOTLB is the connection's: after a reconnect (same memory and
    rings, a new connection) the back-end holds no entry until it asks
    again, and the rings go on from where they were."""
    be, sock, look = net
    with net_fe(sock) as fe:
        assert exchange(fe, 0, [frame(i) for i in range(4)]) == [echoed(frame(i)) for i in range(4)], be.tail()
        seen = fe.iotlb_misses_seen
        fe.reconnect()
        # (the old connection's queues may show until the back-end has seen it close)
        fresh = look.wait(lambda qs: qs[1]["iotlb"]["updates"] == 0, timeout=5)[1]["iotlb"]
        assert fresh["updates"] == 0 and fresh["entries"] == 0, fresh
        assert exchange(fe, 0, [frame(i) for i in range(4, 8)]) == [echoed(frame(i)) for i in range(4, 8)], \
            be.tail()
        assert fe.iotlb_misses_seen > seen
        assert look.iotlb(1)["entries"] > 0
