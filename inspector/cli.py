"""The ``vqscope`` command line.

Each subcommand's implementation lives next to what it drives; this module
only parses arguments, turns InspectorError into a one-line message with exit
status 2 (SourceGone, a source that went away while attached: status 1), and
dispatches.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from rich.console import Console

from probes.cli import EXAMPLES as PROBE_EXAMPLES
from probes.cli import add_arguments as add_probe_arguments
from probes.cli import probe_main
from tui.render import snapshot_table
from tui.render_blk import blk_summary

from .errors import ArgumentError, InspectorError, SourceGone
from .faults import BLK_FAULTS, FAULT_KINDS, NET_FAULTS, SPEC_FORMS, parse_fault
from .exporter.cli import add_parser as add_exporter_parser
from .layout import split_layout
from .record.cli import add_parsers as add_record_parsers
from .snapshot.codec import dumps
from .sources import open_source
from .tools.demo import demo_main
from .tools.doctor import VERDICT_HELP, doctor_main
from .tools.proxy import DEVICE_TYPES, proxy_main
from .tools.serve import serve_main
from .tools.blk_load import RW_MODES, blk_load_main
from .tools.vhost_net_load import load_main


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


#: The faults of ``--inject`` (inspector/faults.py), for the epilogs of serve and demo.
INJECT_HELP = """\
faults on purpose: --inject KIND=VRING[,after=S][,for=S], repeatable. VRING 2k is
receiveq k, 2k+1 transmitq k; the fault starts `after` seconds after the vring starts
(default 0) and lasts `for` seconds (default: for ever), then the vring works again.
  device faults (serve and demo: vqscope's back-end makes them):
    stall=VRING        the device stops serving the vring: it still counts kicks and
                       reads avail->idx when kicked (shadow_avail_idx moves) but takes
                       and returns nothing; frames for a stalled RX vring are dropped
    drop-calls=VRING   calls that are due are not sent (a lost interrupt); counted only
                       in the snapshot's extras inject.calls_dropped
  driver faults (demo only: vqscope's built-in front-end makes them):
    withhold-kicks=VRING   publish available entries but never kick
    stop-consuming=VRING   collect no used entries, refill nothing, read no call"""

#: The faults of ``serve blk --inject``.
BLK_INJECT_HELP = """\
faults on purpose: --inject KIND=VRING[,after=S][,for=S], repeatable. VRING k is
requestq k; the fault starts `after` seconds after the vring starts (default 0) and
lasts `for` seconds (default: for ever).
    hold-io=VRING      take requests from the vring but submit none to the disk: they
                       stay in flight (extras blk.in_flight) until the fault ends
    drop-calls=VRING   calls that are due are not sent (a lost interrupt); counted only
                       in the snapshot's extras inject.calls_dropped"""


#: What ``load blk --verify`` checks, for its epilog.
BLK_LOAD_HELP = """\
--verify: every 512-byte sector written carries a pattern of (sector, --seed); every
sector read is checked against it. Read modes check every read: the region must have
been written with the same --seed (by a write run through any back-end of the image).
Write modes go on after --seconds until every block of the region was written once, so
that a later read --verify finds no hole; mixed modes check reads of blocks written
before. Exit status 1 on any error status, mismatch, or a back-end that broke the ring
(a used id that is no request in flight, a used len beyond the chain) or stalled."""


def _fault_type(kinds: tuple[str, ...]):
    """An argparse type for ``--inject``: a Fault of one of ``kinds``; a bad
    SPEC is a usage error (exit 2) naming the bad part."""

    def fault(text: str):
        try:
            return parse_fault(text, kinds)
        except ArgumentError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return fault


def cmd_layout(args: argparse.Namespace) -> int:
    lay = split_layout(args.size, args.align)
    if args.json:
        print(json.dumps(lay.as_dict()))
    else:
        for k, v in lay.as_dict().items():
            print(f"{k:>24}: {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return serve_main(args)


def cmd_proxy(args: argparse.Namespace) -> int:
    return proxy_main(args)


def cmd_snapshot(args: argparse.Namespace) -> int:
    with open_source(args) as src:
        snap = src.snapshot()
    if args.json:
        print(dumps(snap))
    else:
        console = Console(width=max(Console().width, 140))
        console.print(snapshot_table(snap))
        for line in filter(None, map(blk_summary, snap.queues)):   # block queues: their requests
            console.print(line)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    return doctor_main(args)


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import run_tui  # Textual: a fifth of a second of imports, for the TUI only

    return run_tui(args)


def cmd_demo(args: argparse.Namespace) -> int:
    return demo_main(args)


def cmd_probe(args: argparse.Namespace) -> int:
    return probe_main(args)


def cmd_load(args: argparse.Namespace) -> int:
    return load_main(args)


def cmd_load_blk(args: argparse.Namespace) -> int:
    return blk_load_main(args)


#: The source options of ``snapshot``, ``tui`` and ``record``: (flags, add_argument keywords).
SOURCE_ARGS = (
    (("--connect",), dict(metavar="PATH",
                          help="a vqscope back-end: its vhost-user socket or introspection socket")),
    (("--qmp",), dict(metavar="SOCK",
                      help="a running QEMU (>= 7.2): its QMP socket (-qmp unix:SOCK,server=on,wait=off); "
                           "rings are read from /proc/PID/mem, never written")),
    (("--pid",), dict(type=int, metavar="PID",
                      help="QEMU's pid, with --qmp (default: the socket's peer, SO_PEERCRED)")),
    (("--file",), dict(metavar="JSON", help="a snapshot JSON file (recorded)")),
    (("--vhost-net",), dict(type=int, metavar="PID", dest="vhost_net",
                            help="every kernel vhost-net queue of process PID (root: BCC probes + "
                                 "/proc/PID/mem)")),
)
#: The replay options of ``snapshot`` and ``tui``.
REPLAY_ARGS = (
    (("--replay",), dict(metavar="FILE", help="a recording (vqscope record -o FILE) instead of a live source")),
    (("--at",), dict(metavar="WHERE",
                     help="with --replay: snapshot N (1 = first, -1 = last), +SECONDS from the start, "
                          "or a time (epoch seconds or ISO 8601 UTC); default the first")),
)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="vqscope",
        description="Show every virtqueue live; be a vhost-user device whose rings you can watch.",
        formatter_class=fmt,
        epilog=_examples("""
            vqscope demo                                 # back-end + built-in front-end + TUI
            vqscope serve net --socket /tmp/vq.sock --loopback
            vqscope tui --connect /tmp/vq.sock
            vqscope snapshot --connect /tmp/vq.sock --json
            vqscope tui --qmp /run/vm1.qmp               # attach to a running QEMU
            vqscope layout --size 256 --align 4 --json
        """),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lp = sub.add_parser("layout", help="split-ring layout of a queue size and alignment",
                        formatter_class=fmt, epilog=_examples("""
                            vqscope layout --size 256 --align 4096
                            vqscope layout --size 8 --align 4 --json   # QEMU's legacy formula differs
                        """))
    lp.add_argument("--size", type=int, required=True, help="queue size N (power of two, ≤ 32768)")
    lp.add_argument("--align", type=int, default=4096, help="used-ring alignment (power of two; default 4096)")
    lp.add_argument("--json", action="store_true", help="print one JSON object")
    lp.set_defaults(func=cmd_layout)

    sp = sub.add_parser("serve", help="run a vhost-user back-end device (net or blk)", formatter_class=fmt,
                        epilog=_examples("""
                            vqscope serve net --socket /tmp/vq.sock --loopback
                            vqscope serve blk --socket /tmp/vblk.sock --file disk.img
                            vqscope serve blk --socket /tmp/vblk.sock --size 1G --memory --queues 2
                        """) + "\n\nvqscope serve net --help and vqscope serve blk --help give each device's options.")
    kinds = sp.add_subparsers(dest="kind", required=True, metavar="KIND")

    def add_serve_common(q: argparse.ArgumentParser, queues_help: str, fault_kinds: tuple[str, ...]) -> None:
        q.add_argument("--socket", required=True, help="vhost-user Unix socket path (created mode 0600)")
        q.add_argument("--queues", type=int, default=1, help=queues_help)
        q.add_argument("--introspect", metavar="PATH", help="introspection socket (default SOCKET.introspect)")
        q.add_argument("--introspect-any-uid", action="store_true",
                       help="serve introspection readers of any uid (default: this uid and root only, "
                            "checked with SO_PEERCRED)")
        q.add_argument("--inject", metavar="SPEC", action="append", default=[], type=_fault_type(fault_kinds),
                       help=f"a device fault on purpose, {SPEC_FORMS} with KIND {' or '.join(fault_kinds)} "
                            f"(repeatable; see below)")
        q.add_argument("-v", "--verbose", action="store_true", help="log every vhost-user message")
        q.set_defaults(func=cmd_serve)

    np_ = kinds.add_parser("net", help="virtio-net: loopback or a tap device", formatter_class=fmt,
                           epilog=_examples("""
                            vqscope serve net --socket /tmp/vq.sock --loopback
                            vqscope serve net --socket /tmp/vq.sock --tap vq0 --queues 2
                            vqscope serve net --socket /tmp/vq.sock --loopback --no-packed
                            vqscope serve net --socket /tmp/vq.sock --loopback --introspect /tmp/vq.i
                            vqscope serve net --socket /tmp/vq.sock --inject stall=1,after=5,for=10
                            vqscope serve net --socket /tmp/vq.sock --inject drop-calls=0,after=2
                        """) + "\n\n" + INJECT_HELP)
    add_serve_common(np_, "queue pairs offered (default 1)", NET_FAULTS)
    mode = np_.add_mutually_exclusive_group()
    mode.add_argument("--loopback", action="store_true",
                      help="echo each TX frame back on RX with MACs swapped (default)")
    mode.add_argument("--tap", metavar="IFNAME", help="attach a Linux tap device")
    np_.add_argument("--mac", default="52:54:00:12:34:57", help="MAC address in the config space")
    np_.add_argument("--no-packed", dest="packed", action="store_false",
                     help="do not offer VIRTIO_F_RING_PACKED (default: offered; the driver picks split "
                          "or packed rings)")

    bp = kinds.add_parser("blk", help="virtio-blk: a raw image, a block device or a RAM disk",
                          formatter_class=fmt, epilog=_examples("""
                            vqscope serve blk --socket /tmp/vblk.sock --file disk.img
                            vqscope serve blk --socket /tmp/vblk.sock --file /dev/nvme0n1p3 --direct --queues 4
                            vqscope serve blk --socket /tmp/vblk.sock --file disk.img --readonly
                            vqscope serve blk --socket /tmp/vblk.sock --size 1G --memory
                            vqscope serve blk --socket /tmp/vblk.sock --file disk.img --inject hold-io=0,after=5,for=2
                        """) + "\n\n" + BLK_INJECT_HELP)
    add_serve_common(bp, "request queues offered (1 to 64, default 1)", BLK_FAULTS)
    store = bp.add_mutually_exclusive_group(required=True)
    store.add_argument("--file", metavar="IMG", help="a raw image file or a block device")
    store.add_argument("--memory", action="store_true", help="a RAM disk of --size bytes (lost at exit)")
    bp.add_argument("--size", metavar="N", help="with --memory: the disk size in bytes, or with a suffix "
                                                 "K, M, G, T (powers of 1024), a multiple of 512")
    bp.add_argument("--readonly", action="store_true", help="a read-only disk (VIRTIO_BLK_F_RO)")
    bp.add_argument("--direct", action="store_true", help="open the file with O_DIRECT (no host page cache)")
    bp.add_argument("--queue-size", type=int, default=128, metavar="N",
                    help="requests each queue keeps in flight at most (its I/O depth; default 128)")
    bp.add_argument("--no-packed", dest="packed", action="store_false",
                    help="do not offer VIRTIO_F_RING_PACKED (default: offered; the driver picks split or "
                         "packed rings; crash safety covers split rings only)")

    pxp = sub.add_parser("proxy", help="watch a third-party vhost-user back-end by relaying its socket",
                         formatter_class=fmt,
                         description="Listen for front-ends on --listen; for each, connect to the back-end on "
                                     "--connect and forward every message both ways byte for byte, with its "
                                     "fds (the back-end request channel too). The proxy never sends a "
                                     "message of its own and never writes guest memory; kick and call fds "
                                     "pass unchanged unless --count-notifications. Either side hanging up "
                                     "closes the other (so QEMU's reconnect works through it).",
                         epilog=_examples("""
                             vqscope proxy --listen /tmp/front.sock --connect /tmp/qsd.sock
                             # QEMU: -chardev socket,id=c0,path=/tmp/front.sock,reconnect=1
                             vqscope snapshot --connect /tmp/front.sock --json
                             vqscope tui --connect /tmp/front.sock
                         """))
    pxp.add_argument("--listen", required=True, metavar="FRONT.sock",
                     help="the socket front-ends connect to (created mode 0600)")
    pxp.add_argument("--connect", required=True, metavar="BACK.sock", help="the back-end's vhost-user socket")
    pxp.add_argument("--introspect", metavar="PATH", help="introspection socket (default FRONT.sock.introspect)")
    pxp.add_argument("--introspect-any-uid", action="store_true",
                     help="serve introspection to readers of any uid (default: this uid and root)")
    pxp.add_argument("--count-notifications", action="store_true",
                     help="interpose the proxy's own kick and call eventfds to count and time them "
                          "(the data path's notifications then pass through the proxy)")
    pxp.add_argument("--device-type", choices=DEVICE_TYPES,
                     help="the device behind the socket (default: inferred from what passes)")
    pxp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    pxp.set_defaults(func=cmd_proxy)

    def add_source_args(q: argparse.ArgumentParser) -> None:
        for flags, kw in SOURCE_ARGS:
            q.add_argument(*flags, **kw)

    def add_replay_args(q: argparse.ArgumentParser) -> None:
        for flags, kw in REPLAY_ARGS:
            q.add_argument(*flags, **kw)

    snp = sub.add_parser("snapshot", help="print one snapshot of every queue", formatter_class=fmt,
                         epilog=_examples("""
                             vqscope snapshot --connect /tmp/vq.sock --json
                             vqscope snapshot --connect /tmp/vq.sock
                             vqscope snapshot --qmp /run/vm1.qmp --json   # every queue of a running QEMU
                             vqscope snapshot --replay rec.vqs --at -1  # the last recorded snapshot
                         """))
    add_source_args(snp)
    add_replay_args(snp)
    snp.add_argument("--json", action="store_true", help="print the snapshot JSON")
    snp.set_defaults(func=cmd_snapshot)

    dr = sub.add_parser("doctor", help="watch a source and say what is wrong with each queue (exit 0/1/2)",
                        formatter_class=fmt,
                        description="Watch every queue of a source for --duration seconds and print one line "
                                    "per queue that is not healthy or idle: verdict, since when, and the "
                                    "evidence. Exit status: 0 all healthy/idle, 1 a problem, 2 could not look.",
                        epilog="verdicts:\n" + VERDICT_HELP + "\n\n" + _examples("""
                            vqscope doctor --connect /tmp/vq.sock               # a vqscope back-end
                            vqscope doctor --qmp /run/vm1.qmp --duration 10     # a running QEMU (root)
                            vqscope doctor --vhost-net 4242 --json              # kernel vhost-net queues
                            vqscope doctor --replay run.vqs                     # the verdict timeline of a recording
                        """))
    add_source_args(dr)
    dr.add_argument("--replay", metavar="FILE", help="diagnose a recording (vqscope record) after the fact")
    dr.add_argument("--duration", type=float, default=5.0, metavar="S", help="seconds to watch (default 5)")
    dr.add_argument("--interval", type=float, default=0.25, metavar="S",
                    help="seconds between snapshots (default 0.25)")
    dr.add_argument("--stall-after", type=float, metavar="S",
                    help="seconds a side may owe progress before it counts as stuck (default 2)")
    dr.add_argument("--json", action="store_true", help="print one JSON object: every queue's diagnosis")
    dr.set_defaults(func=cmd_doctor)

    tp = sub.add_parser("tui", help="interactive live view", formatter_class=fmt,
                        epilog=_examples("""
                            vqscope tui --connect /tmp/vq.sock
                            vqscope tui --qmp /run/vm1.qmp               # a running QEMU (root)
                            vqscope tui --file snapshot.json
                            vqscope tui --replay rec.vqs               # space: play/pause, ← →: step, n: anomaly
                        """))
    add_source_args(tp)
    add_replay_args(tp)
    tp.add_argument("--interval", type=float, default=0.25, help="refresh period in seconds (default 0.25)")
    tp.set_defaults(func=cmd_tui)

    dp = sub.add_parser("demo", help="loopback back-end + built-in front-end + TUI", formatter_class=fmt,
                        epilog=_examples("""
                            vqscope demo
                            vqscope demo --headless --duration 5 --json
                            vqscope demo --split                         # split rings, not packed
                            vqscope demo --headless --duration 60 --socket /tmp/demo.sock &
                            vqscope snapshot --connect /tmp/demo.sock   # another process reads it
                            vqscope demo --inject withhold-kicks=1,after=2   # TX kicks stop after 2 s
                            vqscope demo --inject stop-consuming=0 --inject stall=1,after=3,for=5
                        """) + "\n\n" + INJECT_HELP)
    dp.add_argument("--headless", action="store_true", help="no TUI; run for --duration seconds")
    dp.add_argument("--duration", type=float, default=5.0, help="seconds to run headless (default 5)")
    dp.add_argument("--json", action="store_true", help="print the final snapshot JSON (headless)")
    dp.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    dp.add_argument("--interval", type=float, default=0.25, help="TUI refresh period in seconds")
    dp.add_argument("--socket", help="vhost-user socket path (introspection: PATH.introspect); "
                                     "default: in a temporary directory")
    dp.add_argument("--inject", metavar="SPEC", action="append", default=[],
                    type=_fault_type(FAULT_KINDS),
                    help=f"a fault on purpose, {SPEC_FORMS}: a device fault (stall, drop-calls) or a "
                         f"driver fault (withhold-kicks, stop-consuming); repeatable, see below")
    dp.add_argument("--split", action="store_true",
                    help="split rings even when the back-end offers packed ones (VIRTIO_F_RING_PACKED)")
    dp.set_defaults(func=cmd_demo)

    ldp = sub.add_parser("load", help="load generators: a kernel vhost-net device, a vhost-user-blk back-end",
                         formatter_class=fmt, epilog=_examples("""
                             vqscope load vhost-net --tx 32 --rx 32       # needs root and /dev/vhost-net
                             vqscope load blk --connect /tmp/blk.sock --rw randread --bs 4k --iodepth 32
                         """))
    lsub = ldp.add_subparsers(dest="kind", metavar="DEVICE", required=True)
    lnp = lsub.add_parser("vhost-net", help="drive a kernel vhost-net device from user space",
                          formatter_class=fmt, epilog=_examples("""
                             vqscope load vhost-net --tx 32 --rx 32       # needs root and /dev/vhost-net
                             vqscope load vhost-net --hold 60 --every 0.5 # stay open for vqscope tui --vhost-net PID
                             vqscope load vhost-net --withhold-kicks --hold 60   # TX entries vhost was never kicked for
                             vqscope load vhost-net --hold 60 --every 1 --withhold-kicks 4 --withhold-after 20
                             vqscope load vhost-net --iotlb --hold 60 --every 1   # addresses are IOVAs: vhost's device IOTLB
                         """))
    lnp.add_argument("--tx", type=int, default=8, help="frames to send through TX (default 8)")
    lnp.add_argument("--rx", type=int, default=8, help="frames to receive through RX (default 8)")
    lnp.add_argument("--tap", default="vqs%d", help="tap device name (default vqs%%d: the kernel picks)")
    lnp.add_argument("--size", type=int, default=256, help="queue size of both vrings (default 256)")
    lnp.add_argument("--hold", type=float, default=0.0, help="seconds to stay open after the traffic")
    lnp.add_argument("--every", type=float, default=0.0,
                     help="while holding, one TX and one RX frame every SECONDS")
    lnp.add_argument("--withhold-kicks", type=int, nargs="?", const=8, default=0, metavar="N",
                     help="a lost kick on purpose: after the traffic, publish N TX frames (default 8) "
                          "without kicking vhost; from then on --every's TX frames are unkicked too")
    lnp.add_argument("--withhold-after", type=float, default=0.0, metavar="S",
                     help="start withholding S seconds into --hold (default 0), after normal "
                          "--every traffic, so that an observer attached meanwhile sees TX at work")
    lnp.add_argument("--iotlb", action="store_true",
                     help="ack VIRTIO_F_ACCESS_PLATFORM: vhost's device IOTLB translates every ring and "
                          "buffer address (IOVAs: guest-physical + 0x100000000); IOTLB misses are "
                          "answered with 4 KiB updates (the summary's iotlb counts them)")
    lnp.set_defaults(func=cmd_load)

    lbp = lsub.add_parser("blk", help="drive a vhost-user-blk back-end without a VM (fio-like)",
                          formatter_class=fmt, epilog=_examples("""
                             vqscope load blk --connect /tmp/blk.sock --rw randread --bs 4k --iodepth 32 --seconds 10
                             vqscope load blk --connect /tmp/blk.sock --rw randwrite --queues 2 --json
                             vqscope load blk --connect /tmp/qsd.sock --rw write --verify --size 64m --seed 7
                             vqscope load blk --connect /tmp/blk.sock --rw read --verify --size 64m --seed 7
                             vqscope load blk --connect /tmp/blk.sock --rw randwrite --verify --then-read
                         """) + "\n\n" + BLK_LOAD_HELP)
    lbp.add_argument("--connect", required=True, metavar="SOCK", help="the back-end's vhost-user socket")
    lbp.add_argument("--rw", default="randread", choices=list(RW_MODES),
                     help="randread, randwrite, read, write (sequential), rw / randrw (mixed, --rwmixread); "
                          "default randread")
    lbp.add_argument("--bs", default="4k", help="bytes per request, a multiple of 512 (k, m suffixes; default 4k)")
    lbp.add_argument("--iodepth", type=int, default=32, help="requests in flight per queue (default 32)")
    lbp.add_argument("--queues", type=int, default=1,
                     help="requestqs, one thread each (the back-end must offer MQ for more than 1)")
    lbp.add_argument("--seconds", type=float, default=5.0, help="how long to run (default 5)")
    lbp.add_argument("--size", default=None,
                     help="bytes of the disk to use from sector 0 (k, m, g suffixes; default: all of it)")
    lbp.add_argument("--rwmixread", type=int, default=50, help="percent of reads for rw / randrw (default 50)")
    lbp.add_argument("--verify", action="store_true",
                     help="write a pattern of (sector, --seed) and check every sector read against it")
    lbp.add_argument("--then-read", action="store_true",
                     help="with --verify on a write mode: read the whole region back and check it")
    lbp.add_argument("--seed", type=int, default=1, help="seed of random offsets and the pattern (default 1)")
    lbp.add_argument("--spin", type=int, default=64,
                     help="empty used-ring polls before sleeping on the call eventfd (default 64)")
    lbp.add_argument("--stall", type=float, default=10.0,
                     help="seconds without a completion after which the back-end counts as stalled (default 10)")
    lbp.add_argument("--packed", action="store_true",
                     help="packed rings (VIRTIO_F_RING_PACKED) when the back-end offers them; else split")
    lbp.add_argument("--json", action="store_true", help="print one JSON object")
    lbp.set_defaults(func=cmd_load_blk)


    prp = sub.add_parser("probe", help="BCC probes: vhost-net handlers, eventfd kicks/calls, vhost ioctls",
                         formatter_class=fmt, epilog=PROBE_EXAMPLES)
    add_probe_arguments(prp)
    prp.set_defaults(func=cmd_probe)


    add_record_parsers(sub, add_source_args)
    add_exporter_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SourceGone as e:  # attached, then the source went away (QEMU exited)
        print(f"vqscope {args.command}: {e}", file=sys.stderr)
        return 1
    except InspectorError as e:
        print(f"vqscope {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
