"""virtio-net (VIRTIO 1.2 §5.1) behind the vhost-user back-end: loopback or tap.

Vrings 2k and 2k+1 are receiveq k and transmitq k (§5.1.2). The control
queue is not ours: vhost-user front-ends (QEMU, DPDK virtio-user) emulate it
and tell the back-end which pairs to use with SET_VRING_ENABLE.

Per queue pair a worker thread (inspector/devices/net_worker.py) runs the C fast paths of inspector/datapath/net.py
(``vqd_net_loopback``, ``vqd_net_tap_tx`` / ``_rx``), which process a burst
per call and run without the GIL (cffi releases it around C calls). While
there is work, the worker polls with kicks disabled (VRING_USED_F_NO_NOTIFY,
or a stale avail_event with EVENT_IDX); after ``busy_poll_us`` of empty
polls it enables kicks, re-checks the ring (the driver may have added
buffers before it saw the change) and blocks in poll() on the kick eventfd
(TX, or RX when RX ran out of buffers), the tap fd and a stop eventfd. Calls
(device->driver notifications) are decided and written in C after each
burst, honouring VRING_AVAIL_F_NO_INTERRUPT / used_event.

Loopback: every frame sent on transmitq k comes back on receiveq k with its
source and destination MAC swapped. When receiveq k has no buffer for a
frame, the frame is dropped and counted in receiveq k's ``dropped``, and its
TX buffer is returned all the same, as a NIC (and tun under vhost-net) does:
a driver that stops refilling RX shows on RX, not as a TX queue the device
stopped taking.
Tap: frames go to and come from a tap interface (IFF_TAP | IFF_NO_PI, one fd
per pair with IFF_MULTI_QUEUE); the virtio_net_hdr is stripped on transmit
and synthesised on receive (no offloads are offered).

Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, inspector/datapath/inflight.py):
with an area from SET_INFLIGHT_FD every ring records the heads it holds; a
ring started on an area a crashed back-end left hands those back first.

Faults on purpose (``faults``, inspector/faults.py: ``vqscope serve
--inject``): per vring, ``stall`` (the worker stops serving it, but drains
and counts its kicks and reads avail->idx when kicked: ``notice``) and
``drop-calls`` (the C data path loses due calls). The worker puts each
vring in the state its faults give now, and wakes up when that changes, so
a vring is served again at the end of a stall without a new kick. Without
faults the loops do one list test per burst more.

Events: each started vring has a C event log (``event_capacity`` entries)
that the worker fills with every kick read, call written and call
suppressed; :meth:`NetDevice.drain_events` takes them out. A vring that
stops hands its undrained events to a per-vring pending list, so none are
lost across a stop or restart.
"""

from __future__ import annotations

import os
import struct
import threading

from ..errors import ArgumentError, InspectorError
from ..memory import GuestMemory
from ..spec.virtio import (VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC,
                           VIRTIO_NET_F_MQ,
                           VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
                           VIRTIO_NET_HDR_SIZE, VIRTIO_NET_S_LINK_UP, VIRTIO_RING_F_EVENT_IDX,
                           VIRTIO_RING_F_INDIRECT_DESC, has_feature)
from ..datapath.queue import EVENT_LOG_DEFAULT
from ..faults import NET_FAULTS, Fault, check_vrings
from .base import Device, QueueStats, VringConfig
from .net_worker import _PairWorker
from .tap import open_tap
from .vring import RingTable, StartedRing

DEFAULT_MTU = 1500



def parse_mac(mac: str) -> bytes:
    parts = mac.split(":")
    try:
        b = bytes(int(p, 16) for p in parts)
    except ValueError:
        b = b""
    if len(parts) != 6 or len(b) != 6 or any(len(p) != 2 for p in parts):
        raise InspectorError(f"MAC address {mac!r} is invalid: give six hex bytes like 52:54:00:12:34:57")
    return b


def net_hdr_len(features: int) -> int:
    """§5.1.6.1: the header has num_buffers (12 bytes) with VIRTIO_F_VERSION_1
    or VIRTIO_NET_F_MRG_RXBUF, else 10 bytes."""
    if has_feature(features, VIRTIO_F_VERSION_1) or has_feature(features, VIRTIO_NET_F_MRG_RXBUF):
        return VIRTIO_NET_HDR_MRG_RXBUF_SIZE
    return VIRTIO_NET_HDR_SIZE


