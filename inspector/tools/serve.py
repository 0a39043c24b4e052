"""``vqscope serve``: run a vhost-user back-end device until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from ..devices.net import NetDevice
from ..errors import InspectorError
from ..faults import check_vrings
from ..introspect.snapshot import backend_snapshot
from ..vhost_user.server import VhostUserServer


def make_server(args: argparse.Namespace):
    """A VhostUserServer for the ``serve`` arguments (not started)."""
    if args.queues < 1 or args.queues > 64:
        raise InspectorError(f"--queues {args.queues} is invalid: give 1 to 64 queue pairs")
    mode = "tap" if args.tap else "loopback"
    faults = tuple(getattr(args, "inject", None) or ())
    check_vrings(faults, 2 * args.queues, f"--queues {args.queues}")

    def factory():
        return NetDevice(mode=mode, tap_name=args.tap, queue_pairs=args.queues, mac=args.mac,
                         faults=faults, packed=getattr(args, "packed", True))

    introspect = args.introspect or args.socket + ".introspect"
    return VhostUserServer(args.socket, factory, introspect_path=introspect, snapshot_fn=backend_snapshot,
                           introspect_any_uid=getattr(args, "introspect_any_uid", False))


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="vqscope serve: %(message)s", stream=sys.stderr)
    server = make_server(args)

    def on_signal(signum, frame):
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    what = f"tap {args.tap}" if args.tap else "loopback"
    rings = "split or packed rings" if getattr(args, "packed", True) else "split rings only"
    print(f"vqscope serve: virtio-net ({what}, {args.queues} queue pair(s), {rings}) on {args.socket}; "
          f"introspection on {server.introspect_path}; Ctrl-C to end", file=sys.stderr, flush=True)
    if args.inject:
        print(f"vqscope serve: faults on purpose: {', '.join(str(f) for f in args.inject)} "
              f"(each from the start of its vring)", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0
