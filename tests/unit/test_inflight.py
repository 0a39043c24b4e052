"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): descriptors a
back-end held when it died are returned exactly once by the next one.

QEMU's virtio-net does not use inflight areas (only vhost-user-blk/-scsi do),
so the front-end here is our own (inspector/vhost_user/frontend.py). Three
levels: the C tracking on a ring in a bytearray (driver side:
inspector.ring.driver.DriverRing, whose get_used raises on a head that is not
outstanding, i.e. returned twice or never given); our NetDevice behind a real
vhost-user server, stopped and restarted; and a back-end process holding
chains mid-flight, killed with SIGKILL and replaced.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from inspector.ring.driver import DriverRing
from inspector.errors import RingError
from inspector.devices.base import Device
from inspector.datapath.inflight import (
    DESC_STATE,
    QUEUE_HEADER,
    InflightAreas,
    queue_area_size,
    read_queue,
)
from inspector.memory import GuestMemory
from inspector.vhost_user.protocol import ProtocolFeature
from inspector.datapath.queue import DeviceQueue

from tests.conftest import ROOT, wait_for
from tests.support.peers import socket_dir

GPA = 0x100000
MEM_SIZE = 1 << 20
DATA = GPA + 0x10000
SIZE = 8


class Rig:
    """A driver ring in a bytearray, an inflight area, and the device queue of
    the current back-end "incarnation" (:meth:`restart` makes a new one on
    the same ring and area, as a restarted back-end would)."""

    def __init__(self, size: int = SIZE, queue_size: int | None = None):
        self.size = size
        self.mem = GuestMemory()
        self.mem.add(GPA, bytearray(MEM_SIZE))
        self.drv = DriverRing(self.mem, GPA, size)
        self.queue_size = queue_size or size   # GET_INFLIGHT_FD's queue_size
        self.area = bytearray(queue_area_size(self.queue_size))
        self.given: list[int] = []     # heads made available, in order
        self.returned: list[int] = []  # heads the device returned, in order
        self.areas = self.dev = None
        self.restart(base=0)

    def restart(self, base: int | None = None) -> int:
        """A new back-end on the same ring: base is what the front-end sends
        with SET_VRING_BASE (QEMU: the used index, when GET_VRING_BASE could
        not be asked). Returns how many heads attach resubmits."""
        if self.dev is not None:
            self.areas.close()
            self.dev.release()
        self.dev = DeviceQueue(self.mem, self.size, self.drv.desc_addr, self.drv.avail_addr,
                               self.drv.used_addr, gpa=True,
                               last_avail_idx=self.drv.used_idx if base is None else base)
        self.areas = InflightAreas()
        self.areas.set(self.area, 1, self.queue_size)
        return self.areas.attach(self.dev, 0)

    def add(self, n: int) -> list[int]:
        heads = [self.drv.add_chain([(DATA + 0x100 * len(self.given) % 0x8000, 64, True)])
                 for _ in range(n)]
        self.drv.publish()
        self.given += heads
        return heads

    def collect(self) -> list[int]:
        got = [h for h, _ in self.drv.get_used()]   # raises on a head not outstanding
        self.returned += got
        return got

    def state(self):
        return read_queue(self.area, 0, self.queue_size)


def _flag(area: bytearray, head: int, value: int = 1, counter: int | None = None) -> None:
    off = QUEUE_HEADER.size + head * DESC_STATE.size
    _, nxt, c = DESC_STATE.unpack_from(area, off)
    DESC_STATE.pack_into(area, off, value, nxt, c if counter is None else counter)


def _header(area: bytearray, **fields) -> None:
    names = ("features", "version", "desc_num", "last_batch_head", "used_idx")
    cur = dict(zip(names, QUEUE_HEADER.unpack_from(area, 0)))
    cur.update(fields)
    QUEUE_HEADER.pack_into(area, 0, *(cur[n] for n in names))


# --- format -------------------------------------------------------------------

def test_area_size_is_libvhost_users():
    """vu_inflight_queue_size: ALIGN_UP(16 * queue_size + 2, 64); the header
    (16 bytes) fits in the rounding for every size."""
    for qs in (1, 2, 3, 4, 5, 7, 8, 256, 1024, 32768):
        want = (16 * qs + 2 + 63) // 64 * 64
        assert queue_area_size(qs) == want
        assert want >= 16 + 16 * qs, qs


def test_new_area_is_initialised():
    rig = Rig()
    st = rig.state()
    assert (st.version, st.desc_num, st.used_idx, st.features, st.inflight) == (1, SIZE, 0, 0, [])


# --- tracking ---------------------------------------------------------------------

