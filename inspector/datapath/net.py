"""virtio-net's fast paths in C (csrc/vqd_net.c, VIRTIO 1.2 §5.1.6): move
frames between a TX and an RX :class:`~inspector.datapath.queue.DeviceQueue`
(loopback, MACs swapped) or between a queue and a tap fd, a burst per call,
without the GIL. Statuses become exceptions as in :mod:`.queue`; a tap
failure is an OSError with the tap's errno."""

from __future__ import annotations

import os

from .._cffi import check, ffi, lib
from ..errors import RingError
from .queue import DeviceQueue

#: The iovecs one scratch holds per chain.
VQD_NET_IOV = lib.VQD_NET_IOV


class NetScratch:
    """Per-worker scratch of the net fast paths (iovecs and a frame buffer)."""

    def __init__(self):
        self.s = ffi.new("struct vqd_net_scratch *")

    @property
    def rx_starved(self) -> bool:
        return bool(self.s.rx_starved)

    @property
    def tx_blocked(self) -> bool:
        return bool(self.s.tx_blocked)


def _net_check(rc: int, s, what: str, *queues) -> int:
    if rc >= 0:
        return rc
    if rc == lib.VQD_E_IO:
        raise OSError(s.s.err, f"{what}: {os.strerror(s.s.err)}")
    for q in queues:
        if q is not None and q.broken:
            raise RingError(f"{what}: queue is broken: {q.broken}")
    return check(rc, what)


def net_loopback(tx: DeviceQueue, rx: DeviceQueue, scratch: NetScratch, hdr_len: int,
                 mrg_rxbuf: bool, budget: int = 256, spin: int = 0) -> int:
    """Move up to ``budget`` frames from ``tx`` to ``rx`` with MACs swapped."""
    rc = lib.vqd_net_loopback(tx.vq, rx.vq, hdr_len, 1 if mrg_rxbuf else 0, budget, spin,
                                  scratch.s)
    return _net_check(rc, scratch, "net loopback", tx, rx)


def net_tap_tx(tx: DeviceQueue, tap_fd: int, scratch: NetScratch, hdr_len: int,
               budget: int = 256) -> int:
    rc = lib.vqd_net_tap_tx(tx.vq, tap_fd, hdr_len, budget, scratch.s)
    return _net_check(rc, scratch, "tap transmit", tx)


def net_tap_rx(rx: DeviceQueue, tap_fd: int, scratch: NetScratch, hdr_len: int,
               mrg_rxbuf: bool, budget: int = 256) -> int:
    rc = lib.vqd_net_tap_rx(rx.vq, tap_fd, hdr_len, 1 if mrg_rxbuf else 0, budget, scratch.s)
    return _net_check(rc, scratch, "tap receive", rx)
