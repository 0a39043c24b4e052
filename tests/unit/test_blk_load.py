"""``vqscope load blk``: the C driver engine (csrc/vqd_blkload.c through
inspector/datapath/blkload.py) and the command (inspector/tools/blk_load.py).

Two kinds of peer: qemu-storage-daemon (libvhost-user; a real back-end on a
tmpfs image, one per test module where the tests allow), and a device played
by the test itself on a ring in plain memory, for back-ends that break the
rules (a used id that is no request in flight, a used len beyond the chain,
used->idx too far ahead, no completion at all)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import signal
import struct
import tempfile
import threading

import pytest

from inspector.cli import main as vqscope
from inspector.datapath.blkload import (RANDOM, SEQUENTIAL, BlkLoadQueue, BlkLoadResult, Latency, bucket_low,
                                        sector_pattern)
from inspector.errors import ArgumentError
from inspector.layout import packed_layout, split_layout
from inspector.spec.virtio import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from inspector.tools.blk_load import BlkLoad, parse_size, report_failed
from tests.conftest import require, wait_for
from tests.support.qsd import QSD, running_qsd

IMAGE_SIZE = 16 << 20


# --- pure parts ---------------------------------------------------------------------------------
def test_parse_size():
    assert [parse_size(t) for t in ("512", "4k", "4K", "1m", "2GiB", "1kb")] == [512, 4096, 4096, 1 << 20,
                                                                                  2 << 30, 1024]
    with pytest.raises(ArgumentError, match="--bs '4x'"):
        parse_size("4x", "bs")


def test_pattern_names_sector_and_seed():
    a = sector_pattern(10, 2, 7)
    assert len(a) == 1024
    assert struct.unpack_from("<QQ", a, 0) == (10, 7) and struct.unpack_from("<QQ", a, 512) == (11, 7)
    assert a[:512] == sector_pattern(10, 1, 7)
    assert sector_pattern(10, 1, 8)[16:] != a[16:512]      # the filler depends on the seed too
    assert sector_pattern(11, 1, 7)[16:] != a[16:512]      # ... and on the sector


def test_histogram_buckets_and_percentiles():
    lows = [bucket_low(b) for b in range(960)]
    assert lows[:17] == list(range(17)) and all(x < y for x, y in zip(lows, lows[1:]))
    # log-linear: each bucket is at most 1/16 of its lower bound wide
    assert all((y - x) * 16 <= x for x, y in zip(lows[16:], lows[17:]))
    hist = [0] * 1024
    hist[16 * 7 + 3] = 99       # [1216, 1280) ns
    hist[16 * 26] = 1           # [2**29, 2**29 + 2**25) ns, ~0.5 s
    r = Latency(100, 1000, 2 << 30, 0, hist)
    assert bucket_low(115) <= r.percentile_ns(50) < bucket_low(116)
    assert r.percentile_ns(99) == r.percentile_ns(50) and r.percentile_ns(99.9) >= 1 << 29


# --- a device played by the test, on a ring in plain memory --------------------------------------
class FakeDevice:
    """Guest memory (an anonymous mapping) holding one split ring of
    ``num`` entries and ``depth`` request slots, and the device's side of it
    in Python: :meth:`take` what the engine made available, :meth:`use`
    any (id, len)."""

    def __init__(self, num: int = 64, depth: int = 4, bs: int = 4096, descs: int = 3):
        self.num, self.depth, self.bs, self.descs = num, depth, bs, descs
        self.lay = self.layout(num)
        self.size = 1 << 20
        self.map = mmap.mmap(-1, self.size)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.slots = [(0x10000 + i * 0x2000, 0x10000 + i * 0x2000 + 16, 0x11000 + i * 0x2000) for i in range(depth)]
        self.last_avail = 0
        self.used_idx = 0
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)

    @staticmethod
    def layout(num: int):
        return split_layout(num, 4096)

    def queue(self, **kw) -> BlkLoadQueue:
        args = dict(event_idx=False, kick_fd=self.kick_fd, call_fd=self.call_fd, slots=self.slots, bs=self.bs, seg_size=self.bs,
                    region=(0, 256), read_pct=100, order=SEQUENTIAL, spin=8, stall=2.0)
        args.update(kw)
        return BlkLoadQueue(self.addr, self.size, (self.num, self.lay.desc_offset, self.lay.avail_offset,
                                                   self.lay.used_offset, 0, 0), **args)

    def u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.map, off)[0]

    def take(self) -> list[tuple[int, int, int]]:
        """(head, type, sector) of each chain made available since the last take."""
        out = []
        avail = self.u16(self.lay.avail_offset + 2)
        while self.last_avail != avail:
            head = self.u16(self.lay.avail_offset + 4 + 2 * (self.last_avail % self.num))
            addr = struct.unpack_from("<Q", self.map, self.lay.desc_offset + 16 * head)[0]
            typ, _, sector = struct.unpack_from("<IIQ", self.map, addr)
            out.append((head, typ, sector))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return out

    def use(self, head: int, length: int, status: int | None = 0, publish: bool = True) -> None:
        if status is not None:
            d = self.lay.desc_offset + 16 * (head + self.descs - 1)   # the chain's status descriptor
            self.map[struct.unpack_from("<Q", self.map, d)[0]] = status
        struct.pack_into("<II", self.map, self.lay.used_offset + 4 + 8 * (self.used_idx % self.num), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:   # one 16-bit store (struct.pack_into zeroes first: the engine could read 0)
            off = self.lay.used_offset + 2
            memoryview(self.map)[off:off + 2].cast("H")[0] = self.used_idx
            os.eventfd_write(self.call_fd, 1)     # the engine arms calls before it sleeps


class PackedFakeDevice(FakeDevice):
    """The same, on a packed ring (§2.8) of ``num`` descriptors (any size):
    the device's next avail and next used positions with their wrap
    counters, a chain's buffer id read from its last descriptor."""

    def __init__(self, num: int = 60, depth: int = 4, bs: int = 4096, descs: int = 3):
        super().__init__(num, depth, bs, descs)
        self.play = self.lay
        self.avail, self.avail_wrap = 0, 1
        self.used, self.used_wrap = 0, 1
        self.chains: dict[int, int] = {}      # buffer id -> descriptors in its chain

    @staticmethod
    def layout(num: int):
        return packed_layout(num)

    def queue(self, **kw) -> BlkLoadQueue:
        args = dict(event_idx=False, kick_fd=self.kick_fd, call_fd=self.call_fd, slots=self.slots, bs=self.bs,
                    seg_size=self.bs, region=(0, 256), read_pct=100, order=SEQUENTIAL, spin=8, stall=2.0,
                    packed=True, wraps=(1, 1))
        args.update(kw)
        return BlkLoadQueue(self.addr, self.size, (self.num, 0, self.play.driver_event_offset,
                                                   self.play.device_event_offset, 0, 0), **args)

    def take(self) -> list[tuple[int, int, int]]:
        out = []
        while True:
            flags = struct.unpack_from("<H", self.map, 16 * self.avail + 14)[0]   # flags first, then the rest
            if bool(flags & 0x80) != bool(self.avail_wrap) or bool(flags & 0x8000) == bool(self.avail_wrap):
                return out
            addr = struct.unpack_from("<Q", self.map, 16 * self.avail)[0]
            typ, _, sector = struct.unpack_from("<IIQ", self.map, addr)
            n = 0
            while True:
                _, _, bid, fl = struct.unpack_from("<QIHH", self.map, 16 * self.avail)
                n += 1
                self.avail += 1
                if self.avail == self.num:
                    self.avail, self.avail_wrap = 0, 1 - self.avail_wrap
                if not fl & VRING_DESC_F_NEXT:
                    break
            self.chains[bid] = n
            out.append((bid, typ, sector))

    def use(self, head: int, length: int, status: int | None = 0, publish: bool = True) -> None:
        if status is not None and head < self.depth:
            self.map[self.slots[head][1]] = status
        struct.pack_into("<QIH", self.map, 16 * self.used, 0, length, head)
        flags = 0x8080 if self.used_wrap else 0
        memoryview(self.map)[16 * self.used + 14:16 * self.used + 16].cast("H")[0] = flags
        self.used += self.chains.pop(head, self.descs)
        if self.used >= self.num:
            self.used, self.used_wrap = self.used - self.num, 1 - self.used_wrap
        os.eventfd_write(self.call_fd, 1)