def test_taken_heads_are_flagged_in_order_and_cleared_when_used():
    rig = Rig()
    heads = rig.add(3)
    chains = rig.dev.pop()
    assert [c.head for c in chains] == heads
    st = rig.state()
    assert st.heads == heads, "flagged in the order they were taken (counter)"
    rig.dev.push([(heads[1], 0)])
    st = rig.state()
    assert st.heads == [heads[0], heads[2]]
    assert st.used_idx == 1 == rig.drv.used_idx
    assert st.last_batch_head == heads[1]
    assert rig.areas.in_flight(rig.dev) == 2


def test_rewind_unflags():
    rig = Rig()
    heads = rig.add(3)
    rig.dev.pop()
    rig.dev.rewind(2)
    assert rig.state().heads == [heads[0]]
    assert rig.dev.last_avail_idx == 1
    again = rig.dev.pop()
    assert [c.head for c in again] == heads[1:]
    assert rig.state().heads == heads


def test_restart_returns_each_in_flight_head_once_oldest_first():
    """Five taken, two returned out of order, then the back-end dies: the next
    one hands back the other three in the order they were taken, then what
    the driver added since; every head comes back exactly once."""
    rig = Rig()
    heads = rig.add(5)
    assert len(rig.dev.pop()) == 5
    rig.dev.push([(heads[3], 0), (heads[0], 0)])
    assert rig.collect() == [heads[3], heads[0]]
    # Crash: the queue is dropped with three heads held.
    assert rig.restart() == 3                         # base = used_idx = 2
    assert rig.dev.last_avail_idx == 2 + 3            # used->idx + in flight
    more = rig.add(2)
    chains = rig.dev.pop()
    assert [c.head for c in chains] == [heads[1], heads[2], heads[4]] + more
    rig.dev.push([(c.head, 0) for c in chains])
    rig.collect()
    # Heads are reused once returned: compare as multisets (get_used already
    # refused any head that was not outstanding).
    assert sorted(rig.returned) == sorted(rig.given) and len(rig.returned) == 7
    st = rig.state()
    assert st.inflight == [] and st.used_idx == rig.drv.used_idx == 7


def test_restart_after_a_batch_was_published_but_not_cleared():
    """The back-end died between storing used->idx and clearing the batch's
    flags (spec "When reconnecting", step 1): the batch, listed from
    last_batch_head, is not handed back again."""
    rig = Rig()
    heads = rig.add(4)
    rig.dev.pop()
    rig.dev.push([(heads[0], 0), (heads[2], 0)])
    rig.collect()
    st = rig.state()
    assert st.last_batch_head == heads[2]
    # Undo steps 6-7 in the area: exactly the state of a death in that window.
    _flag(rig.area, heads[0])
    _flag(rig.area, heads[2])
    _header(rig.area, used_idx=0)
    assert rig.restart() == 2
    assert rig.areas.recovered[0] == 2
    chains = rig.dev.pop()
    assert [c.head for c in chains] == [heads[1], heads[3]]
    rig.dev.push([(c.head, 0) for c in chains])
    rig.collect()
    assert sorted(rig.returned) == sorted(heads) and len(rig.returned) == 4


def test_resubmitted_head_rewound_comes_back_next():
    rig = Rig()
    heads = rig.add(3)
    rig.dev.pop()
    assert rig.restart() == 3
    first = rig.dev.pop(max_chains=2)
    assert [c.head for c in first] == heads[:2]
    rig.dev.rewind(1)
    rest = rig.dev.pop()
    assert [c.head for c in rest] == heads[1:]
    assert rig.dev.avail_count() == 0


def test_clean_stop_and_restart_resubmits_nothing():
    rig = Rig()
    heads = rig.add(4)
    rig.dev.push([(c.head, 0) for c in rig.dev.pop()])
    rig.collect()
    assert rig.restart() == 0
    assert rig.dev.last_avail_idx == 4
    assert rig.dev.pop() == [] and rig.returned == heads


