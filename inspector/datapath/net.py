"""virtio-net's fast paths in C (csrc/vqd_net.c, VIRTIO 1.2 §5.1.6): move
frames between a TX and an RX :class:`~inspector.datapath.queue.DeviceQueue`
(loopback, MACs swapped) or between a queue and a tap fd, a burst per call,
without the GIL. Statuses become exceptions as in :mod:`.queue`; a tap
failure is an OSError with the tap's errno."""

from __future__ import annotations

from .._cffi import check, ffi, lib
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


def _net_check(rc: int, s: NetScratch, what: str, *queues: DeviceQueue) -> int:
    """``rc`` of a net path, or its exception through :func:`inspector._cffi.check`
    (the reason of the first broken queue of the call; the tap's errno for
    VQD_E_IO)."""
    if rc >= 0:
        return rc
    broken = next((q.broken for q in queues if q.broken), None)
    return check(rc, what, broken, err=s.s.err)


def net_loopback(tx: DeviceQueue, rx: DeviceQueue, scratch: NetScratch, hdr_len: int,
                 mrg_rxbuf: bool, budget: int = 256, spin: int = 0) -> int:
    """Move up to ``budget`` frames from ``tx`` to ``rx`` with MACs swapped,
    in batches of up to 32 (each published, and the driver called if it
    wants, before waiting for the next). When ``tx`` runs dry, up to ``spin``
    empty polls (each a CPU pause) before returning; 0 returns at once."""
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
