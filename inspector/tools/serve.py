"""``vqscope serve net|blk``: run a vhost-user back-end device until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from ..datapath.blk import BlkDisk
from ..devices.blk import BlkDevice
from ..devices.net import NetDevice
from ..errors import InspectorError
from ..faults import check_vrings
from ..introspect.snapshot import backend_snapshot
from ..spec.virtio import VIRTIO_BLK_SECTOR_SIZE
from ..vhost_user.server import VhostUserServer

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of ``text``: an integer with an optional K/M/G/T suffix
    (powers of 1024; ``64M``, ``1G``, ``512``), > 0 and a multiple of 512.
    InspectorError naming the value otherwise."""
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if m is None or int(m.group(1)) == 0:
        raise InspectorError(f"--size {text!r} is invalid: give a number of bytes > 0, optionally with "
                             f"K, M, G or T (e.g. 64M, 1G)")
    size = int(m.group(1)) * _SUFFIXES[m.group(2)]
    if size % VIRTIO_BLK_SECTOR_SIZE:
        raise InspectorError(f"--size {text!r} is {size} bytes, not a multiple of "
                             f"{VIRTIO_BLK_SECTOR_SIZE} (the sector size)")
    return size


def open_disk(args: argparse.Namespace) -> BlkDisk:
    """The BlkDisk of the ``serve blk`` arguments; InspectorError (one
    line) when the file is missing or the size is wrong."""
    if args.memory:
        if args.size is None:
            raise InspectorError("--memory needs --size N (e.g. --size 64M)")
        if args.direct:
            raise InspectorError("--direct has no meaning for a RAM disk (--memory)")
        return BlkDisk(size=parse_size(args.size), memory=True, readonly=args.readonly)
    if args.size is not None:
        raise InspectorError(f"--size {args.size} goes with --memory; a --file disk has the file's size")
    if not os.path.exists(args.file):
        raise InspectorError(f"--file {args.file}: no such file or block device")
    try:
        return BlkDisk(args.file, readonly=args.readonly, direct=args.direct)
    except OSError as e:
        raise InspectorError(f"--file {args.file}: cannot open it: {e.strerror or e}") from None


def make_server(args: argparse.Namespace, disk: BlkDisk | None = None) -> VhostUserServer:
    """A VhostUserServer for the ``serve`` arguments (not started); ``serve
    blk`` serves ``disk`` (:func:`open_disk`; the caller closes it after the
    server), one for every connection."""
    if args.kind == "blk":
        if disk is None:
            raise InspectorError("serve blk: no disk (open_disk(args) makes it)")
        if not 1 <= args.queues <= 64:
            raise InspectorError(f"--queues {args.queues} is invalid: give 1 to 64 request queues")
        if not 1 <= args.queue_size <= 32768:
            raise InspectorError(f"--queue-size {args.queue_size} is invalid: give 1 to 32768")
        faults = tuple(args.inject or ())
        check_vrings(faults, args.queues, f"--queues {args.queues}")

        def factory():
            return BlkDevice(disk, args.queues, depth=args.queue_size, faults=faults,
                             packed=getattr(args, "packed", True))
    else:
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


def _describe(args: argparse.Namespace, disk: BlkDisk | None) -> str:
    if disk is None:
        what = f"tap {args.tap}" if args.tap else "loopback"
        rings = "split or packed rings" if getattr(args, "packed", True) else "split rings only"
        return f"virtio-net ({what}, {args.queues} queue pair(s), {rings})"
    where = f"RAM disk of {disk.capacity * VIRTIO_BLK_SECTOR_SIZE} bytes" if args.memory else args.file
    flags = [f for f, on in (("read-only", args.readonly), ("O_DIRECT", args.direct)) if on]
    rings = "split or packed rings" if getattr(args, "packed", True) else "split rings only"
    return (f"virtio-blk ({where}, {disk.capacity} sectors{', ' + ', '.join(flags) if flags else ''}, "
            f"{args.queues} request queue(s), depth {args.queue_size}, {rings})")


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="vqscope serve: %(message)s", stream=sys.stderr)
    disk = open_disk(args) if args.kind == "blk" else None
    try:
        server = make_server(args, disk)

        def on_signal(signum, frame):
            server.stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        print(f"vqscope serve: {_describe(args, disk)} on {args.socket}; "
              f"introspection on {server.introspect_path}; Ctrl-C to end", file=sys.stderr, flush=True)
        if args.inject:
            print(f"vqscope serve: faults on purpose: {', '.join(str(f) for f in args.inject)} "
                  f"(each from the start of its vring)", file=sys.stderr, flush=True)
        server.serve_forever()
    finally:
        if disk is not None:
            disk.close()
    return 0
