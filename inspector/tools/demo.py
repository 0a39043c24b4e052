"""``vqscope demo``: our loopback back-end, our built-in front-end sending
traffic through it, and the live TUI on the back-end's introspection socket.

Everything is real: a vhost-user Unix socket (in a temporary directory, or
at ``--socket PATH``), the front-end's rings in a memfd passed with
SET_MEM_TABLE, eventfd kicks and calls, and the C data path echoing frames.
Only the driver is ours instead of a guest's. The rings are packed (VIRTIO
1.2 §2.8) when the back-end offers VIRTIO_F_RING_PACKED, split with
``--split``. ``--inject`` faults
(inspector/faults.py) go to the back-end (device faults) or the front-end
(driver faults).

While it runs, other processes can read the back-end like any `vqscope
serve`: its introspection socket is ``PATH.introspect`` (headless mode says
where on stderr), e.g. ``vqscope record --connect PATH`` or ``vqscope tui
--connect PATH``. SIGTERM ends a headless demo cleanly, like Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading

from ..devices.net import NetDevice
from ..errors import InspectorError
from ..faults import check_vrings
from ..introspect.snapshot import backend_snapshot
from ..snapshot.codec import dumps
from ..sources.backend import BackendSource
from ..vhost_user.frontend import VhostUserFrontend
from ..vhost_user.server import VhostUserServer

# An ARP request from the front-end's MAC, broadcast; the loopback device
# echoes it with source and destination swapped.
_FRAME = (bytes.fromhex("ffffffffffff" "525400123456" "0806")
          + bytes.fromhex("0001080006040001" "525400123456" "0a000002" "000000000000" "0a000001")
          + bytes(18))


class Traffic(threading.Thread):
    """Drives the front-end: keeps RX buffers posted, sends bursts of frames
    on every TX vring, reaps used TX buffers and echoed RX frames, at about
    ``rate`` frames per second per queue pair (so indices visibly move
    without eating a core). Like Linux virtio-net, it reaps TX buffers when
    it sends and takes RX frames when the RX vring calls (interrupt driven:
    a lost call, ``--inject drop-calls=0``, leaves them there)."""

    def __init__(self, frontend, rate: float = 2000.0, burst: int = 16):
        super().__init__(name="vqscope-demo-traffic", daemon=True)
        self.fe = frontend
        self.rate = rate
        self.burst = burst
        self.stop_event = threading.Event()
        self.sent = 0
        self.received = 0
        self.error: Exception | None = None

    def run(self) -> None:
        period = self.burst / self.rate
        try:
            while not self.stop_event.is_set():
                for pair in range(self.fe.queue_pairs):
                    self.fe.post_rx_buffers(pair, self.burst * 2)
                    self.fe.poll_tx_done(pair)
                    self.sent += self.fe.send_frames(pair, [_FRAME] * self.burst)
                    if self.fe.wait_call(pair, 0, which="rx"):
                        self.received += len(self.fe.recv_frames(pair))
                self.stop_event.wait(period)
        except Exception as e:  # reported by demo_main, never silently lost
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


def _sleep_unless_terminated(seconds: float) -> None:
    """Sleep ``seconds``, returning early on SIGTERM (so that the sockets and
    the temporary directory are removed as after a normal end)."""
    done = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        done.wait(seconds)
        return
    old = signal.signal(signal.SIGTERM, lambda signum, frame: done.set())
    try:
        done.wait(seconds)
    finally:
        signal.signal(signal.SIGTERM, old)


def demo_main(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        sock = getattr(args, "socket", None)
        if not sock:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vqscope-demo-"))
            sock = os.path.join(tmp, "vhost-user.sock")
        faults = tuple(getattr(args, "inject", None) or ())
        check_vrings(faults, 2 * args.queues, f"--queues {args.queues}")
        device_faults = tuple(f for f in faults if f.side == "device")
        server = VhostUserServer(sock, lambda: NetDevice(mode="loopback", queue_pairs=args.queues,
                                                         faults=device_faults),
                                 introspect_path=sock + ".introspect", snapshot_fn=backend_snapshot)
        server.start()
        try:
            with VhostUserFrontend(sock, queue_pairs=args.queues, event_idx=True, mrg_rxbuf=True,
                                   faults=[f for f in faults if f.side == "driver"],
                                   packed=not getattr(args, "split", False)) as fe:
                traffic = Traffic(fe)
                traffic.start()
                try:
                    with BackendSource(sock) as source:
                        if args.headless:
                            print(f"vqscope demo: back-end on {sock}; introspection on "
                                  f"{server.introspect_path}; {'packed' if fe.packed else 'split'} "
                                  f"rings; running {args.duration:g} s",
                                  file=sys.stderr, flush=True)
                            _sleep_unless_terminated(args.duration)
                            snap = source.snapshot()
                        else:
                            from tui.app import VqscopeApp  # Textual: only for the live TUI

                            VqscopeApp(source, interval=args.interval).run()
                            snap = None
                finally:
                    traffic.stop()
                packed = fe.packed
                if traffic.error is not None:
                    raise InspectorError(f"demo front-end failed: {traffic.error}")
        finally:
            server.stop()
    if snap is not None:
        if args.json:
            print(dumps(snap))
        else:
            print(f"demo: {traffic.sent} frames sent, {traffic.received} echoed back "
                  f"({'packed' if packed else 'split'} rings)")
    return 0
