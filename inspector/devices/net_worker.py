"""The virtio-net device's data path threads (inspector/devices/net.py has
the device itself: features, config space, the Device contract, stats and
events): :class:`_Ring`, a started vring (its DeviceQueue, eventfds and
faults), and :class:`_PairWorker`, the thread per queue pair that runs the
C fast paths and sleeps on the kick eventfds. How the worker polls, sleeps
and applies faults is in net.py's module docstring.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING

from ..datapath.net import NetScratch, net_loopback, net_tap_rx, net_tap_tx
from ..datapath.packed_queue import PackedDeviceQueue, decode_vring_base
from ..datapath.queue import FAULT_DROP_CALLS, FAULT_STALL, DeviceQueue
from ..errors import RingError
from ..faults import Fault
from ..memory import GuestMemory
from .base import VringConfig

if TYPE_CHECKING:
    from .net import NetDevice

logger = logging.getLogger("inspector.devices.net")

#: DeviceQueue.fault bit of each device fault kind.
_FAULT_BITS = {"stall": FAULT_STALL, "drop-calls": FAULT_DROP_CALLS}
#: How often a stalled vring without a kick eventfd (a polling front-end) looks at avail->idx.
_STALLED_POLL_MS = 10


def _dup(fd: int | None, nonblocking: bool = False) -> int:
    if fd is None or fd < 0:
        return -1
    d = os.dup(fd)
    if nonblocking:
        os.set_blocking(d, False)
    return d


class _Ring:
    """A started vring: the C queue (DeviceQueue, or PackedDeviceQueue when
    ``vring.packed``; ``in_order``: VIRTIO_F_IN_ORDER negotiated, which a
    packed ring uses to write one used descriptor per run of transmit
    buffers, §2.8.8) and the fds it keeps (dup'ed: ours), its ``faults``
    and when it ``started`` (time.monotonic(): faults count from there)."""

    def __init__(self, vring: VringConfig, mem: GuestMemory, event_idx: bool, event_capacity: int,
                 faults: tuple[Fault, ...] = (), in_order: bool = False):
        self.index = vring.index
        self.faults = faults
        self.started = time.monotonic()
        self.kick_fd = _dup(vring.kick_fd, nonblocking=True)
        self.call_fd = _dup(vring.call_fd)
        self.err_fd = _dup(vring.err_fd)
        try:
            # Zero-sized buffers break the queue, as in QEMU's virtio-net.
            common = dict(event_idx=event_idx, call_fd=self.call_fd, kick_fd=self.kick_fd,
                          event_capacity=event_capacity, reject_zero_len=True)
            if vring.packed:
                avail, avail_wrap, used, used_wrap = decode_vring_base(vring.base)
                self.q = PackedDeviceQueue(mem, vring.num, vring.desc_uva, vring.avail_uva, vring.used_uva,
                                           last_avail_idx=avail, avail_wrap_counter=avail_wrap,
                                           next_used=used, used_wrap_counter=used_wrap,
                                           in_order=in_order, **common)
            else:
                self.q = DeviceQueue(mem, vring.num, vring.desc_uva, vring.avail_uva, vring.used_uva,
                                     last_avail_idx=vring.base, **common)
        except BaseException:
            self._close_fds()
            raise
        self.reported_broken = False

    def fault_mask(self, now: float) -> tuple[int, float | None]:
        """The DeviceQueue.fault mask the faults give at ``now``
        (time.monotonic()) and the seconds until it may change (None:
        never)."""
        elapsed, mask, wake = now - self.started, 0, None
        for f in self.faults:
            if f.active(elapsed):
                mask |= _FAULT_BITS[f.kind]
            nxt = f.next_change(elapsed)
            if nxt is not None and (wake is None or nxt < wake):
                wake = nxt
        return mask, wake

    def signal_error(self) -> None:
        """vhost-user SET_VRING_ERR: tell the front-end this ring failed."""
        if self.err_fd >= 0:
            try:
                os.eventfd_write(self.err_fd, 1)
            except OSError:
                pass

    def _close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = self.err_fd = -1

    def close(self) -> None:
        self.q.release()
        self._close_fds()


class _PairWorker(threading.Thread):
    """Services receiveq/transmitq of one pair until stop()."""

    def __init__(self, dev: "NetDevice", pair: int, rx: _Ring | None, tx: _Ring | None):
        super().__init__(name=f"vqscope-net-pair{pair}", daemon=True)
        self.dev = dev
        self.pair = pair
        self.rx = rx
        self.tx = tx
        self.tap_fd = dev._tap_fds[pair] if dev._tap_fds else -1
        self._stopping = False
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        if self.is_alive() and self is not threading.current_thread():
            self.join()
        os.close(self._stop_fd)

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
            broken = [r for r in (self.rx, self.tx) if r is not None and r.q.broken]
            for r in broken:
                if not r.reported_broken:
                    r.reported_broken = True
                    r.signal_error()
            which = ", ".join(f"vring {r.index}" for r in broken) or "a vring"
            logger.error("net pair %d: %s broken: %s; the pair is no longer serviced", self.pair,
                         which, broken[0].q.broken if broken else e)
            hook = self.dev.on_needs_reset
            if hook is not None:
                try:
                    hook(f"net pair {self.pair}: {broken[0].q.broken if broken else e}")
                except Exception:
                    logger.exception("net pair %d: the needs-reset hook failed", self.pair)
        except OSError as e:
            logger.error("net pair %d: tap I/O failed: %s; the pair is no longer serviced", self.pair, e)
        except Exception:
            logger.exception("net pair %d: worker failed", self.pair)

    # --- waiting ---------------------------------------------------------------------
    def _wait(self, fds: list[tuple[int, int]], timeout_ms: int) -> None:
        want: dict[int, int] = {self._stop_fd: select.POLLIN}
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
    def _apply_faults(self, rings: list[_Ring], now: float) -> float | None:
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
            names = [k for k, bit in _FAULT_BITS.items() if mask & bit]
            logger.info("net pair %d: vring %d: faults on purpose in force now: %s", self.pair, r.index,
                        ", ".join(names) or "none")
            if mask & FAULT_STALL and not old & FAULT_STALL:
                r.q.notice()
            elif old & FAULT_STALL and not mask & FAULT_STALL:
                r.q.set_notification(False)
        return wake

    def _notice_stalled(self, rings: list[_Ring]) -> list[tuple[int, int]]:
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
            if net_loopback(txq, rxq, s, hdr, mrg, budget, spin):
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
            if tx_on:
                n += net_tap_tx(txq, tap, s, hdr, budget)
            if rxq is not None:
                n += net_tap_rx(rxq, tap, s, hdr, mrg, budget)   # a stalled RX drops what it reads
            if n:
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
