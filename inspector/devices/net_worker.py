"""The virtio-net device's data path threads (inspector/devices/net.py has
the device itself: features, config space, the Device contract, stats and
events): :class:`_PairWorker`, the thread per queue pair that runs the
C fast paths and sleeps on the kick eventfds. How the worker polls, sleeps
and applies faults is in net.py's module docstring.
"""

from __future__ import annotations

import logging
import os
import select
import time
from typing import TYPE_CHECKING

from ..datapath.iotlb import MISS_RESEND_S
from ..datapath.net import NetScratch, net_loopback, net_tap_rx, net_tap_tx
from ..datapath.queue import FAULT_STALL
from ..errors import RingError
from .vring import FAULT_BITS, RingWorker, StartedRing, report_broken

if TYPE_CHECKING:
    from .net import NetDevice

logger = logging.getLogger("inspector.devices.net")

#: How often a stalled vring without a kick eventfd (a polling front-end) looks at avail->idx.
_STALLED_POLL_MS = 10
#: The longest sleep of a pair whose vrings wait for IOTLB UPDATEs (then the misses are asked again).
_MISS_WAIT_MS = int(MISS_RESEND_S * 1000)


class _PairWorker(RingWorker):
    """Services receiveq/transmitq of one pair until stop()."""

    def __init__(self, dev: "NetDevice", pair: int, rx: StartedRing | None, tx: StartedRing | None):
        super().__init__(f"vqscope-net-pair{pair}")
        self.dev = dev
        self.pair = pair
        self.rx = rx
        self.tx = tx
        self.tap_fd = dev._tap_fds[pair] if dev._tap_fds else -1

    def run(self) -> None:
        cpus = self.dev.cpus
        if cpus:
            try:
                os.sched_setaffinity(0, {cpus[self.pair % len(cpus)]})
            except OSError as e:
                logger.warning("net pair %d: cannot pin to CPU %s: %s", self.pair,
                               cpus[self.pair % len(cpus)], e)
        try:
            if self.dev.mode == "loopback":
                self._run_loopback()
            else:
                self._run_tap()
        except RingError as e:
            # One line per broken pair; the snapshot shows each queue's reason
            # (queue_broken), the front-end gets SET_VRING_ERR and, through the
            # back-end core, DEVICE_NEEDS_RESET.
            report_broken([self.rx, self.tx], f"net pair {self.pair}", e, logger, self.dev.on_needs_reset)
        except OSError as e:
            logger.error("net pair %d: tap I/O failed: %s; the pair is no longer serviced", self.pair, e)
        except Exception:
            logger.exception("net pair %d: worker failed", self.pair)

    def _broke(self, rings: list[StartedRing], error: RingError) -> None:
        """``rings`` broke while the pair's other vring goes on: SET_VRING_ERR,
        one log line, the device's needs-reset hook (report_broken)."""
        report_broken(rings, f"net pair {self.pair}", error, logger, self.dev.on_needs_reset)

    def _iotlb_rings(self) -> list[StartedRing]:
        """This pair's rings that translate through an IOTLB (registered for its wake-ups)."""
        rings = [r for r in (self.rx, self.tx) if r is not None and r.q.iotlb is not None]
        self.watch_iotlb(rings)
        return rings

    # --- waiting ---------------------------------------------------------------------
    def _wait(self, fds: list[tuple[int, int]], timeout_ms: int) -> None:
        want: dict[int, int] = {self._wake_fd: select.POLLIN}
        for fd, ev in fds:
            if fd >= 0:
                want[fd] = want.get(fd, 0) | ev
        p = select.poll()
        for fd, ev in want.items():
            p.register(fd, ev)
        try:
            p.poll(timeout_ms)
        except InterruptedError:
            pass
        try:
            os.eventfd_read(self._wake_fd)   # an IOTLB UPDATE's wake-up is consumed here
        except (BlockingIOError, OSError):
            pass

    def _sleep_on(self, q, kick_fd: int, extra: list[tuple[int, int]], timeout_ms: int) -> None:
        """Enable kicks on ``q``, re-check, block (also on ``extra``) at most
        ``timeout_ms``, disable kicks again."""
        q.drain_kick()
        pending = q.set_notification(True)
        try:
            if pending:
                return  # the driver added buffers before it saw kicks enabled
            if kick_fd < 0:  # polling front-end (no kick fd): nap
                self._wait(extra, 1)
            else:
                self._wait([(kick_fd, select.POLLIN)] + extra, timeout_ms)
            q.drain_kick()
        finally:
            q.set_notification(False)

    # --- faults on purpose (inspector/faults.py) ------------------------------------------
    def _apply_faults(self, rings: list[StartedRing], now: float) -> float | None:
        """Put each of ``rings`` in the fault state its faults give at
        ``now``: a vring that starts stalling notices what is there and asks
        for kicks (DeviceQueue.notice); one that stops goes back to the
        worker's polling (kicks disabled), which serves what is pending.
        Returns the seconds until the next change (None: none)."""
        wake = None
        for r in rings:
            mask, nxt = r.fault_mask(now)
            if nxt is not None and (wake is None or nxt < wake):
                wake = nxt
            old = r.q.fault
            if mask == old:
                continue
            r.q.fault = mask
            names = [k for k, bit in FAULT_BITS.items() if mask & bit]
            logger.info("net pair %d: vring %d: faults on purpose in force now: %s", self.pair, r.index,
                        ", ".join(names) or "none")
            if mask & FAULT_STALL and not old & FAULT_STALL:
                r.q.notice()
            elif old & FAULT_STALL and not mask & FAULT_STALL:
                r.q.set_notification(False)
        return wake

    def _notice_stalled(self, rings: list[StartedRing]) -> list[tuple[int, int]]:
        """A stalled vring that was kicked reads avail->idx and asks for the
        next kick (its kicks counted and logged as ever); returns the kick
        fds of the stalled vrings, to wait on."""
        fds = []
        for r in rings:
            if r.q.fault & FAULT_STALL:
                if r.kick_fd < 0 or r.q.drain_kick():
                    r.q.notice()
                fds.append((r.kick_fd, select.POLLIN))
        return fds

    def _timeout_ms(self, wake: float | None, fds: list[tuple[int, int]] = ()) -> int:
        """The idle wait for poll(): ``idle_timeout_ms`` (-1: until woken),
        shortened to wake up when a fault changes (``wake`` seconds) or to
        poll a stalled vring that has no kick fd."""
        limits = [t for t in (self.dev.idle_timeout_ms,) if t is not None and t >= 0]
        if wake is not None:
            limits.append(int(wake * 1000) + 1)
        if any(fd < 0 for fd, _ in fds):
            limits.append(_STALLED_POLL_MS)
        return min(limits) if limits else -1

    # --- loops -------------------------------------------------------------------------
    def _run_loopback(self) -> None:
        dev, txq, rxq = self.dev, self.tx.q, self.rx.q
        s = NetScratch()
        hdr, mrg = dev.hdr_len, dev.mrg_rxbuf
        budget, spin, busy = dev.budget, dev.spin, dev.busy_poll_us / 1e6
        faulty = [r for r in (self.rx, self.tx) if r.faults]
        iot = self._iotlb_rings()
        txq.set_notification(False)
        rxq.set_notification(False)
        idle_since = None
        wake = None
        stalled: list[tuple[int, int]] = []
        clock = time.monotonic
        while not self._stopping:
            if faulty:
                wake = self._apply_faults(faulty, clock())
                stalled = self._notice_stalled(faulty)
                if txq.fault & FAULT_STALL:  # loopback: no TX, no work
                    self._wait(stalled, self._timeout_ms(wake, stalled))
                    continue
            moved = net_loopback(txq, rxq, s, hdr, mrg, budget, spin)
            if rxq.broken and not self.rx.reported_broken:
                # RX broke alone (its reason latched): TX goes on, its frames lost on RX
                self._broke([self.rx], RingError(rxq.broken))
            if moved:
                idle_since = None
                if iot:
                    self.iotlb_waiting(iot)
                continue
            if iot and self.iotlb_waiting(iot):
                # A chain waits for an IOTLB UPDATE (its miss was sent): the
                # UPDATE wakes us; ask again after MISS_RESEND_S.
                self._wait(stalled, _MISS_WAIT_MS)
                idle_since = None
                continue
            # Idle. RX without buffers is no reason to wait: such frames are dropped.
            now = clock()
            if idle_since is None:
                idle_since = now
            elif now - idle_since >= busy:
                self._sleep_on(txq, self.tx.kick_fd, stalled, self._timeout_ms(wake, stalled))
                idle_since = None

    def _run_tap(self) -> None:
        dev, tap = self.dev, self.tap_fd
        txq = self.tx.q if self.tx else None
        rxq = self.rx.q if self.rx else None
        s = NetScratch()
        hdr, mrg, budget, busy = dev.hdr_len, dev.mrg_rxbuf, dev.budget, dev.busy_poll_us / 1e6
        faulty = [r for r in (self.rx, self.tx) if r is not None and r.faults]
        iot = self._iotlb_rings()
        for q in (txq, rxq):
            if q is not None:
                q.set_notification(False)
        idle_since = None
        wake = None
        stalled: list[tuple[int, int]] = []
        clock = time.monotonic
        while not self._stopping:
            tx_on = txq is not None
            if faulty:
                wake = self._apply_faults(faulty, clock())
                stalled = self._notice_stalled(faulty)
                tx_on = tx_on and not txq.fault & FAULT_STALL
            n = 0
            try:
                if tx_on:
                    n += net_tap_tx(txq, tap, s, hdr, budget)
                if rxq is not None:
                    n += net_tap_rx(rxq, tap, s, hdr, mrg, budget)   # a stalled RX drops what it reads
            except RingError as e:
                # One vring broke: it is reported and no longer serviced; the other goes on.
                for r in (self.rx, self.tx):
                    if r is not None and r.q.broken and not r.reported_broken:
                        self._broke([r], e)
                txq = None if txq is None or txq.broken else txq
                rxq = None if rxq is None or rxq.broken else rxq
                if txq is None and rxq is None:
                    return
                iot = [r for r in iot if not r.q.broken]
                continue
            waiting = self.iotlb_waiting(iot) if iot else ()
            if n:
                idle_since = None
                continue
            if waiting:
                # A chain waits for an IOTLB UPDATE (its miss was sent): the
                # UPDATE wakes us; the other vring of the pair is looked at
                # again every 10 ms meanwhile.
                self._wait(stalled, 10 if len(waiting) < len(iot) else _MISS_WAIT_MS)
                idle_since = None
                continue
            now = clock()
            if idle_since is None:
                idle_since = now
                continue
            if now - idle_since < busy:
                continue
            idle_since = None
            self._tap_sleep(txq if tx_on else None, rxq, s, stalled, self._timeout_ms(wake, stalled))

    def _tap_sleep(self, txq, rxq, s, extra: list[tuple[int, int]], timeout: int) -> None:
        """Enable kicks where we wait for the driver, re-check, block on
        kicks, the tap and ``extra`` at most ``timeout`` ms, then disable
        kicks again. ``txq`` None: TX is not served now (absent, or stalled)."""
        waits: list[tuple[int, int]] = list(extra)
        enabled = []
        try:
            if txq is not None and not s.tx_blocked:
                txq.drain_kick()
                enabled.append(txq)
                if txq.set_notification(True):
                    return  # TX buffers arrived before the driver saw kicks enabled
                waits.append((self.tx.kick_fd, select.POLLIN))
            if txq is not None and s.tx_blocked:
                waits.append((self.tap_fd, select.POLLOUT))
            if rxq is not None:
                if s.rx_starved:
                    rxq.drain_kick()
                    enabled.append(rxq)
                    if rxq.set_notification(True):
                        timeout = 1  # buffers, but too few for the pending frame
                    waits.append((self.rx.kick_fd, select.POLLIN))
                else:
                    waits.append((self.tap_fd, select.POLLIN))
            if any(fd < 0 for fd, _ in waits[len(extra):]):
                timeout = 1  # a polling front-end without kick fds
            self._wait(waits, timeout)
        finally:
            for q in enabled:
                q.drain_kick()
                q.set_notification(False)
