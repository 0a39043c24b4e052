"""The ``record`` and ``export`` subcommands' arguments (cli.py adds them)."""

from __future__ import annotations

import argparse
import textwrap

from ..analysis import Thresholds
from .export import export_main
from .recorder import record_main


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def cmd_record(args: argparse.Namespace) -> int:
    return record_main(args)


def cmd_export(args: argparse.Namespace) -> int:
    return export_main(args)


def add_parsers(sub, add_source_args) -> None:
    """Add ``record`` (with the shared source options) and ``export`` to
    the subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    rp = sub.add_parser("record", help="record snapshots, events and vhost-user messages to a file",
                        formatter_class=fmt, description="Record a source to an SQLite file (README: Recording).",
                        epilog=_examples("""
                            vqscope record -o run.vqs --connect /tmp/vq.sock            # until Ctrl-C
                            vqscope record -o run.vqs --qmp /run/vm1.qmp --interval 50 --duration 3600
                            vqscope record -o run.vqs --connect /tmp/vq.sock --max-size 500 --rotate
                            sqlite3 run.vqs 'SELECT request, count(*) FROM messages GROUP BY request'
                            sqlite3 run.vqs "SELECT time, device, queue, verdict, evidence FROM verdicts
                                             WHERE verdict NOT IN ('healthy', 'idle')"
                        """))
    add_source_args(rp)
    rp.add_argument("-o", "--output", required=True, metavar="FILE", help="the recording (a new file)")
    rp.add_argument("--interval", type=float, default=100.0, metavar="MS",
                    help="milliseconds between snapshots; one transaction each (default 100)")
    rp.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: at SIGINT/SIGTERM)")
    rp.add_argument("--max-size", type=float, metavar="MB",
                    help="stop when the file (database + WAL) reaches MB megabytes (10^6 bytes)")
    rp.add_argument("--rotate", action="store_true",
                    help="with --max-size: go on in FILE.1, FILE.2 ... instead of stopping")
    rp.add_argument("--stall-after", type=float, metavar="S",
                    help="seconds without progress before waiting buffers count as stuck, for the verdicts "
                         f"stored with the recording (default {Thresholds().stall_s:g}, the analyzer's)")
    rp.add_argument("--tee-jsonl", metavar="PATH",
                    help="also write each recorded snapshot to PATH as a JSON line (to check a recording)")
    rp.add_argument("--keyframe-every", type=int, default=None, metavar="K", help=argparse.SUPPRESS)
    rp.set_defaults(func=cmd_record)

    ep = sub.add_parser("export", help="convert a recording to a Perfetto/Chrome trace or JSON lines",
                        formatter_class=fmt, epilog=_examples("""
                            vqscope export run.vqs --format chrome-trace -o run.json   # open in ui.perfetto.dev
                            vqscope export run.vqs --format jsonl -o - | jq 'select(.type == "anomaly")'
                        """))
    ep.add_argument("file", metavar="FILE", help="a recording made by `vqscope record`")
    ep.add_argument("--format", choices=["chrome-trace", "jsonl"], default="chrome-trace",
                    help="chrome-trace: Trace Event Format JSON; jsonl: one JSON object per line (default chrome-trace)")
    ep.add_argument("-o", "--output", required=True, metavar="OUT", help="output file, - for stdout")
    ep.set_defaults(func=cmd_export)
