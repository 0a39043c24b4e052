"""The virtio-net driver half of the built-in vhost-user front-end: what a
guest's virtio-net driver does with the rings once the handshake is done
(VIRTIO 1.2 §5.1.6): post RX buffers, send TX frames with a
``virtio_net_hdr``, kick honouring notification suppression (§2.7.10,
§2.7.7), collect used buffers and calls; and faults on purpose: hostile
rings and shrinking memory (:meth:`VirtioNetDriver.write_hostile`,
:meth:`VirtioNetDriver.shrink_memory`) to test a back-end's robustness, and
the driver faults of inspector/faults.py (``withhold-kicks``,
``stop-consuming``: :meth:`VirtioNetDriver.set_faults`) that imitate a stuck
or buggy driver.

:class:`VirtioNetDriver` is a mixin of :class:`~.frontend.VhostUserFrontend`,
which owns the memory, the vrings (``queues``: one ``DriverQueue`` per vring with
its :class:`~inspector.ring.driver.DriverRing` and eventfds) and the
negotiated ``features``; the split keeps the protocol (handshake, messages,
reconnect) apart from the driver. What any device's driver does with its
vrings (kick, publish, collect used, wait for calls, driver faults) is
:class:`~.driver_queue.QueueDriver`'s.

Each vring is split (:class:`~inspector.ring.driver.DriverRing`, §2.7) or
packed (:class:`~inspector.ring.driver_packed.PackedDriverRing`, §2.8) as
VIRTIO_F_RING_PACKED was negotiated; both rings have the same driver
operations (add_chain, publish, get_used, num_free), and the notification
decisions, which differ, are taken here for each.
"""

from __future__ import annotations

import os
import struct
import time

from ..errors import InspectorError, ProtocolError
from ..ring.driver_packed import HOSTILE_PACKED
from ..ring.anomalies import AnomalyKind
from ..spec.virtio import (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_MRG_RXBUF_SIZE,
                           VIRTIO_NET_HDR_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                           has_feature)
from .driver_queue import DriverQueue, QueueDriver

_NET_HDR_V1 = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers

#: Ring violations :meth:`VhostUserFrontend.write_hostile` can write, and the
#: decoder's anomaly kind each shows as.
HOSTILE_KINDS = {
    "loop": AnomalyKind.LOOP,                             # §2.7.5.2: a chain longer than the table
    "head_out_of_range": AnomalyKind.HEAD_OUT_OF_RANGE,   # §2.7.6: avail->ring[] head >= size
    "next_out_of_range": AnomalyKind.NEXT_OUT_OF_RANGE,   # §2.7.5: next >= size
    "nested_indirect": AnomalyKind.NESTED_INDIRECT,       # §2.7.5.3.1: INDIRECT inside a table
    "indirect_loop": AnomalyKind.LOOP,                    # a loop inside an indirect table
    "addr_out_of_range": AnomalyKind.ADDR_OUT_OF_RANGE,   # §2.7.5: a buffer outside guest memory
    "avail_idx_jump": AnomalyKind.AVAIL_IDX_JUMP,         # §2.7.6: avail->idx > size ahead
    "zero_len": AnomalyKind.ZERO_LEN,                     # a descriptor of length 0
}

#: The same for a packed vring: the violations PackedDriverRing.add_hostile
#: writes (inspector.ring.driver_packed.HOSTILE_PACKED, with each one's rule),
#: named as the packed decoders' anomaly kind each shows as.
HOSTILE_PACKED_KINDS = {kind.value: kind for kind in HOSTILE_PACKED}


