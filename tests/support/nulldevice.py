"""Test devices behind the vhost-user back-end core (inspector/devices/base.py).

``NullDevice`` services nothing: it records start_queue / stop_queue calls
(with the ring addresses translated to guest-physical) and returns a
settable last_avail_idx. ``LoopbackDevice`` is a small, slow, pure-Python
virtio-net loopback (TX frames come back on RX of the same pair) used to
exercise the built-in front-end's data-path helpers.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from dataclasses import replace

from inspector.devices.base import Device, QueueStats, VringConfig
from inspector.errors import InspectorError
from inspector.memory import GuestMemory

from inspector.spec.virtio import VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX

# Feature masks (inspector.spec.virtio names bit numbers).
F_VERSION_1 = 1 << VIRTIO_F_VERSION_1
F_EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX
F_MRG_RXBUF = 1 << VIRTIO_NET_F_MRG_RXBUF


class NullDevice(Device):
    name = "null"

    def __init__(self, num_queues: int = 2, features: int = F_VERSION_1 | F_EVENT_IDX,
                 config: bytes = bytes(range(32))):
        self.num_queues = num_queues
        self._features = features
        self.acked: int | None = None
        self.config = bytearray(config)
        self.started: dict[int, VringConfig] = {}  # index -> copy of the config at start
        self.gpas: dict[int, tuple[int, int, int]] = {}  # index -> desc, avail, used gpa
        self.starts: list[int] = []
        self.stops: list[int] = []
        self.last_avail: dict[int, int] = {}
        self.closed = False
        self.fail_start = False
        self.refuse_config = False

    def features(self) -> int:
        return self._features

    def set_features(self, features: int) -> None:
        self.acked = features

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise InspectorError(f"config read {offset}+{size} beyond {len(self.config)} bytes")
        return bytes(self.config[offset:offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        if self.refuse_config or offset + len(data) > len(self.config):
            raise InspectorError("config write refused")
        self.config[offset:offset + len(data)] = data

    def start_queue(self, vring: VringConfig, mem: GuestMemory) -> None:
        if self.fail_start:
            raise InspectorError(f"vring {vring.index}: cannot start")
        assert vring.index not in self.started, "started twice"
        self.started[vring.index] = replace(vring)
        self.gpas[vring.index] = (mem.uva_to_gpa(vring.desc_uva), mem.uva_to_gpa(vring.avail_uva),
                                  mem.uva_to_gpa(vring.used_uva))
        self.starts.append(vring.index)
        self.last_avail.setdefault(vring.index, vring.base)

    def stop_queue(self, index: int) -> int:
        assert index in self.started, "stopped a vring that was not started"
        del self.started[index]
        self.stops.append(index)
        return self.last_avail.pop(index, 0)

    def queue_stats(self, index: int) -> QueueStats:
        return QueueStats(last_avail_idx=self.last_avail.get(index))

    def close(self) -> None:
        self.closed = True


_DESC = struct.Struct("<QIHH")


class _Ring:
    """Device side of one split ring, pure Python, no validation beyond
    bounds (tests only)."""

    def __init__(self, vring: VringConfig, mem: GuestMemory, event_idx: bool):
        self.v = vring
        self.mem = mem
        self.num = vring.num
        self.desc = mem.uva_to_gpa(vring.desc_uva)
        self.avail = mem.uva_to_gpa(vring.avail_uva)
        self.used = mem.uva_to_gpa(vring.used_uva)
        self.last_avail = vring.base
        self.used_idx = struct.unpack("<H", mem.read(self.used + 2, 2))[0]
        self.event_idx = event_idx
        self.call_fd = os.dup(vring.call_fd) if vring.call_fd is not None else None
        self.kick_fd = os.dup(vring.kick_fd) if vring.kick_fd is not None else None
        self.stats = QueueStats()

    def avail_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.avail + 2, 2))[0]

    def pop(self) -> tuple[int, list[tuple[int, int, int]]] | None:
        if self.avail_idx() == self.last_avail:
            return None
        slot = self.last_avail % self.num
        head = struct.unpack("<H", self.mem.read(self.avail + 4 + 2 * slot, 2))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            self.mem.view(self.used + 4 + 8 * self.num, 2)[:] = struct.pack("<H", self.last_avail)
        chain, i = [], head
        for _ in range(self.num):
            addr, length, flags, nxt = _DESC.unpack(self.mem.read(self.desc + 16 * i, 16))
            chain.append((addr, length, flags))
            if not flags & 1:
                break
            i = nxt
        return head, chain

    def push(self, head: int, length: int) -> None:
        slot = self.used_idx % self.num
        self.mem.view(self.used + 4 + 8 * slot, 8)[:] = struct.pack("<II", head, length)
        old = self.used_idx
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.view(self.used + 2, 2)[:] = struct.pack("<H", self.used_idx)
        if self.event_idx:
            used_event = struct.unpack("<H", self.mem.read(self.avail + 4 + 2 * self.num, 2))[0]
            need = ((self.used_idx - used_event - 1) & 0xFFFF) < ((self.used_idx - old) & 0xFFFF)
        else:
            need = not struct.unpack("<H", self.mem.read(self.avail, 2))[0] & 1
        if need and self.call_fd is not None:
            os.eventfd_write(self.call_fd, 1)
            self.stats.calls += 1

    def close(self) -> None:
        for fd in (self.call_fd, self.kick_fd):
            if fd is not None:
                os.close(fd)


class LoopbackDevice(Device):
    """virtio-net loopback in Python: what the front-end sends on TX of a
    pair comes back on RX of the same pair (header zeroed, num_buffers 1)."""

    name = "loop"

    def __init__(self, queue_pairs: int = 1,
                 features: int = F_VERSION_1 | F_EVENT_IDX | F_MRG_RXBUF):
        self.num_queues = 2 * queue_pairs
        self.queue_pairs = queue_pairs
        self._features = features
        self.acked = 0
        self.rings: dict[int, _Ring] = {}
        self.lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def features(self) -> int:
        return self._features

    def set_features(self, features: int) -> None:
        self.acked = features

    def queue_num(self) -> int:
        return self.queue_pairs

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        pass

    def start_queue(self, vring: VringConfig, mem: GuestMemory) -> None:
        with self.lock:
            self.rings[vring.index] = _Ring(vring, mem, bool(self.acked & F_EVENT_IDX))
        os.write(self._stop_w, b"r")

    def stop_queue(self, index: int) -> int:
        with self.lock:
            ring = self.rings.pop(index)
            ring.close()
        os.write(self._stop_w, b"r")
        return ring.last_avail

    def queue_stats(self, index: int) -> QueueStats:
        ring = self.rings.get(index)
        return ring.stats if ring else QueueStats()

    def close(self) -> None:
        os.write(self._stop_w, b"q")
        self.thread.join(5)
        os.close(self._stop_r)
        os.close(self._stop_w)
        with self.lock:
            for ring in self.rings.values():
                ring.close()
            self.rings.clear()

    def _run(self) -> None:
        while True:
            with self.lock:
                fds = {r.kick_fd: i for i, r in self.rings.items() if r.kick_fd is not None}
            try:
                ready, _, _ = select.select([self._stop_r, *fds], [], [], 0.05)
            except (OSError, ValueError):  # a kick fd closed by stop_queue meanwhile
                continue
            if self._stop_r in ready and b"q" in os.read(self._stop_r, 64):
                return
            with self.lock:
                live = {r.kick_fd for r in self.rings.values()}
                for fd in ready:
                    if fd in fds and fd in live:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                hlen = 12 if self.acked & (F_VERSION_1 | F_MRG_RXBUF) else 10
                for pair in range(self.num_queues // 2):
                    rx, tx = self.rings.get(2 * pair), self.rings.get(2 * pair + 1)
                    if rx is None or tx is None:
                        continue
                    while True:
                        # Only take a TX frame when an RX buffer waits for it.
                        if rx.avail_idx() == rx.last_avail:
                            break
                        got = tx.pop()
                        if got is None:
                            break
                        head, chain = got
                        data = b"".join(tx.mem.read(a, ln) for a, ln, _ in chain)[hlen:]
                        tx.push(head, 0)
                        tx.stats.packets += 1
                        tx.stats.bytes += len(data)
                        rhead, rchain = rx.pop()
                        addr, cap, _ = rchain[0]
                        out = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)[:hlen] + data
                        out = out[:cap]
                        rx.mem.view(addr, len(out))[:] = out
                        rx.push(rhead, len(out))
                        rx.stats.packets += 1
                        rx.stats.bytes += len(data)