@pytest.fixture
def fake():
    """Make FakeDevices (same arguments); their eventfds are closed at teardown."""
    made = []

    def make(packed: bool = False, **kw) -> FakeDevice:
        made.append((PackedFakeDevice if packed else FakeDevice)(**kw))
        return made[-1]

    yield make
    for dev in made:
        dev.close()


def _run_against(dev: FakeDevice, bq: BlkLoadQueue, device, seconds: float = 1.0) -> BlkLoadResult:
    """Run the engine in a thread while ``device(dev, running)`` plays the
    device in this one (``running()``: is the engine still running?)."""
    out = []
    t = threading.Thread(target=lambda: out.append(bq.run(seconds)))
    t.start()
    try:
        device(dev, t.is_alive)
    finally:
        t.join(10)
    assert not t.is_alive()
    return out[0]


def test_engine_lays_out_chains_and_completes_what_the_device_uses(fake):
    dev = fake()
    bq = dev.queue(read_pct=0, verify=True)
    assert bq.descs_per_request == 3
    d = dev.lay.desc_offset
    # slot 1's chain: header (readable) -> data -> status (writable)
    assert struct.unpack_from("<QIHH", dev.map, d + 16 * 3) == (dev.slots[1][0], 16, VRING_DESC_F_NEXT, 4)
    assert struct.unpack_from("<QIHH", dev.map, d + 16 * 5) == (dev.slots[1][1], 1, VRING_DESC_F_WRITE, 0)
    seen = []

    def device(dev, running):
        while running():
            for head, typ, sector in dev.take():
                assert typ == VIRTIO_BLK_T_OUT and head % 3 == 0
                data = dev.slots[head // 3][2]
                assert dev.map[data:data + 4096] == sector_pattern(sector, 8, 0)
                seen.append(sector)
                dev.use(head, 1)

    r = _run_against(dev, bq, device, 0.5)
    assert r.broken is None and r.in_flight == 0
    assert r.counters["completed"] == r.counters["writes"] == r.counters["status_ok"] >= 40
    assert seen[:6] == [0, 8, 16, 24, 32, 40]         # sequential, bs = 8 sectors
    assert r.lat_write.n == r.counters["writes"] and r.lat_read.n == 0
    assert r.lat_write.min_ns <= r.lat_write.percentile_ns(50) <= r.lat_write.max_ns
    assert Latency.merge([r.lat_read, r.lat_write]) == r.lat_write == r.lat


def test_data_split_at_size_max(fake):
    dev = fake(descs=6)
    bq = dev.queue(seg_size=1024, read_pct=100)
    assert bq.descs_per_request == 6          # header, 4 x 1024 data bytes, status
    d = dev.lay.desc_offset
    data = dev.slots[1][2]
    chain = [struct.unpack_from("<QIHH", dev.map, d + 16 * i) for i in range(6, 12)]
    assert [c[:2] for c in chain] == [(dev.slots[1][0], 16)] + [(data + 1024 * k, 1024) for k in range(4)] + \
        [(dev.slots[1][1], 1)]
    assert [c[3] for c in chain[:-1]] == list(range(7, 12))

    def device(dev, running):
        while running():
            for head, typ, sector in dev.take():
                assert typ == VIRTIO_BLK_T_IN and all(
                    struct.unpack_from("<H", dev.map, d + 16 * (head + k) + 12)[0]
                    == VRING_DESC_F_NEXT | VRING_DESC_F_WRITE for k in range(1, 5))
                dev.use(head, 4097)

    r = _run_against(dev, bq, device, 0.2)
    assert r.broken is None and r.counters["reads"] == r.counters["status_ok"] > 0


@pytest.mark.parametrize("event_idx", [False, True])
def test_packed_ring_chains_wrap_and_complete(fake, event_idx):
    """§2.8: chains of 3 descriptors in a ring of 61 (not a multiple: chains
    straddle the wrap), written with the avail wrap counter, each used
    descriptor taken when AVAIL and USED both equal the used wrap counter."""
    dev = fake(packed=True, num=61)
    bq = dev.queue(read_pct=50, order=RANDOM, event_idx=event_idx, verify=True)
    seen = []

    def device(dev, running):
        while running():
            for bid, typ, sector in dev.take():
                assert typ in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) and bid < 4 and dev.chains[bid] == 3
                if typ == VIRTIO_BLK_T_OUT:
                    data = dev.slots[bid][2]
                    assert dev.map[data:data + 4096] == sector_pattern(sector, 8, 0)
                seen.append(bid)
                dev.use(bid, 4097 if typ == VIRTIO_BLK_T_IN else 1)

    r = _run_against(dev, bq, device, 0.4)
    assert r.broken is None and r.in_flight == 0, r.broken
    assert r.counters["completed"] == r.counters["status_ok"] == len(seen) > 3 * 61 // 3   # wrapped
    assert r.counters["reads"] and r.counters["writes"]


