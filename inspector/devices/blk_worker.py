"""The virtio-blk device's data path thread (inspector/devices/blk.py has the
device itself): :class:`_QueueWorker`, one thread per started requestq,
calls the C engine (inspector/datapath/blk.py ``BlkQueue.run``, which
services the ring and the disk I/O without the GIL and sleeps on the kick
eventfd, I/O completions and a wake eventfd) in a loop. Between two calls
it puts the queue in the state its faults on purpose give now (``hold-io``:
BlkQueue.set_hold; ``drop-calls``: DeviceQueue.fault) and wakes up when
that changes; :meth:`_QueueWorker.stop` writes the wake eventfd.
"""

from __future__ import annotations

import logging
import os
import select
import time
from typing import TYPE_CHECKING, Callable

from ..datapath.iotlb import MISS_RESEND_S
from ..errors import RingError
from .vring import RingWorker, StartedRing, fault_bits, report_broken

if TYPE_CHECKING:
    from ..datapath.blk import BlkQueue

logger = logging.getLogger("inspector.devices.blk")


class _QueueWorker(RingWorker):
    """Services requestq ``ring`` through ``engine`` until stop().
    ``on_needs_reset``: the device's hook, called when the ring breaks."""

    def __init__(self, ring: StartedRing, engine: "BlkQueue", on_needs_reset: Callable[[str], None] | None):
        super().__init__(f"vqscope-blk-q{ring.index}")
        self.ring = ring
        self.engine = engine
        self.on_needs_reset = on_needs_reset
        self._hold = False

    def _sleep(self, timeout_ms: int) -> None:
        """Sleep on the wake eventfd (stop(), an IOTLB UPDATE) at most ``timeout_ms``."""
        p = select.poll()
        p.register(self._wake_fd, select.POLLIN)
        if p.poll(timeout_ms):
            try:
                os.eventfd_read(self._wake_fd)
            except OSError:
                pass

    def _apply_faults(self) -> int:
        """Put the queue in its faults' state now; the ms until that may
        change (-1: never)."""
        ring = self.ring
        kinds, wake = ring.active_faults(time.monotonic())
        mask = fault_bits(kinds)
        hold = "hold-io" in kinds
        if hold != self._hold or mask != ring.q.fault:
            logger.info("blk: vring %d: faults on purpose in force now: %s", ring.index,
                        ", ".join(kinds) or "none")
            self.engine.set_hold(hold)
            ring.q.fault = mask
            self._hold = hold
        return -1 if wake is None else int(wake * 1000) + 1

    def run(self) -> None:
        ring = self.ring
        iot = [ring] if ring.q.iotlb is not None else []
        self.watch_iotlb(iot)
        try:
            while not self._stopping:
                timeout = self._apply_faults() if ring.faults else -1
                if iot and self.iotlb_waiting(iot):
                    # The next request waits for an IOTLB UPDATE (its miss was
                    # sent): sleep until the UPDATE wakes us, or ask again.
                    wait = int(MISS_RESEND_S * 1000)
                    self._sleep(wait if timeout < 0 else min(timeout, wait))
                    continue
                self.engine.run(self._wake_fd, timeout)
                if ring.q.broken:
                    raise RingError(ring.q.broken)
        except RingError as e:
            report_broken([ring], "blk", e, logger, self.on_needs_reset)
        except Exception:
            logger.exception("blk: vring %d: worker failed", ring.index)