class NetDevice(Device):
    """A virtio-net device: ``mode`` "loopback" or "tap" (``tap_name``, None:
    the kernel picks tapN), ``queue_pairs`` RX/TX pairs, ``mac`` in its config.

    Rings: VIRTIO_F_RING_PACKED (§2.8) is offered unless ``packed=False``
    (the driver picks the layout), and VIRTIO_F_IN_ORDER (§2.7.9 / §2.8.8):
    every path uses buffers in the order they were made available (one used
    element or descriptor per chain, which that feature allows).

    Tuning: ``budget`` frames per C call, ``spin`` empty re-polls inside C
    before returning, ``busy_poll_us`` of empty polls before sleeping on
    kicks, ``idle_timeout_ms``: the longest sleep before the worker looks at
    the rings without a kick (None, the default: it sleeps until kicked, as
    a real device does, so a driver's lost kick is not papered over),
    ``cpus`` to pin pair k's worker to ``cpus[k % len(cpus)]``.
    ``event_capacity``: entries of each vring's event log (a power of two;
    0: no events are logged). ``faults``: device faults on purpose
    (inspector/faults.py; ``stall`` and ``drop-calls``), each counted from
    the start of its vring, every time it starts; ArgumentError for a
    driver fault or a vring this device does not have.
    """

    name = "net"
    device_type = "net"
    supports_inflight = True

    def __init__(self, mode: str = "loopback", tap_name: str | None = None, queue_pairs: int = 1,
                 mac: str = "52:54:00:12:34:57", *, budget: int = 256, spin: int = 64,
                 busy_poll_us: float = 200.0, idle_timeout_ms: int | None = None,
                 cpus: list[int] | None = None, event_capacity: int | None = None,
                 faults: list[Fault] | tuple[Fault, ...] = (), packed: bool = True):
        if mode not in ("loopback", "tap"):
            raise InspectorError(f"net mode {mode!r} is invalid: use \"loopback\" or \"tap\"")
        if not 1 <= queue_pairs <= 0x8000:
            raise InspectorError(f"queue_pairs {queue_pairs} is invalid: 1 to 32768 (VIRTIO 1.2 §5.1.4)")
        self.mode = mode
        self.offer_packed = packed
        self.ring_packed = False   # VIRTIO_F_RING_PACKED acked
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        for f in faults:
            if f.kind not in NET_FAULTS:
                raise ArgumentError(f"fault {str(f)!r}: {f.kind} is not a device fault of virtio-net (use one of "
                                    f"{', '.join(NET_FAULTS)})")
        check_vrings(faults, self.num_queues, f"this net device ({queue_pairs} queue pair(s))")
        self.faults = tuple(faults)
        self.mac = parse_mac(mac)
        self.budget, self.spin = budget, spin
        self.busy_poll_us, self.idle_timeout_ms = busy_poll_us, idle_timeout_ms
        self.cpus = list(cpus) if cpus else None
        self.event_capacity = EVENT_LOG_DEFAULT if event_capacity is None else event_capacity
        if self.event_capacity < 0 or self.event_capacity & (self.event_capacity - 1):
            raise InspectorError(f"event_capacity {self.event_capacity} is invalid: give a power of "
                                 f"two, or 0 for no event log")
        self.acked = 0
        self.hdr_len = 10
        self.mrg_rxbuf = False
        self.event_idx = False
        self._lock = threading.Lock()
        self._table = RingTable(self.event_capacity)
        self._rings = self._table.rings
        self._inflight = self._table.inflight
        self._workers: dict[int, _PairWorker] = {}
        self._tap_fds: list[int] = []
        self.tap_name: str | None = None
        if mode == "tap":
            self.tap_name, self._tap_fds = open_tap(tap_name, queue_pairs)

    # --- Device (inspector/devices/base.py) ------------------------------------------
    def features(self) -> int:
        f = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_MAC
             | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC)
        f |= 1 << VIRTIO_F_IN_ORDER
        if self.offer_packed:
            f |= 1 << VIRTIO_F_RING_PACKED
        if self.queue_pairs > 1:
            f |= 1 << VIRTIO_NET_F_MQ
        return f

    def queue_num(self) -> int:
        """Queue pairs: what QEMU and DPDK compare with for virtio-net."""
        return self.queue_pairs

    def set_features(self, features: int) -> None:
        self.acked = features
        self.hdr_len = net_hdr_len(features)
        self.mrg_rxbuf = bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.ring_packed = has_feature(features, VIRTIO_F_RING_PACKED)

    def _config(self) -> bytes:
        # §5.1.4: mac[6], status le16, max_virtqueue_pairs le16, mtu le16.
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, self.queue_pairs, DEFAULT_MTU)

    def get_config(self, offset: int, size: int) -> bytes:
        cfg = self._config()
        out = cfg[offset:offset + size] if 0 <= offset < len(cfg) else b""
        return out + bytes(size - len(out))

    def set_config(self, offset: int, data: bytes) -> None:
        # Only the MAC is driver-writable (legacy drivers without CTRL_MAC_ADDR).
        if 0 <= offset and offset + len(data) <= 6:
            mac = bytearray(self.mac)
            mac[offset:offset + len(data)] = data
            self.mac = bytes(mac)

    def set_inflight(self, area, num_queues: int, queue_size: int) -> None:
        """SET_INFLIGHT_FD's area (inspector/datapath/inflight.py), used by the rings
        started from now on."""
        with self._lock:
            self._table.inflight.set(area, num_queues, queue_size)

    def start_queue(self, vring: VringConfig, mem: GuestMemory) -> None:
        i = vring.index
        if not 0 <= i < self.num_queues:
            raise InspectorError(f"net: vring {i} does not exist: this device has {self.num_queues} "
                                 f"(receiveq/transmitq of {self.queue_pairs} pair(s))")
        with self._lock:
            pair = i // 2
            self._stop_worker(pair)
            try:
                self._table.add(StartedRing(vring, mem, self.event_idx, self.event_capacity,
                                            tuple(f for f in self.faults if f.vring == i),
                                            in_order=has_feature(self.acked, VIRTIO_F_IN_ORDER),
                                            iotlb=self.iotlb))
            finally:
                self._start_worker(pair)

    def stop_queue(self, index: int) -> int:
        with self._lock:
            if index not in self._rings:
                return self._table.last_base(index)
            pair = index // 2
            self._stop_worker(pair)
            last = self._table.remove(index)
            self._start_worker(pair)
            return last

    def queue_stats(self, index: int) -> QueueStats:
        """Counters of vring ``index`` over every start of it; ``dropped``
        for receive vrings (even indices) only; ``inject`` when faults are
        set on it: ``faults`` (their specs), ``active`` (those in force
        now) and ``calls_dropped``."""
        with self._lock:
            tot = self._table.counters(index)
            st = self._table.stats(index, [f for f in self.faults if f.vring == index], tot)
            if index % 2 == 0:
                st.dropped = tot.get("drops", 0)
            return st

    def drain_events(self, index: int) -> tuple[bytearray, int]:
        """Vring ``index``'s events since the previous drain, oldest first, as
        packed records (inspector/devices/base.py), and the events its logs
        lost so far (cumulative). Safe while the worker runs."""
        with self._lock:
            return self._table.drain_events(index)

    def close(self) -> None:
        with self._lock:
            for pair in list(self._workers):
                self._stop_worker(pair)
            self._table.close()
            for fd in self._tap_fds:
                os.close(fd)
            self._tap_fds = []

    # --- helpers (called with the lock held) ----------------------------------------------
    def _stop_worker(self, pair: int) -> None:
        w = self._workers.pop(pair, None)
        if w is not None:
            w.stop()

    def _start_worker(self, pair: int) -> None:
        rx, tx = self._rings.get(2 * pair), self._rings.get(2 * pair + 1)
        if rx is None and tx is None:
            return
        if self.mode == "loopback" and (rx is None or tx is None):
            return  # nothing to do until both halves run
        w = _PairWorker(self, pair, rx, tx)
        self._workers[pair] = w
        w.start()


__all__ = ["NetDevice", "open_tap", "net_hdr_len", "parse_mac"]