def test_packed_ring_bad_buffer_id_is_reported(fake):
    dev = fake(packed=True)
    bq = dev.queue()

    def device(dev, running):
        assert wait_for(lambda: len(dev.take()) or dev.chains, 3)
        dev.use(7, 4097, status=None)

    r = _run_against(dev, bq, device, 5.0)
    assert "has buffer id 7, which is not a request in flight" in r.broken


@pytest.mark.parametrize("event_idx, suppress", [(False, True), (False, False), (True, True), (True, False)])
def test_kicks_honour_the_devices_suppression(fake, event_idx, suppress):
    """§2.7.10: without EVENT_IDX the device's VRING_USED_F_NO_NOTIFY says
    "no kicks"; with it, avail_event says at which avail index to kick
    (here: never, far behind, or always, at the current index)."""
    dev = fake()
    bq = dev.queue(event_idx=event_idx)
    u = memoryview(dev.map)[dev.lay.used_offset:dev.lay.used_offset + 6 + 8 * dev.num].cast("H")
    ae = 2 + 4 * dev.num                     # avail_event, after used->ring[Queue Size]
    if suppress:                             # before the first publish
        u[ae if event_idx else 0] = 0x8000 if event_idx else 1

    def device(dev, running):
        while running():
            if event_idx:   # suppress: an index the driver left behind long ago
                u[ae] = (dev.last_avail + 0x8000) & 0xFFFF if suppress else dev.u16(dev.lay.avail_offset + 2)
            else:
                u[0] = 1 if suppress else 0
            for head, _, _ in dev.take():
                dev.use(head, 4097)

    r = _run_against(dev, bq, device, 0.3)
    c = r.counters
    assert r.broken is None and c["completed"] > 20
    if suppress:
        assert c["kicks"] == 0 and c["kicks_suppressed"] > 0
        with pytest.raises(BlockingIOError):
            os.eventfd_read(dev.kick_fd)
    else:
        assert c["kicks"] > 0 and os.eventfd_read(dev.kick_fd) == c["kicks"]
    # The run ends with calls armed (§2.7.7): used_event at the last used index, or no NO_INTERRUPT.
    a = dev.lay.avail_offset
    assert dev.u16(a + 4 + 2 * dev.num) == bq.ring_indices[1] if event_idx else dev.u16(a) == 0