class VirtioNetDriver(QueueDriver):
    """The virtio-net driver methods of the built-in front-end (a mixin: see
    the module docstring for what the front-end provides). Vring ``2p`` is
    pair ``p``'s RX queue, ``2p+1`` its TX queue. Buffer addresses go on the
    rings as ``dma_addr`` gives them (IOVAs behind an IOMMU); the hostile
    chains of :meth:`write_hostile` keep guest-physical ones."""

    # --- virtio-net driver ---------------------------------------------------------------------
    @property
    def net_hdr_len(self) -> int:
        """12 with VERSION_1 or MRG_RXBUF (virtio_net_hdr_v1 /
        _mrg_rxbuf), else 10 (VIRTIO 1.2 §5.1.6)."""
        return (VIRTIO_NET_HDR_MRG_RXBUF_SIZE if has_feature(self.features, VIRTIO_F_VERSION_1)
                or has_feature(self.features, VIRTIO_NET_F_MRG_RXBUF) else VIRTIO_NET_HDR_SIZE)

    def rx(self, pair: int) -> DriverQueue:
        return self.queues[2 * pair]

    def tx(self, pair: int) -> DriverQueue:
        return self.queues[2 * pair + 1]

    def post_rx_buffers(self, pair: int, n: int, buf_len: int = 2048) -> int:
        """Make ``n`` device-writable buffers of ``buf_len`` bytes available on
        the RX vring of ``pair``; returns how many were posted."""
        if buf_len > self.slot_size:
            raise InspectorError(f"buf_len {buf_len} exceeds the slot size {self.slot_size}")
        q = self.rx(pair)
        if q.fault_on("stop-consuming"):
            return 0  # a stuck driver refills nothing
        posted = 0
        for _ in range(n):
            if q.ring.num_free == 0 or not self.free_slots:
                break
            slot = self._alloc_slot()
            head = q.ring.add_chain([(self.dma_addr(self._slot_gpa(slot), True), buf_len, True)])
            q.slots[head] = slot
            posted += 1
        if posted:
            q.ring.publish()
            self.kick(q)
        return posted

    def send_frames(self, pair: int, frames: list[bytes], publish: bool = True) -> int:
        """Put ``frames`` on the TX vring of ``pair``, each behind a zeroed
        virtio-net header, publish and kick if needed; returns how many fit.
        ``publish=False`` writes them but leaves avail->idx alone (see
        :meth:`publish`)."""
        q = self.tx(pair)
        hlen = self.net_hdr_len
        sent = 0
        for frame in frames:
            if hlen + len(frame) > self.slot_size:
                raise InspectorError(f"frame of {len(frame)} bytes does not fit a {self.slot_size}-byte slot")
            if q.ring.num_free == 0 or not self.free_slots:
                break
            slot = self._alloc_slot()
            gpa = self._slot_gpa(slot)
            view = self.mem.view(gpa, hlen + len(frame))
            view[:hlen] = bytes(hlen)
            view[hlen:] = frame
            head = q.ring.add_chain([(self.dma_addr(gpa, False), hlen + len(frame), False)])
            q.slots[head] = slot
            sent += 1
        if sent and publish:
            q.ring.publish()
            self.kick(q)
        return sent

    # --- faults on purpose --------------------------------------------------------------------
    def write_hostile(self, index: int, kind: str) -> int:
        """Make one ring violation of ``kind`` (a key of HOSTILE_KINDS)
        available on vring ``index`` (TX vrings are odd) after what is there,
        publish it and kick. The chain uses free descriptors and frame slots
        of this front-end; the device is expected to break the queue, so they
        are never reclaimed. Returns the head (or the slot for
        ``avail_idx_jump``). A packed vring takes the kinds of
        HOSTILE_PACKED_KINDS instead."""
        q = self.queues[index]
        if q.packed:
            return self._write_hostile_packed(q, kind)
        if kind not in HOSTILE_KINDS:
            raise InspectorError(f"hostile ring kind {kind!r} is unknown: use one of {sorted(HOSTILE_KINDS)}")
        ring = q.ring
        hlen = self.net_hdr_len
        slot = self._alloc_slot()
        gpa = self._slot_gpa(slot)
        self.mem.view(gpa, 64)[:] = bytes(64)
        writable = index % 2 == 0
        n = ring.size
        if kind == "avail_idx_jump":
            ring.set_avail_idx(ring.avail_idx + n + 1)  # §2.7.6: at most Queue Size ahead
            os.eventfd_write(q.kick_fd, 1)
            return slot
        if kind in ("nested_indirect", "indirect_loop"):
            # Two entries: entry 0 chains to entry 1, which is either an
            # INDIRECT descriptor (§2.7.5.3.1) or chains back to entry 0.
            table = gpa + 64 if self.slot_size >= 128 else gpa
            head = ring.add_indirect_chain(table, [(gpa, hlen + 32, writable)] * 2)
            t = self.mem.view(table + 16, 16)
            if kind == "nested_indirect":
                struct.pack_into("<QIHH", t, 0, table, 32, VRING_DESC_F_INDIRECT, 0)
            else:
                struct.pack_into("<QIHH", t, 0, gpa, 32,
                                 VRING_DESC_F_NEXT | (VRING_DESC_F_WRITE if writable else 0), 0)
        elif kind == "addr_out_of_range":
            head = ring.add_chain([(self.mem_size + 0x1000, hlen + 32, writable)])
        elif kind == "zero_len":
            head = ring.add_chain([(gpa, hlen, writable), (gpa + hlen, 0, writable)])
        else:
            head = ring.add_chain([(gpa, hlen, writable), (gpa + hlen, 32, writable)])
            a, length, flags, nxt = ring.read_desc(head)
            if kind == "loop":      # the second descriptor chains back to the head
                a2, l2, f2, _ = ring.read_desc(nxt)
                ring.write_desc(nxt, a2, l2, f2 | VRING_DESC_F_NEXT, head)
            elif kind == "next_out_of_range":
                ring.write_desc(head, a, length, flags, n)
            elif kind == "head_out_of_range":
                ring.set_avail_ring((ring.avail_idx - 1) % n, n)
        q.slots[head] = slot
        self.publish(index, force_kick=True)
        return head

    def _write_hostile_packed(self, q: DriverQueue, kind: str) -> int:
        """write_hostile on a packed vring: one violation of ``kind`` (a key
        of HOSTILE_PACKED_KINDS) written by PackedDriverRing.add_hostile.
        ``chain_too_long`` fills the whole ring, so on a TX vring the buffers
        the device returned are reclaimed first (for up to a second); on a
        vring with buffers still posted it raises InspectorError. Returns the
        buffer id."""
        if kind not in HOSTILE_PACKED_KINDS:
            raise InspectorError(f"hostile packed ring kind {kind!r} is unknown: use one of "
                                 f"{sorted(HOSTILE_PACKED_KINDS)}")
        ring = q.ring
        anomaly = HOSTILE_PACKED_KINDS[kind]
        if anomaly is AnomalyKind.CHAIN_TOO_LONG and q.index % 2:
            deadline = time.monotonic() + 1.0
            while ring.num_free < ring.size and time.monotonic() < deadline:
                if not self.poll_tx_done(q.index // 2):
                    time.sleep(0.01)
        slot = self._alloc_slot()
        gpa = self._slot_gpa(slot)
        self.mem.view(gpa, 64)[:] = bytes(64)
        table = gpa + 64 if self.slot_size >= 128 else gpa
        bid = ring.add_hostile(anomaly, (gpa, self.net_hdr_len + 32, q.index % 2 == 0), table_addr=table,
                               mem_end=self.mem_size)
        q.slots[bid] = slot
        self.publish(q.index, force_kick=True)
        return bid

    def shrink_memory(self, size: int) -> None:
        """ftruncate the memfd behind the memory table to ``size`` bytes
        while the back-end has it mapped: its accesses past ``size`` now
        fault (SIGBUS). So do this front-end's own: touch nothing there."""
        os.ftruncate(self.memfd, size)

    def poll_tx_done(self, pair: int) -> int:
        """Reclaim the TX buffers the device returned; returns how many."""
        done = self._collect(self.tx(pair))
        for _, _, slot in done:
            self.free_slots.append(slot)
        return len(done)

    def recv_frames(self, pair: int) -> list[bytes]:
        """Frames the device wrote into RX buffers, without the virtio-net
        header. With MRG_RXBUF a frame spans ``num_buffers`` used buffers."""
        done = self._collect(self.rx(pair))
        hlen = self.net_hdr_len
        mrg = has_feature(self.features, VIRTIO_NET_F_MRG_RXBUF)
        frames = []
        i = 0
        try:
            while i < len(done):
                _, length, slot = done[i]
                data = self.mem.read(self._slot_gpa(slot), min(length, self.slot_size))
                if length < hlen:
                    raise ProtocolError(f"RX used length {length} is shorter than the "
                                        f"{hlen}-byte virtio-net header")
                nbufs = _NET_HDR_V1.unpack_from(data)[6] if mrg else 1
                parts = [data[hlen:]]
                for k in range(1, max(nbufs, 1)):
                    if i + k >= len(done):
                        raise ProtocolError(f"RX frame announces num_buffers={nbufs}, "
                                            f"only {len(done) - i} used")
                    _, ln, sl = done[i + k]
                    parts.append(self.mem.read(self._slot_gpa(sl), min(ln, self.slot_size)))
                frames.append(b"".join(parts))
                i += max(nbufs, 1)
        finally:
            for _, _, slot in done:
                self.free_slots.append(slot)
        return frames

    def wait_call(self, pair: int, timeout: float = 1.0, which: str = "any") -> bool:
        """Wait up to ``timeout`` s for a call on the pair's RX, TX or either
        vring; drains the eventfd(s). True when a call came. A vring under
        ``stop-consuming`` is not listened to (its calls stay unread)."""
        qs = {"rx": [self.rx(pair)], "tx": [self.tx(pair)], "any": [self.rx(pair), self.tx(pair)]}[which]
        return bool(self.wait_calls(qs, timeout))
