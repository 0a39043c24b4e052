"""``vqscope exporter``: its arguments (cli.py adds them) and its main."""

from __future__ import annotations

import argparse
import glob
import logging
import signal
import sys
import textwrap
import threading

from ..analysis import Thresholds
from ..errors import ArgumentError, SourceError

DEFAULT_LISTEN = "127.0.0.1:9793"


def add_parser(sub) -> None:
    """Add ``exporter`` to the subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "exporter", help="serve every queue of many sources as Prometheus metrics (/metrics, /healthz)",
        formatter_class=fmt,
        description="Watch many sources at once (vqscope back-ends and proxies, running QEMUs by their QMP "
                    "sockets or a glob of them, kernel vhost-net queues of processes) and serve their "
                    "queues, the doctor's verdicts and each source's state as Prometheus metrics (README "
                    "\"Fleet\"). Sources are read in the background every --interval; a scrape serves the "
                    "last reading and never waits on a source. Read-only, like every source.",
        epilog="examples:\n" + textwrap.indent(textwrap.dedent("""
            vqscope exporter --connect /tmp/vq.sock                      # one vqscope back-end
            vqscope exporter --qmp '/var/lib/libvirt/qemu/domain-*/monitor.sock'   # every libvirt VM
            vqscope exporter --listen 127.0.0.1:9793 --qmp '/run/vms/*.qmp' --connect /tmp/blk.sock
            curl -s 127.0.0.1:9793/metrics | grep vqscope_queue_inflight
            curl -s 127.0.0.1:9793/healthz
        """).strip(), "  "))
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve /metrics and /healthz (default {DEFAULT_LISTEN}; the metrics are "
                        f"unauthenticated: bind elsewhere only behind a firewall or proxy)")
    p.add_argument("--connect", action="append", default=[], metavar="SOCK",
                   help="a vqscope back-end or proxy (its vhost-user or introspection socket); repeatable")
    p.add_argument("--qmp", action="append", default=[], metavar="SOCK|GLOB",
                   help="a running QEMU's QMP socket, or a quoted glob of them (VMs that come and go are "
                        "found every --interval); repeatable; root reads /proc/PID/mem")
    p.add_argument("--vhost-net", action="append", default=[], type=int, metavar="PID", dest="vhost_net",
                   help="every kernel vhost-net queue of process PID (root: BCC probes); repeatable")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between reads of each source (default 1)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds one read may take before the source counts as down (default 5)")
    p.add_argument("--stall-after", type=float, default=Thresholds().stall_s, metavar="S",
                   help=f"the doctor's stall threshold for the verdict gauges (default {Thresholds().stall_s:g})")
    p.add_argument("--drop-after", type=float, default=60.0, metavar="S",
                   help="stop serving a source's queue metrics when its last reading is older than S "
                        "(default 60; its vqscope_source_* metrics stay)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=exporter_main)


def exporter_main(args: argparse.Namespace) -> int:
    """Run until SIGINT or SIGTERM; exit status 0 then, 2 on bad arguments
    or when the address cannot be bound."""
    # Here, not at the top: every other command would pay prometheus_client's import (~40 ms).
    from prometheus_client import CollectorRegistry

    from .collector import FleetCollector, prepare
    from .poller import Fleet, backend_spec, qemu_spec, vhost_net_spec
    from .server import is_loopback, make_app, parse_listen, serve

    if not (args.connect or args.qmp or args.vhost_net):
        raise ArgumentError("no source given: use --connect SOCK, --qmp SOCK|GLOB or --vhost-net PID "
                            "(each repeatable)")
    for name in ("interval", "timeout", "stall_after", "drop_after"):
        if not getattr(args, name) > 0:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(args, name)} must be > 0 seconds")
    host, port = parse_listen(args.listen)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="vqscope exporter: %(message)s")
    logging.getLogger("qemu").setLevel(logging.WARNING)   # qemu.qmp's connection chatter
    log = logging.getLogger("vqscope.exporter")
    specs = [backend_spec(p, args.timeout) for p in args.connect]
    specs += [qemu_spec(p, args.timeout) for p in args.qmp if not glob.has_magic(p)]
    specs += [vhost_net_spec(pid) for pid in args.vhost_net]
    globs = [p for p in args.qmp if glob.has_magic(p)]
    fleet = Fleet(specs, globs, interval=args.interval, thresholds=Thresholds(stall_s=args.stall_after),
                  timeout=args.timeout, prepare=prepare)
    stale_after = 3 * args.interval + 1.0
    registry = CollectorRegistry(auto_describe=False)
    collector = FleetCollector(fleet.watches, stale_after=stale_after, drop_after=args.drop_after)
    registry.register(collector)
    try:
        httpd, _thread = serve(host, port, make_app(registry, collector, fleet.watches, fleet.scanner_alive))
    except OSError as e:
        raise SourceError(f"cannot listen on {args.listen}: {e.strerror or e}") from None
    if not is_loopback(host):
        log.warning("listening on %s: not a loopback address; anyone who reaches it reads the metrics", host)
    done = threading.Event()
    old = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    fleet.start()
    bound = f"[{host}]" if ":" in host else host
    log.info("serving http://%s:%d/metrics and /healthz: %d sources%s, read every %g s", bound,
             httpd.server_address[1],
             len(specs), f" and {len(globs)} QMP globs" if globs else "", args.interval)
    try:
        while not done.wait(1.0):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        httpd.shutdown()
        httpd.server_close()
        fleet.stop()
    return 0