@pytest.mark.parametrize("event_idx, suppress", [(False, True), (False, False), (True, True), (True, False)])
def test_packed_kicks_and_calls_follow_the_event_suppression_areas(fake, event_idx, suppress):
    """§2.8.10: kicks as the device's area says (DISABLE: none; ENABLE:
    each publish; DESC with EVENT_IDX: when the driver passes off_wrap);
    the run ends with calls asked for in the driver's area (DESC at the
    next used position with EVENT_IDX, else ENABLE)."""
    dev = fake(packed=True)
    bq = dev.queue(event_idx=event_idx)
    ev = memoryview(dev.map)[dev.play.driver_event_offset:dev.play.driver_event_offset + 8].cast("H")
    ev[3] = 1 if suppress else 0                       # device area flags: DISABLE / ENABLE

    def device(dev, running):
        while running():
            if event_idx and not suppress:             # DESC: kick me when you pass where I am
                ev[2], ev[3] = dev.avail | dev.avail_wrap << 15, 2
            for bid, _, _ in dev.take():
                dev.use(bid, 4097)

    r = _run_against(dev, bq, device, 0.3)
    c = r.counters
    assert r.broken is None and c["completed"] > 20
    assert (c["kicks"] == 0) == suppress and c["kicks"] + c["kicks_suppressed"] > 0
    used, wrap = bq.ring_indices[1], bq.bl.used_wrap
    assert (ev[0], ev[1]) == ((used | wrap << 15, 2) if event_idx else (ev[0], 0))


