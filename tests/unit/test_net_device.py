"""NetDevice (inspector/devices/net.py) driven through the Device contract.

Rings are DriverRing rings in a GuestMemory whose front-end addresses (uva)
differ from guest-physical ones, as over vhost-user; kick and call fds are
real eventfds. The "driver" here follows the notification rules: it kicks
only when the device asks for kicks (VRING_USED_F_NO_NOTIFY clear, or
avail_event passed with EVENT_IDX, VIRTIO 1.2 §2.7.10).
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time

import pytest

from inspector.devices.base import QueueStats, VringConfig
from inspector.spec.virtio import (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
                                   VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
                                   VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC)
from inspector.devices.net import (NetDevice,
                                   net_hdr_len)
from inspector.ring.driver import DriverRing
from inspector.spec.virtio import VRING_USED_F_NO_NOTIFY
from inspector.errors import InspectorError
from inspector.memory import GuestMemory
from inspector.datapath.queue import need_event
from tests import conftest
from tests.conftest import require

GPA = 0x40000000
UVA = 0x7F1200000000
MEM = 8 << 20
MAC_DEV = bytes.fromhex("525400123457")
MAC_PEER = bytes.fromhex("02aabbccddee")
HDR = 12


def eth(n: int, seq: int = 0, ethertype: int = 0x88B5) -> bytes:
    body = struct.pack(">I", seq) + bytes((seq + i) & 0xFF for i in range(n - 18))
    return MAC_DEV + MAC_PEER + struct.pack(">H", ethertype) + body


def evread(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_for(cond, timeout=5.0, what="condition"):
    if not conftest.wait_for(cond, timeout, interval=0.001):
        raise AssertionError(f"timed out waiting for {what}")


class Driver:
    """The front-end side of one queue pair over shared memory."""

    def __init__(self, mem: GuestMemory, pair: int, size: int, event_idx: bool):
        self.mem = mem
        base = GPA + pair * 0x40000
        self.rx = DriverRing(mem, base, size)
        self.tx = DriverRing(mem, base + 0x20000, size)
        self.event_idx = event_idx
        self.fds = {name: os.eventfd(0, os.EFD_NONBLOCK) for name in
                    ("rx_kick", "rx_call", "tx_kick", "tx_call")}
        self.next_buf = GPA + 0x200000 + pair * 0x200000
        self.kicks = {"rx": 0, "tx": 0}
        self.rx_bufs: dict[int, int] = {}  # head -> gpa

    def vring(self, index: int) -> VringConfig:
        ring = self.rx if index % 2 == 0 else self.tx
        side = "rx" if index % 2 == 0 else "tx"
        to_uva = lambda g: g - GPA + UVA  # noqa: E731
        return VringConfig(index=index, num=ring.size, desc_uva=to_uva(ring.desc_addr),
                           avail_uva=to_uva(ring.avail_addr), used_uva=to_uva(ring.used_addr),
                           kick_fd=self.fds[f"{side}_kick"], call_fd=self.fds[f"{side}_call"],
                           enabled=True, addr_set=True)

    def alloc(self, n: int) -> int:
        a = self.next_buf
        self.next_buf += (n + 0x7FF) & ~0x7FF
        return a

    def _kick(self, side: str, ring: DriverRing, old: int) -> None:
        """Publish and kick if the device wants it (§2.7.10)."""
        ring.publish()
        if self.event_idx:
            want = need_event(ring.avail_event, ring.avail_idx, old)
        else:
            want = not ring.used_flags & VRING_USED_F_NO_NOTIFY
        if want:
            os.eventfd_write(self.fds[f"{side}_kick"], 1)
            self.kicks[side] += 1

    def give_rx(self, count: int, size: int = 2048) -> None:
        old = self.rx.avail_idx
        for _ in range(count):
            a = self.alloc(size)
            head = self.rx.add_chain([(a, size, True)])
            self.rx_bufs[head] = a
        self._kick("rx", self.rx, old)

    def send(self, frames: list[bytes]) -> None:
        old = self.tx.avail_idx
        for f in frames:
            a = self.alloc(HDR + len(f))
            self.mem.view(a, HDR + len(f))[:] = bytes(HDR) + f
            self.tx.add_chain([(a, HDR, False), (a + HDR, len(f), False)])
        self._kick("tx", self.tx, old)

    def received(self) -> list[bytes]:
        out = []
        for head, n in self.rx.get_used():
            a = self.rx_bufs.pop(head)
            assert self.mem.read(a + 10, 2) == b"\x01\x00"  # num_buffers
            out.append(self.mem.read(a + HDR, n - HDR))
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def memory():
    m = mmap.mmap(-1, MEM)
    mem = GuestMemory()
    mem.add(GPA, m, uva=UVA)
    yield mem
    # the device released its exports on close(): the mmap can be closed
    m.close()


FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_RING_F_INDIRECT_DESC)


def start(memory, *, event_idx=False, pairs=1, size=64, **kw):
    dev = NetDevice(queue_pairs=pairs, **kw)
    feats = FEATURES | (1 << VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
    if pairs > 1:
        feats |= 1 << VIRTIO_NET_F_MQ
    dev.set_features(feats)
    drivers = [Driver(memory, p, size, event_idx) for p in range(pairs)]
    for p, d in enumerate(drivers):
        dev.start_queue(d.vring(2 * p), memory)
        dev.start_queue(d.vring(2 * p + 1), memory)
    return dev, drivers


def test_features_and_config():
    dev = NetDevice()
    f = dev.features()
    for bit in (32, 15, 5, 16, 29, 28):
        assert f >> bit & 1
    assert not f >> VIRTIO_NET_F_MQ & 1
    assert NetDevice(queue_pairs=2).features() >> VIRTIO_NET_F_MQ & 1
    assert dev.num_queues == 2 and NetDevice(queue_pairs=3).num_queues == 6
    cfg = NetDevice(queue_pairs=3, mac="02:00:00:00:00:01").get_config(0, 12)
    assert cfg[:6] == bytes.fromhex("020000000001")
    assert struct.unpack("<HHH", cfg[6:]) == (1, 3, 1500)   # LINK_UP, pairs, mtu
    assert dev.get_config(10, 4) == struct.pack("<H", 1500) + bytes(2)
    assert net_hdr_len(1 << VIRTIO_F_VERSION_1) == 12
    assert net_hdr_len(1 << VIRTIO_NET_F_MRG_RXBUF) == 12
    assert net_hdr_len(0) == 10
    with pytest.raises(InspectorError):
        NetDevice(mac="52:54:00")
    with pytest.raises(InspectorError):
        NetDevice(mode="bridge")
    assert dev.queue_stats(0) == QueueStats(dropped=0)   # RX counts drops
    assert dev.queue_stats(1) == QueueStats()            # TX does not
    dev.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event_idx", [False, True])
def test_loopback_round_trip(memory, event_idx):
    dev, (drv,) = start(memory, event_idx=event_idx)
    try:
        drv.give_rx(32)
        frames = [eth(60 + i, seq=i) for i in range(20)]
        drv.send(frames)
        got: list[bytes] = []
        wait_for(lambda: got.extend(drv.received()) or len(got) == 20, what="20 frames on RX")
        assert got == [MAC_PEER + MAC_DEV + f[12:] for f in frames]
        wait_for(lambda: drv.tx.used_idx == 20, what="TX completions")
        assert len(drv.tx.get_used()) == 20
        rx_st, tx_st = dev.queue_stats(0), dev.queue_stats(1)
        nbytes = sum(len(f) for f in frames)
        assert (tx_st.packets, tx_st.bytes) == (20, nbytes)
        assert (rx_st.packets, rx_st.bytes) == (20, nbytes)
        assert tx_st.last_avail_idx == 20 and rx_st.last_avail_idx == 20
        assert tx_st.broken is None and rx_st.broken is None
        # the driver asked for calls (no NO_INTERRUPT / used_event 0): some came
        assert rx_st.calls >= 1 and evread(drv.fds["rx_call"]) >= 1
        assert dev.stop_queue(1) == 20
        assert dev.stop_queue(0) == 20
        assert dev.queue_stats(1).packets == 20   # counters survive the stop
        assert dev.stop_queue(1) == 20            # idempotent
    finally:
        dev.close()
        drv.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event_idx", [False, True])
def test_idle_worker_sleeps_and_is_woken_by_a_kick(memory, event_idx):
    dev, (drv,) = start(memory, event_idx=event_idx, busy_poll_us=50, idle_timeout_ms=60_000)
    try:
        drv.give_rx(8)
        # Idle: the worker enabled kicks (NO_NOTIFY clear / avail_event = last_avail_idx).
        if event_idx:
            time.sleep(0.05)
        else:
            wait_for(lambda: not drv.tx.used_flags & VRING_USED_F_NO_NOTIFY, what="kicks enabled")
        time.sleep(0.02)
        t0 = time.monotonic()
        drv.send([eth(64, seq=7)])
        assert drv.kicks["tx"] == 1
        got: list[bytes] = []
        wait_for(lambda: got.extend(drv.received()) or got, timeout=5, what="frame after kick")
        assert time.monotonic() - t0 < 5   # woken by the kick, not the 60 s timeout
        wait_for(lambda: dev.queue_stats(1).kicks >= 1, what="kick counted")
    finally:
        dev.close()
        drv.close()


@pytest.mark.timeout(60)
def test_rx_starved_frames_are_dropped_tx_returned(memory):
    """No RX buffer: the frame is dropped and counted on RX, its TX buffer
    returned (a NIC's backpressure); frames flow again once RX has buffers."""
    dev, (drv,) = start(memory, busy_poll_us=50)
    try:
        drv.send([eth(64, seq=i) for i in range(5)])
        wait_for(lambda: drv.tx.used_idx == 5, what="5 TX buffers returned")
        assert drv.rx.used_idx == 0
        wait_for(lambda: dev.queue_stats(0).dropped == 5, what="5 drops on RX")
        st = dev.queue_stats(1)
        assert st.last_avail_idx == 5 and st.packets == 5 and st.dropped is None
        drv.give_rx(8)
        drv.send([eth(64, seq=i) for i in range(5, 8)])
        got: list[bytes] = []
        wait_for(lambda: got.extend(drv.received()) or len(got) == 3, what="3 frames")
        assert [struct.unpack(">I", f[14:18])[0] for f in got] == [5, 6, 7]
        assert dev.queue_stats(0).packets == 3 and dev.queue_stats(0).dropped == 5
    finally:
        dev.close()
        drv.close()


@pytest.mark.timeout(60)
def test_two_queue_pairs_loop_independently(memory):
    dev, drivers = start(memory, pairs=2)
    try:
        for p, d in enumerate(drivers):
            d.give_rx(16)
            d.send([eth(64 + p, seq=100 * p + i) for i in range(10)])
        for p, d in enumerate(drivers):
            got: list[bytes] = []
            wait_for(lambda: got.extend(d.received()) or len(got) == 10, what=f"pair {p}")
            assert all(len(f) == 64 + p for f in got)
            assert dev.queue_stats(2 * p + 1).packets == 10
        assert dev.stop_queue(3) == 10
        assert dev.stop_queue(1) == 10
    finally:
        dev.close()
        for d in drivers:
            d.close()


@pytest.mark.timeout(60)
def test_restart_continues_from_base(memory):
    dev, (drv,) = start(memory)
    try:
        drv.give_rx(16)
        drv.send([eth(64, seq=i) for i in range(4)])
        wait_for(lambda: drv.rx.used_idx == 4, what="4 frames")
        base = dev.stop_queue(1)
        assert base == 4
        v = drv.vring(1)
        v.base = base
        dev.start_queue(v, memory)
        drv.send([eth(64, seq=9)])
        wait_for(lambda: drv.rx.used_idx == 5, what="frame after restart")
        assert dev.queue_stats(1).packets == 5
    finally:
        dev.close()
        drv.close()


@pytest.mark.timeout(60)
def test_hostile_tx_ring_breaks_the_queue_not_the_device(memory):
    err = os.eventfd(0, os.EFD_NONBLOCK)
    dev, (drv,) = start(memory)
    try:
        drv.give_rx(4)
        dev.stop_queue(1)
        v = drv.vring(1)
        v.err_fd = err
        dev.start_queue(v, memory)
        drv.tx.write_desc(0, GPA + MEM + 0x1000, 64, 0, 0)   # outside guest memory
        drv.tx.set_avail_ring(0, 0)
        drv.tx.set_avail_idx(1)
        os.eventfd_write(drv.fds["tx_kick"], 1)
        wait_for(lambda: dev.queue_stats(1).broken is not None, what="broken")
        assert "outside guest memory" in dev.queue_stats(1).broken
        wait_for(lambda: evread(err) == 1, what="SET_VRING_ERR fd signalled")
        assert dev.stop_queue(1) == 0
    finally:
        dev.close()
        drv.close()
        os.close(err)


@pytest.mark.timeout(60)
def test_polling_front_end_without_kick_fds(memory):
    """vhost-user's VRING_NOFD bit: no kick fd; the device polls (naps 1 ms)."""
    dev = NetDevice(busy_poll_us=50)
    dev.set_features(FEATURES)
    drv = Driver(memory, 0, 64, False)
    try:
        for i in (0, 1):
            v = drv.vring(i)
            v.kick_fd = None
            dev.start_queue(v, memory)
        time.sleep(0.05)   # let the worker go idle
        drv.give_rx(4)
        drv.send([eth(64)])
        got: list[bytes] = []
        wait_for(lambda: got.extend(drv.received()) or got, what="frame without kicks")
        assert dev.queue_stats(1).kicks == 0
        dev.stop_queue(1)
        assert not drv.tx.used_flags & VRING_USED_F_NO_NOTIFY   # handed back asking for kicks
    finally:
        dev.close()
        drv.close()


def test_start_queue_rejects_unmapped_ring(memory):
    dev = NetDevice()
    dev.set_features(FEATURES)
    v = VringConfig(index=1, num=64, desc_uva=UVA + MEM - 16, avail_uva=UVA, used_uva=UVA + 0x1000)
    with pytest.raises(InspectorError):
        dev.start_queue(v, memory)
    with pytest.raises(InspectorError):
        dev.start_queue(VringConfig(index=5, num=64), memory)
    dev.close()


# --- tap ------------------------------------------------------------------------------------

ETH_P_ALL = 0x0003


@pytest.mark.timeout(60)
def test_tap_mode_moves_frames_both_ways(memory):
    require(os.geteuid() == 0, "tap mode needs root (CAP_NET_ADMIN)")
    require(os.path.exists("/dev/net/tun"), "tap mode needs /dev/net/tun")
    name = f"vqst{os.getpid() % 100000}"
    dev, (drv,) = start(memory, mode="tap", tap_name=name)
    sniff = None
    try:
        assert dev.tap_name == name
        try:  # keep IPv6 autoconf chatter off the interface (best effort)
            with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sniff.bind((name, 0))
        sniff.settimeout(5)
        # TX: the driver sends; the kernel receives it on the tap interface.
        frame = eth(80, seq=42)
        drv.send([frame])
        while True:
            data, addr = sniff.recvfrom(65536)
            if data[12:14] == b"\x88\xb5":
                break
        assert data == frame
        wait_for(lambda: dev.queue_stats(1).packets == 1, what="TX counted")
        # RX: the kernel transmits on the tap; the device delivers into RX buffers.
        drv.give_rx(8)
        out = MAC_PEER + MAC_DEV + b"\x88\xb5" + b"from the kernel".ljust(50, b".")
        sniff.send(out)
        got: list[bytes] = []
        wait_for(lambda: got.extend(f for f in drv.received() if f[12:14] == b"\x88\xb5") or got,
                 what="frame from the tap")
        assert got[0] == out
        assert dev.queue_stats(0).packets >= 1
    finally:
        if sniff is not None:
            sniff.close()
        dev.close()
        drv.close()
    # a non-persistent tap disappears with its last fd
    assert not os.path.exists(f"/sys/class/net/{name}")
