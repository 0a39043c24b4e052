"""``vqscope probe``: BCC-style front end of the probe libraries.

``vqscope probe [-p PID] [--json] [--stream] [interval [count]]`` attaches
every probe the kernel allows and prints, each interval, the per-queue
counters (and vhost's own queue state); ``--list`` prints every attach point
with attached/unavailable and why (no root needed); the hidden ``--ebpf``
prints the generated C and exits. Without root/CAP_BPF: one line, status 2
(PrivilegeError, an InspectorError, through inspector.cli).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dataclasses import asdict

from inspector.errors import SourceError
from inspector.snapshot.codec import to_json
from inspector.sources.backend import BackendSource

from .attach import NOT_ROOT, KernelInfo, has_bpf_privilege, print_points
from .base import PrivilegeError, Probe, ProbeError
from .eventfd import EventfdProbe, snapshot_eventfd_ids
from .vhost_ioctl import VhostIoctlProbe
from .vhost_net import VhostNetProbe

PROBES = ("vhost_net", "eventfd", "vhost_ioctl")

EXAMPLES = """examples:
  vqscope probe --list              # every attach point: attached/unavailable, why
  vqscope probe                     # all probes, counters every second
  vqscope probe -p 1234 5 3         # only QEMU pid 1234, every 5 s, 3 times
  vqscope probe -p 1234 --json 1 10 # one JSON object per second
  vqscope probe --stream -p 1234    # every kick, call and handler run as it happens
  vqscope probe --probes eventfd -p 1234 --side driver
  vqscope probe --probes eventfd --connect /tmp/vu.sock -p 4321
                                    # our back-end's kicks/calls per queue,
                                    # and its front-end's (pid 4321)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--pid", type=int, action="append", metavar="PID",
                   help="trace only this process (repeatable); its eventfds are watched")
    p.add_argument("--probes", default=",".join(PROBES),
                   help=f"comma-separated probes (default {','.join(PROBES)})")
    p.add_argument("--side", choices=["device", "driver"], default="device",
                   help="the -p process is the device (back-end: reads kicks, writes calls; "
                        "default) or the driver (front-end)")
    p.add_argument("--connect", metavar="SOCK",
                   help="a vqscope back-end (its vhost-user or introspection socket): the eventfd "
                        "probe counts its kicks and calls per queue, and those of every -p process "
                        "(then its front-end) on the same eventfds")
    p.add_argument("--json", action="store_true", help="one JSON object per interval")
    p.add_argument("--stream", action="store_true", help="print every event as it happens")
    p.add_argument("--list", action="store_true", help="list attach points and exit")
    p.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("interval", nargs="?", type=float, default=1.0, help="output interval, seconds (default 1)")
    p.add_argument("count", nargs="?", type=int, default=None, help="number of outputs (default: until Ctrl-C)")


def make_probes(names: list[str], pids: list[int] | None, stream: bool) -> list[Probe]:
    kinfo = KernelInfo.from_system()
    out: list[Probe] = []
    for n in names:
        if n == "vhost_net":
            cls = VhostNetProbe
        elif n == "eventfd":
            cls = EventfdProbe
        elif n == "vhost_ioctl":
            cls = VhostIoctlProbe
        else:
            raise ProbeError(f"unknown probe {n!r}: the probes are {', '.join(PROBES)}")
        out.append(cls(pids=pids, stream=stream, kernel=kinfo))
    return out


def probe_main(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.probes.split(",") if n.strip()]
    probes = make_probes(names, args.pid, args.stream)
    if args.list:
        pts = [ap for p in probes for ap in p.plan()]
        if args.json:
            print(json.dumps([ap.as_dict() for ap in pts]))
        else:
            print_points(pts)
        return 0
    if args.ebpf:
        for p in probes:
            print(p.ebpf_text())
        return 0
    if not has_bpf_privilege():
        raise PrivilegeError(f"{NOT_ROOT}; run as root")
    attached: list[Probe] = []
    try:
        for p in probes:
            if not any(ap.ok for ap in p.plan()):
                if not args.json:
                    print(f"{p.name}: nothing to attach on this kernel (vqscope probe --list)",
                          file=sys.stderr)
                continue
            pts = p.attach()
            attached.append(p)
            if p.name == "eventfd" and args.connect:
                n_be, n_fe = watch_backend(p, args.connect, args.pid or [])
                if not args.json:
                    print(f"eventfd: {n_be} fds of the back-end, {n_fe} of -p processes, by queue",
                          file=sys.stderr)
            elif p.name == "eventfd" and args.pid:
                for pid in args.pid:
                    p.watch_process(pid, f"pid{pid}", side=args.side)
            if not args.json:
                n_ok = sum(ap.ok for ap in pts)
                print(f"{p.name}: {n_ok} of {len(pts)} attach points attached", file=sys.stderr)
        print("Tracing... Ctrl-C to end.", file=sys.stderr if args.json else sys.stdout, flush=True)
        n = 0
        deadline = time.monotonic()
        while args.count is None or n < args.count:
            deadline += args.interval
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if args.stream:
                    for p in attached:
                        p.poll(int(min(left, 0.1) * 1000))
                        for ev in p.events():
                            _print_event(ev, args.json)
                else:
                    time.sleep(min(left, 0.2))
            _print_interval(attached, args.json)
            n += 1
    except KeyboardInterrupt:
        pass
    finally:
        for p in attached:
            p.close()
    return 0