@pytest.mark.parametrize("bad, reason", [
    ("id", "has id 1, which is not the head of a request in flight"),
    ("len", "has len 4098, more than the 4097 bytes"),
    ("idx", "used->idx 9 is 9 entries past the last used 0, but only 4 requests are in flight"),
    ("twice", "has id 0, which is not the head of a request in flight"),
])
def test_a_back_end_that_breaks_the_used_ring_is_reported(bad, reason, fake):
    dev = fake()
    bq = dev.queue()

    def device(dev, running):
        assert wait_for(lambda: dev.u16(dev.lay.avail_offset + 2) == 4, 3)
        heads = [h for h, _, _ in dev.take()]
        if bad == "id":
            dev.use(1, 4097, status=None)
        elif bad == "len":
            dev.use(heads[0], 4098)
        elif bad == "idx":
            memoryview(dev.map)[dev.lay.used_offset + 2:dev.lay.used_offset + 4].cast("H")[0] = 9
        else:   # the same head used twice, published at once
            dev.use(heads[0], 4097, publish=False)
            dev.use(heads[0], 4097)

    r = _run_against(dev, bq, device, 5.0)
    assert reason in r.broken
    assert report_failed({"errors": 0, "broken": r.broken, "verify": None, "then_read": None})


def test_a_back_end_that_completes_nothing_is_reported_as_stalled(fake):
    dev = fake()
    r = _run_against(dev, dev.queue(stall=0.3), lambda dev, running: None, 5.0)
    assert "completed nothing for" in r.broken and "4 request(s) in flight" in r.broken
    assert r.elapsed_ns < 4e9


def test_bad_parameters_name_the_field(fake):
    dev = fake(num=8, depth=4)
    with pytest.raises(ArgumentError, match="iodepth 4 x 3 descriptors per request does not fit queue size 8"):
        dev.queue()
    with pytest.raises(ArgumentError, match="bs 1000"):
        fake(bs=1000).queue()
    with pytest.raises(ArgumentError, match="slot 0 .* is not in guest memory"):
        dev = fake(depth=1)
        dev.slots = [(dev.size - 8, 0, 0)]
        dev.queue()


# --- qemu-storage-daemon, a real back-end ---------------------------------------------------------
@pytest.fixture(scope="module")
def qsd():
    require(QSD is not None, "qemu-storage-daemon is not installed (Debian qemu-system-common)")
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="vqs-blkload-")
    img, sock = os.path.join(d, "img"), os.path.join(d, "vu.sock")
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    try:
        with running_qsd(img, sock, num_queues=2):
            yield img, sock
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_write_verify_then_read_lands_in_the_image(qsd):
    img, sock = qsd
    with BlkLoad(sock, rw="randwrite", size=2 << 20, verify=True, then_read=True, seed=3) as load:
        rep = load.run(0.3)
    assert not report_failed(rep), rep
    assert rep["write"]["ios"] >= 512 and rep["errors"] == 0 and rep["broken"] is None
    assert rep["then_read"]["sectors_checked"] == (2 << 20) // 512 and rep["then_read"]["mismatches"] == 0
    with open(img, "rb") as f:        # what the back-end wrote is the pattern, in the image
        f.seek(4000 * 512)
        assert f.read(1024) == sector_pattern(4000, 2, 3)