def test_wraps_past_16_bit_indices():
    rig = Rig(size=4)
    for _ in range(70000 // 4 + 3):
        rig.add(4)
        rig.dev.push([(c.head, 0) for c in rig.dev.pop()])
        rig.collect()
    rig.add(2)
    rig.dev.pop()
    assert rig.restart() == 2
    assert [c.head for c in rig.dev.pop()] == rig.given[-2:]
    st = rig.state()
    assert st.used_idx == rig.drv.used_idx


# --- hostile areas: the queue breaks, naming the field ------------------------------

@pytest.mark.parametrize("corrupt, words", [
    (lambda a: _header(a, version=7), "version 7"),
    (lambda a: _header(a, desc_num=4), "desc_num 4"),
    (lambda a: _header(a, used_idx=0xFF00), "more than the queue size"),
    (lambda a: (_header(a, used_idx=0xFFFF, last_batch_head=200)), "last batch lists head 200"),
    (lambda a: _flag(a, 3, value=2), "inflight 2"),
])
def test_hostile_area_breaks_the_queue(corrupt, words):
    rig = Rig()
    rig.add(2)
    rig.dev.pop()
    corrupt(rig.area)
    with pytest.raises(RingError) as ei:
        rig.restart()
    assert words in str(ei.value)
    assert rig.dev.broken and words in rig.dev.broken


def test_area_smaller_than_the_ring_breaks_the_queue():
    with pytest.raises(RingError, match="too small for a ring of 16"):
        Rig(size=16, queue_size=4)  # GET_INFLIGHT_FD asked for rings of 4, the ring has 16


# --- our NetDevice behind a vhost-user server ----------------------------------------

def _frame(i: int) -> bytes:
    return bytes.fromhex("525400123457525400123456") + b"\x08\x00" + struct.pack("<I", i) + bytes(50)


def _echo(fe, n: int, start: int = 0) -> int:
    """Send n frames on pair 0 and wait until all came back on RX; returns
    how many frames came back."""
    fe.post_rx_buffers(0, n)
    assert fe.send_frames(0, [_frame(start + i) for i in range(n)]) == n
    got: list[bytes] = []
    done = 0
    deadline = time.monotonic() + 10
    while (len(got) < n or done < n) and time.monotonic() < deadline:
        fe.wait_call(0, 0.1)
        got += fe.recv_frames(0)
        done += fe.poll_tx_done(0)
    assert done == n, f"{done} of {n} TX buffers came back"
    return len(got)


def test_net_device_tracks_and_survives_a_restart():
    from inspector.devices.net import NetDevice
    from inspector.vhost_user.frontend import VhostUserFrontend
    from inspector.vhost_user.server import VhostUserServer

    d = socket_dir()
    sock = f"{d}/vu.sock"
    devices = []

    def factory():
        devices.append(NetDevice(busy_poll_us=50))
        return devices[-1]

    srv = VhostUserServer(sock, factory, event_poll_s=None).start()
    fe = None
    try:
        fe = VhostUserFrontend(sock, queue_size=64, inflight=True, packed=False)   # split inflight area
        assert fe.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
        assert _echo(fe, 40) == 40
        for vq in (0, 1):
            st = read_queue(fe.inflight_map, vq, 64)
            assert st.version == 1 and st.desc_num == 64
            assert st.used_idx == fe.queues[vq].ring.used_idx, (vq, st)
            assert st.inflight == [], f"vring {vq}: nothing should be held between bursts: {st}"
        # The back-end goes away without GET_VRING_BASE; a new one takes over.
        srv.stop()
        wait_for(lambda: not os.path.exists(sock), 5)
        srv = VhostUserServer(sock, factory, event_poll_s=None).start()
        fe.reconnect()
        assert wait_for(lambda: len(devices) == 2 and len(devices[1]._rings) == 2, 5)
        assert devices[1]._inflight.resubmitted == {0: 0, 1: 0}
        assert _echo(fe, 40, start=40) == 40
        st = read_queue(fe.inflight_map, 1, 64)
        assert st.used_idx == fe.queues[1].ring.used_idx == 80 and st.inflight == []
    finally:
        if fe is not None:
            fe.close()
        srv.stop()


# --- a back-end process killed with SIGKILL mid-flight ---------------------------------

HOLDING_BACKEND = textwrap.dedent("""
    import sys, threading, time
    sys.path.insert(0, {root!r})
    from tests.unit.test_inflight import HoldingDevice
    from inspector.vhost_user.server import VhostUserServer
    VhostUserServer({sock!r}, lambda: HoldingDevice({hold!r}), event_poll_s=None).serve_forever()
""")


class HoldingDevice(Device):
    """A two-vring device (one virtio-net pair as far as the front-end knows)
    whose workers take every chain of vring 1; with ``hold`` they keep the
    chains of even heads (as a device with requests still running would) and
    return the others, without they return everything. Each taken head is
    printed ("TOOK h", "HELD h"), so a test knows when to kill."""

    name = "holding"
    num_queues = 2
    queue_pairs = 1
    supports_inflight = True

    def queue_num(self) -> int:
        return self.queue_pairs

    def __init__(self, hold: bool):
        self.hold = hold
        self.areas = InflightAreas()
        self.queues: dict[int, DeviceQueue] = {}
        self.threads: dict[int, tuple[threading.Thread, threading.Event]] = {}
        self.lock = threading.Lock()

    def features(self) -> int:
        return 1 << 32   # VIRTIO_F_VERSION_1

    def set_features(self, features: int) -> None:
        pass

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        pass

    def set_inflight(self, area, num_queues: int, queue_size: int) -> None:
        self.areas.set(area, num_queues, queue_size)

    def start_queue(self, vring, mem) -> None:
        q = DeviceQueue(mem, vring.num, vring.desc_uva, vring.avail_uva, vring.used_uva,
                        last_avail_idx=vring.base)
        n = self.areas.attach(q, vring.index)
        print(f"ATTACHED {vring.index} resubmit={n} recovered={self.areas.recovered.get(vring.index)}",
              flush=True)
        self.queues[vring.index] = q
        if vring.index == 1:
            stop = threading.Event()
            t = threading.Thread(target=self._run, args=(q, stop), daemon=True)
            self.threads[1] = (t, stop)
            t.start()

    def _run(self, q: DeviceQueue, stop: threading.Event) -> None:
        while not stop.is_set():
            with self.lock:
                chains = q.pop()
                done = []
                for c in chains:
                    if self.hold and c.head % 2 == 0:
                        print(f"HELD {c.head}", flush=True)
                    else:
                        print(f"TOOK {c.head}", flush=True)
                        done.append((c.head, 0))
                if done:
                    q.push(done)
            time.sleep(0.001)

    def stop_queue(self, index: int) -> int:
        t = self.threads.pop(index, None)
        if t:
            t[1].set()
            t[0].join()
        q = self.queues.pop(index, None)
        return q.last_avail_idx if q else 0

    def queue_stats(self, index: int):
        from inspector.devices.base import QueueStats
        return QueueStats()

    def close(self) -> None:
        for i in list(self.queues):
            self.stop_queue(i)
        self.areas.close()


class _Backend:
    def __init__(self, sock: str, hold: bool):
        code = HOLDING_BACKEND.format(root=str(ROOT), sock=sock, hold=hold)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def count(self, prefix: str) -> int:
        return sum(1 for ln in list(self.lines) if ln.startswith(prefix))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.reader.join(5)


@pytest.mark.timeout(120)
def test_sigkill_mid_flight_then_restart_returns_every_descriptor_once():
    """The front-end posts 24 TX chains; a back-end process takes them all,
    returns those with odd heads and holds the even ones; SIGKILL. A new
    back-end process gets SET_INFLIGHT_FD and SET_VRING_BASE = used index and
    returns the 12 held chains first (no chain is returned twice, none is
    lost), then what the front-end posts next."""
    from inspector.vhost_user.frontend import VhostUserFrontend

    d = socket_dir()
    sock = f"{d}/vu.sock"
    b1 = _Backend(sock, hold=True)
    b2 = fe = None
    try:
        assert wait_for(lambda: os.path.exists(sock) or b1.proc.poll() is not None, 30)
        fe = VhostUserFrontend(sock, queue_size=32, inflight=True, packed=False)
        assert fe.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
        frames = [_frame(i) for i in range(24)]
        assert fe.send_frames(0, frames) == 24
        assert wait_for(lambda: b1.count("HELD") + b1.count("TOOK") == 24, 20), b1.lines
        assert wait_for(lambda: fe.tx(0).ring.used_idx == 12, 10)
        first = fe.poll_tx_done(0)
        held = sorted(int(ln.split()[1]) for ln in b1.lines if ln.startswith("HELD"))
        assert first == 12 and len(held) == 12
        st = read_queue(fe.inflight_map, 1, 32)
        assert sorted(st.heads) == held

        b1.proc.send_signal(signal.SIGKILL)
        b1.proc.wait(10)
        os.unlink(sock)
        b2 = _Backend(sock, hold=False)
        assert wait_for(lambda: os.path.exists(sock) or b2.proc.poll() is not None, 30)
        fe.reconnect()
        assert wait_for(lambda: b2.count("TOOK") == 12, 20), b2.lines
        assert "ATTACHED 1 resubmit=12 recovered=0" in b2.lines, b2.lines
        assert sorted(int(ln.split()[1]) for ln in b2.lines if ln.startswith("TOOK")) == held
        assert wait_for(lambda: fe.tx(0).ring.used_idx == 24, 10)
        assert fe.poll_tx_done(0) == 12      # DriverRing.get_used: each head outstanding, once
        assert fe.send_frames(0, frames[:5]) == 5
        assert wait_for(lambda: fe.tx(0).ring.used_idx == 29, 10)
        assert fe.poll_tx_done(0) == 5
        assert len(fe.tx(0).slots) == 0, "every chain the front-end gave came back"
        st = read_queue(fe.inflight_map, 1, 32)
        assert st.inflight == [] and st.used_idx == 29
    finally:
        if fe is not None:
            fe.close()
        for b in (b1, b2):
            if b is not None:
                b.close()