def watch_backend(probe, sock: str, driver_pids: list[int]) -> tuple[int, int]:
    """Watch a vqscope back-end's kick and call eventfds by queue (its
    snapshot names them; inspector/introspect/snapshot.py) in the back-end (side
    device) and in each of ``driver_pids`` (side driver: the front-end holds
    the same eventfds). Returns the fds watched in each."""
    try:
        with BackendSource(sock) as src:
            snap = to_json(src.snapshot())   # snapshot_eventfd_ids reads the JSON's pid and backend fds
    except SourceError as e:
        raise ProbeError(str(e)) from e
    ids = snapshot_eventfd_ids(snap)
    if not ids:
        raise ProbeError(f"the back-end at {sock} has no vring with a kick or call eventfd yet")
    n_be = probe.watch_eventfd_ids(snap["pid"], ids, "device")
    n_fe = sum(probe.watch_eventfd_ids(pid, ids, "driver") for pid in driver_pids)
    return n_be, n_fe


def _print_event(ev, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": ev._asdict()}), flush=True)
    else:
        print(f"{ev.time_ns / 1e9:.6f} {ev.device[:24]:<24} {ev.queue:>3} {ev.kind:<16} {ev.value}"[:79],
              flush=True)


def interval_dict(probes: list[Probe]) -> dict:
    """What one interval prints with --json: per probe, counters (keys as
    strings), histograms, vhost_net queue states, vhost_ioctl devices, lost."""
    out: dict = {"time": time.time()}
    for p in probes:
        d: dict = {"lost": p.lost()}
        d["counters"] = {_k(k): v for k, v in p.counters().items()}
        d["histograms"] = {_k(k): v for k, v in p.histograms().items()}
        if p.name == "vhost_net":
            d["queues"] = {_k(k): s.as_dict() for k, s in p.queue_states().items()}
        if p.name == "vhost_ioctl":
            d["devices"] = {f"{pid}:{fd}": asdict(dev) for (pid, fd), dev in p.devices().items()}
        out[p.name] = d
    return out


def _k(k) -> str:
    if isinstance(k, int):
        return f"{k:#x}"
    if isinstance(k, tuple):
        return ":".join(f"{x:#x}" if isinstance(x, int) and x > 1 << 32 else str(x) for x in k)
    return str(k)


def _print_interval(probes: list[Probe], as_json: bool) -> None:
    d = interval_dict(probes)
    if as_json:
        print(json.dumps(d), flush=True)
        return
    print(time.strftime("%H:%M:%S"))
    for p in probes:
        body = d[p.name]
        if p.name == "vhost_net":
            qs = body["queues"]
            if qs:
                print(f"{'VQ':<18} {'PID':>7} {'Q':>2} {'LAST_AVAIL':>10} {'AVAIL':>6} {'LAST_USED':>9} "
                      f"{'SIG_USED':>8} {'NTF':>3}")
            for k, s in qs.items():
                ntf = {None: "?", True: "on", False: "off"}[s["notify_enabled"]]
                print(f"{k:<18} {s['owner_pid']:>7} {s['index']:>2} {s['last_avail_idx']:>10} "
                      f"{s['avail_idx']:>6} {s['last_used_idx']:>9} {s['signalled_used']:>8} {ntf:>3}")
        cols = {"vhost_net": ["kicks", "handler_runs", "used_added", "calls", "calls_suppressed",
                              "weight_exceeded"],
                "eventfd": ["kicks", "kicks_read", "calls", "calls_read"],
                "vhost_ioctl": ["ioctls"]}[p.name]
        rows = [(k, v) for k, v in body["counters"].items() if any(v.get(c) for c in cols)]
        if rows:
            short = [c.replace("calls_suppressed", "suppr").replace("weight_exceeded", "weight")
                     .replace("handler_runs", "runs").replace("used_added", "used") for c in cols]
            print(f"{p.name + ' ' + 'KEY':<24}" + "".join(f"{c:>9}" for c in short))
            for k, v in rows:
                print(f"{k[:23]:<24}" + "".join(f"{v.get(c, 0):>9}" for c in cols))
        if body["lost"]:
            print(f"{p.name}: {body['lost']} events lost")