def test_verify_catches_a_sector_corrupted_behind_the_back_ends_back(qsd, capsys):
    img, sock = qsd
    assert vqscope(["load", "blk", "--connect", sock, "--rw", "write", "--size", "1m", "--seconds", "0.2",
                    "--verify", "--seed", "9"]) == 0
    with open(img, "r+b") as f:       # the page cache qsd reads through (cache.direct=off)
        f.seek(1234 * 512 + 100)
        f.write(b"\xde\xad")
    capsys.readouterr()
    assert vqscope(["load", "blk", "--connect", sock, "--rw", "read", "--size", "1m", "--seconds", "0.2",
                    "--verify", "--seed", "9", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    v = rep["verify"]
    assert v["mismatches"] >= 1 and v["first_mismatch"]["sector"] == 1234
    assert v["sectors_checked"] > 2048 and rep["errors"] == 0


def test_two_queues_and_the_human_report(qsd, capsys):
    img, sock = qsd
    assert vqscope(["load", "blk", "--connect", sock, "--rw", "randrw", "--queues", "2", "--iodepth", "8",
                    "--bs", "8k", "--seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    for want in ("queues=2", "read: IOPS=", "write: IOPS=", "lat percentiles (usec): 50th=", "errors: 0"):
        assert want in out, out
    assert out.count("lat (usec): min=") == 2       # reads and writes each


def test_options_that_do_not_fit_the_back_end(qsd):
    img, sock = qsd
    with pytest.raises(ArgumentError, match="beyond the disk"):
        BlkLoad(sock, size=IMAGE_SIZE + 4096)
    with pytest.raises(ArgumentError, match="--rw 'nope'"):
        BlkLoad(sock, rw="nope")
    with pytest.raises(ArgumentError, match="--then-read reads back"):
        BlkLoad(sock, rw="randread", verify=True, then_read=True)
    with pytest.raises(ArgumentError, match="fewer than the 2 queue"):
        BlkLoad(sock, size=4096, queues=2)


def test_writes_to_a_read_only_back_end_are_refused_before_any_request(qsd):
    img, _ = qsd
    sock = os.path.join(os.path.dirname(img), "ro.sock")
    with running_qsd(img, sock, writable=False):
        with pytest.raises(ArgumentError, match="read-only"):
            BlkLoad(sock, rw="randwrite")
        with BlkLoad(sock, rw="randread", size=1 << 20) as load:
            assert not report_failed(load.run(0.1))


def test_a_back_end_that_dies_mid_run_is_reported_at_once(qsd):
    img, _ = qsd
    sock = os.path.join(os.path.dirname(img), "dies.sock")
    with running_qsd(img, sock) as proc:
        with BlkLoad(sock, rw="randread", size=1 << 20, stall=30) as load:
            threading.Timer(0.3, proc.kill).start()
            rep = load.run(20)
    assert "closed the vhost-user connection" in rep["broken"] and rep["seconds"] < 10
    assert report_failed(rep)


def test_ctrl_c_stops_the_queues_and_reports(qsd):
    img, sock = qsd
    with BlkLoad(sock, rw="randread", size=1 << 20, queues=2, iodepth=4) as load:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        rep = load.run(20)
    assert rep["interrupted"] and rep["seconds"] < 10 and rep["ios"] > 0 and rep["broken"] is None


def test_load_vhost_net_parses_as_before_and_load_blk_has_fio_defaults():
    from inspector.cli import build_parser, cmd_load, cmd_load_blk
    a = build_parser().parse_args(["load", "vhost-net", "--tx", "3", "--size", "64"])
    assert (a.func, a.kind, a.tx, a.rx, a.size) == (cmd_load, "vhost-net", 3, 8, 64)
    b = build_parser().parse_args(["load", "blk", "--connect", "s"])
    assert (b.func, b.rw, b.bs, b.iodepth, b.queues, b.seconds, b.size) == (cmd_load_blk, "randread", "4k", 32,
                                                                           1, 5.0, None)
