"""``vqscope load blk``: a vhost-user-blk front-end that drives any back-end
without a VM (qemu-storage-daemon, SPDK, ``vqscope serve blk``), fio-like.

The built-in front-end (:class:`~inspector.vhost_user.blk_frontend.BlkFrontend`)
does the handshake, owns guest memory and reads the config space
(capacity, size_max, seg_max, blk_size); then one Python thread per
requestq hands its ring to the C engine
(:class:`~inspector.datapath.blkload.BlkLoadQueue`), which keeps
``--iodepth`` requests in flight for ``--seconds`` without the GIL. Each
request takes one buffer slot of guest memory: header at the slot's start,
status byte after it, ``--bs`` bytes of data from the next 4 KiB boundary.

Region: ``--size`` bytes from sector 0 (default: the whole disk), rounded
down to ``--bs``; with ``--queues N`` each queue has its own N-th of it
(disjoint, so that their writes never race). Offsets are aligned to
``--bs``: sequential (a cursor that wraps) or random (xorshift, ``--seed``).

``--verify``: every 512-byte sector written carries a pattern derived from
(sector, ``--seed``) (datapath.blkload.sector_pattern); every sector read
is checked against it. Read modes check every read (the region must have
been written with the same seed: by a write run on any back-end of the same
image). Write modes (write, randwrite, rw, randrw) keep going after
``--seconds`` until every block of the region has been written at least
once ("fill": a later ``--rw read --verify`` finds no hole), and mixed
modes check only reads of blocks this run wrote before. ``--then-read``
then reads the whole region back sequentially and checks every sector.

Exit status: 0 when every request completed OK and nothing mismatched; 1
on any error status, mismatch, or a back-end that broke the ring, stalled
or hung up; 2 when the load could not start (InspectorError); 130 on
Ctrl-C (the queues stop submitting and drain, and the report is printed).
"""

from __future__ import annotations

import json
import re
import threading

from ..datapath.blkload import RANDOM, SEQUENTIAL, BlkLoadQueue, BlkLoadResult, Latency
from ..errors import ArgumentError, InspectorError
from ..spec.virtio import (VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
                           VIRTIO_BLK_SECTOR_SIZE, VIRTIO_RING_F_EVENT_IDX, has_feature)
from ..vhost_user.blk_frontend import BlkFrontend

#: --rw: (percent of reads, offset order); None: --rwmixread.
RW_MODES = {"randread": (100, RANDOM), "randwrite": (0, RANDOM), "read": (100, SEQUENTIAL),
            "write": (0, SEQUENTIAL), "rw": (None, SEQUENTIAL), "randrw": (None, RANDOM)}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.I)
_DATA_OFFSET = BlkFrontend.DATA_OFFSET
_MIN_QUEUE_SIZE = 128      # QEMU's vhost-user-blk default (libvhost-user takes up to 1024)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from ``4096``, ``4k``, ``1M``, ``2GiB`` (binary units).
    ArgumentError names ``what`` and the text."""
    m = _SIZE.match(str(text))
    if not m:
        raise ArgumentError(f"--{what} {text!r}: give a number of bytes with an optional k, m, g or t suffix")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _k(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


class BlkLoad:
    """One ``load blk`` run against the back-end at ``socket`` (see the
    module docstring for the options, named as the CLI's). Connects in the
    constructor (InspectorError when the back-end is not there, ProtocolError
    when it breaks the protocol; ArgumentError when the options do not fit what it
    offers); :meth:`run` does the load; :meth:`close` (or ``with``)."""

    def __init__(self, socket: str, *, rw: str = "randread", bs: int = 4096, iodepth: int = 32,
                 queues: int = 1, size: int | None = None, rwmixread: int = 50, verify: bool = False,
                 then_read: bool = False, seed: int = 1, spin: int = 64, stall: float = 10.0,
                 packed: bool = False, timeout: float = 5.0):
        if rw not in RW_MODES:
            raise ArgumentError(f"--rw {rw!r}: use one of {', '.join(RW_MODES)}")
        if bs <= 0 or bs % VIRTIO_BLK_SECTOR_SIZE:
            raise ArgumentError(f"--bs {bs}: give a positive multiple of {VIRTIO_BLK_SECTOR_SIZE} bytes")
        if iodepth < 1 or queues < 1:
            raise ArgumentError(f"--iodepth {iodepth} / --queues {queues}: give at least 1")
        if not 0 <= rwmixread <= 100:
            raise ArgumentError(f"--rwmixread {rwmixread}: give a percentage 0-100")
        read_pct, self.order = RW_MODES[rw]
        self.read_pct = rwmixread if read_pct is None else read_pct
        if then_read and (not verify or self.read_pct == 100):
            raise ArgumentError("--then-read reads back what --verify wrote: give --verify and a mode that writes")
        self.rw, self.bs, self.iodepth, self.nqueues = rw, bs, iodepth, queues
        self.verify, self.then_read, self.seed = verify, then_read, seed
        self.spin, self.stall = spin, stall
        self.interrupted = False
        self.fe: BlkFrontend | None = None
        seg_descs = 1
        try:
            for _ in range(2):   # again when SIZE_MAX splits the data into more descriptors
                qsize = max(_MIN_QUEUE_SIZE, _pow2_at_least(iodepth * (2 + seg_descs)))
                slot = _DATA_OFFSET + -(-bs // 4096) * 4096
                mem = (queues * iodepth + 1) * slot + queues * 2 * (16 + 8 + 2) * qsize + (4 << 20)
                try:
                    self.fe = BlkFrontend(socket, num_queues=queues, queue_size=qsize,
                                          mem_size=-(-mem // (2 << 20)) * (2 << 20), event_idx=True,
                                          packed=packed, max_data=bs, timeout=timeout)
                except OSError as e:   # no back-end there, or it went away during the handshake
                    raise InspectorError(f"--connect {socket}: {e.strerror or e}") from e
                self.config = self.fe.config()
                f = self.fe.features
                self.seg_size = (self.config.get("size_max", 0) if has_feature(f, VIRTIO_BLK_F_SIZE_MAX)
                                 else 0) or bs
                self.seg_size = max(VIRTIO_BLK_SECTOR_SIZE, self.seg_size // VIRTIO_BLK_SECTOR_SIZE
                                    * VIRTIO_BLK_SECTOR_SIZE)
                need = -(-bs // min(self.seg_size, bs))
                if need <= seg_descs:
                    break
                seg_descs = need
                self.fe.close()
                self.fe = None
            self._check_device(f, need, size)
            self.queues = self._make_queues()
        except BaseException:
            self.close()
            raise

    def _check_device(self, f: int, nseg: int, size: int | None) -> None:
        cfg = self.config
        if self.read_pct < 100 and has_feature(f, VIRTIO_BLK_F_RO):
            raise ArgumentError(f"--rw {self.rw}: the back-end's disk is read-only (VIRTIO_BLK_F_RO)")
        if has_feature(f, VIRTIO_BLK_F_BLK_SIZE) and cfg.get("blk_size") and self.bs % cfg["blk_size"]:
            raise ArgumentError(f"--bs {self.bs} is not a multiple of the back-end's blk_size {cfg['blk_size']}")
        if has_feature(f, VIRTIO_BLK_F_SEG_MAX) and cfg.get("seg_max") and nseg > cfg["seg_max"]:
            raise ArgumentError(f"--bs {self.bs} needs {nseg} data segments of size_max {self.seg_size}; "
                                f"the back-end's seg_max is {cfg['seg_max']}")
        disk = cfg["capacity"] * VIRTIO_BLK_SECTOR_SIZE
        self.size = disk if size is None else size
        if self.size > disk:
            raise ArgumentError(f"--size {self.size} is beyond the disk ({cfg['capacity']} sectors, {disk} bytes)")
        self.blocks = self.size // self.bs
        if self.blocks < self.nqueues:
            raise ArgumentError(f"a region of {self.size} bytes holds {self.blocks} block(s) of --bs {self.bs}: "
                                f"fewer than the {self.nqueues} queue(s)")

    def _make_queues(self) -> list[BlkLoadQueue]:
        fe = self.fe
        if fe.slot_size < _DATA_OFFSET + self.bs:
            raise ArgumentError(f"the front-end's buffer slots of {fe.slot_size} bytes cannot hold a request "
                                f"of --bs {self.bs} after its {_DATA_OFFSET}-byte header page")
        spb = self.bs // VIRTIO_BLK_SECTOR_SIZE
        writes = self.read_pct < 100
        out = []
        for q in range(self.nqueues):
            first, end = q * self.blocks // self.nqueues, (q + 1) * self.blocks // self.nqueues
            dq = fe.queues[q]
            ring = dq.ring
            if fe.packed:
                geometry = (ring.size, ring.desc_addr, ring.driver_event_addr, ring.device_event_addr,
                            ring.next_avail, ring.next_used)
                wraps = (ring.avail_wrap_counter, ring.used_wrap_counter)
            else:
                geometry = (ring.size, ring.desc_addr, ring.avail_addr, ring.used_addr, ring.avail_idx,
                            ring.last_used_idx)
                wraps = (1, 1)
            slots = fe.take_request_slots(self.iodepth)
            out.append(BlkLoadQueue(
                fe.uva, fe.mem_size, geometry, packed=fe.packed, wraps=wraps, event_idx=has_feature(fe.features, VIRTIO_RING_F_EVENT_IDX), kick_fd=dq.kick_fd,
                call_fd=dq.call_fd, slots=slots, bs=self.bs, seg_size=self.seg_size,
                region=(first * spb, end - first), read_pct=self.read_pct, order=self.order,
                seed=self.seed, verify=self.verify, track=self.verify and writes,
                fill=self.verify and writes, spin=self.spin, stall=self.stall, conn_fd=fe.sock.fileno()))
        return out

    def _run_all(self, seconds: float) -> BlkLoadResult:
        """Run every queue for ``seconds``, one thread each. Ctrl-C stops
        them (they drain) and the result covers what was done. The main
        thread waits on events, not Thread.join: a KeyboardInterrupt inside
        join can leave a running thread marked stopped (CPython bpo-45274)."""
        results: list[BlkLoadResult | None] = [None] * len(self.queues)
        done = [threading.Event() for _ in self.queues]

        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                results[i] = self.queues[i].run(seconds)
            except BaseException as e:   # handed to the main thread
                errors.append(e)
            finally:
                done[i].set()

        threads = [threading.Thread(target=one, args=(i,), name=f"blkload-q{i}", daemon=True)
                   for i in range(len(self.queues))]
        for t in threads:
            t.start()
        try:
            for ev in done:
                ev.wait()
        except KeyboardInterrupt:     # stop submitting, drain, report what was done
            self.interrupted = True
            for bq in self.queues:
                bq.stop()
            for ev in done:
                ev.wait()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return BlkLoadResult.merge(results)

    def run(self, seconds: float) -> dict:
        """The load for ``seconds`` (then fill and drain), and the read-back
        pass of ``then_read``; returns the report (:func:`report`)."""
        if seconds <= 0:
            raise ArgumentError(f"--seconds {seconds}: give a positive duration")
        main = self._run_all(seconds)
        back = None
        if self.then_read and not main.broken and not self.interrupted:
            for bq in self.queues:
                bq.set_mode(read_pct=100, order=SEQUENTIAL, max_ios=bq.bl.region_blocks, track=False)
            back = self._run_all(3600.0)    # ends after one pass (max_ios)
        return self.report(main, back)

    def report(self, r: BlkLoadResult, back: BlkLoadResult | None) -> dict:
        """The run as one dict (the ``--json`` output; :func:`format_report`
        prints it for people)."""
        c = r.counters
        secs = r.elapsed_ns / 1e9 or 1e-9
        out = {
            "rw": self.rw, "bs": self.bs, "iodepth": self.iodepth, "queues": self.nqueues,
            "region_bytes": self.blocks * self.bs, "seed": self.seed, "seconds": round(secs, 3),
            "capacity_sectors": self.config["capacity"], "queue_size": self.fe.queue_size,
            "ring": "packed" if self.fe.packed else "split",
            "ios": c["completed"], "iops": round(c["completed"] / secs, 1),
            "bytes": c["bytes_read"] + c["bytes_written"],
            "mb_s": round((c["bytes_read"] + c["bytes_written"]) / secs / 1e6, 2),
            "mib_s": round((c["bytes_read"] + c["bytes_written"]) / secs / 2**20, 2),
            "read": dict(_direction(c["reads"], c["bytes_read"], secs), lat_us=_latency(r.lat_read)),
            "write": dict(_direction(c["writes"], c["bytes_written"], secs), lat_us=_latency(r.lat_write),
                          fill=c["fills"]),
            "lat_us": _latency(r.lat),
            "status": {"ok": c["status_ok"], "ioerr": c["status_ioerr"], "unsupp": c["status_unsupp"],
                       "other": c["status_other"]},
            "errors": c["status_ioerr"] + c["status_unsupp"] + c["status_other"],
            "used_len_short": c["used_len_short"],
            "notifications": {"kicks": c["kicks"], "kicks_suppressed": c["kicks_suppressed"],
                              "calls": c["calls"], "sleeps": c["sleeps"]},
            "verify": _verify(r) if self.verify else None,
            "then_read": None,
            "broken": r.broken, "in_flight_at_end": r.in_flight, "interrupted": self.interrupted,
        }
        if back is not None:
            bc = back.counters
            out["then_read"] = dict(_verify(back), ios=bc["completed"],
                                    errors=bc["status_ioerr"] + bc["status_unsupp"] + bc["status_other"],
                                    broken=back.broken)
        return out

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None

    def __enter__(self) -> "BlkLoad":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _direction(ios: int, nbytes: int, secs: float) -> dict:
    return {"ios": ios, "bytes": nbytes, "iops": round(ios / secs, 1), "mib_s": round(nbytes / secs / 2**20, 2)}


def _latency(lat: Latency) -> dict:
    us = lambda ns: round(ns / 1000, 1)  # noqa: E731
    return {"min": us(lat.min_ns), "avg": us(lat.avg_ns), "p50": us(lat.percentile_ns(50)),
            "p90": us(lat.percentile_ns(90)), "p99": us(lat.percentile_ns(99)),
            "p99.9": us(lat.percentile_ns(99.9)), "max": us(lat.max_ns)}


def _verify(r: BlkLoadResult) -> dict:
    c = r.counters
    fm = r.first_mismatch
    return {"sectors_checked": c["verified_sectors"] + c["mismatched_sectors"],
            "mismatches": c["mismatched_sectors"], "unverified_reads": c["unverified_reads"],
            "first_mismatch": None if fm is None else {"sector": fm[0], "got": f"{fm[1]:#018x}",
                                                       "want": f"{fm[2]:#018x}"}}


def report_failed(rep: dict) -> bool:
    """Did the run fail (exit 1): an error status, a mismatch, a broken or
    stalled back-end, in the load or its read-back pass?"""
    parts = [rep] + ([rep["then_read"]] if rep.get("then_read") else [])
    return any(p["errors"] or p["broken"] for p in parts) or any(
        (p.get("verify") or p).get("mismatches", 0) for p in parts)


def format_report(rep: dict, socket: str) -> str:
    """The report for people, fio-like."""
    lines = [f"load blk: rw={rep['rw']} bs={rep['bs']} iodepth={rep['iodepth']} queues={rep['queues']} "
             f"region={_human_bytes(rep['region_bytes'])} (disk {rep['capacity_sectors']} sectors) on {socket}"]
    for name in ("read", "write"):
        d = rep[name]
        if d["ios"]:
            fill = f", {d['fill']} to fill the region" if d.get("fill") else ""
            lines.append(f"  {name}: IOPS={_k(d['iops'])}, BW={d['mib_s']:.1f}MiB/s "
                         f"({d['bytes'] / rep['seconds'] / 1e6:.1f}MB/s) "
                         f"({_human_bytes(d['bytes'])}/{rep['seconds']:.2f}s{fill})")
            lat = d["lat_us"]
            lines.append(f"    lat (usec): min={lat['min']}, avg={lat['avg']}, max={lat['max']}")
            lines.append(f"    lat percentiles (usec): 50th={lat['p50']}, 90th={lat['p90']}, 99th={lat['p99']}, "
                         f"99.9th={lat['p99.9']}")
    st = rep["status"]
    lines.append(f"  errors: {rep['errors']} (ioerr {st['ioerr']}, unsupp {st['unsupp']}, other {st['other']})"
                 + (f"; used len short of the chain: {rep['used_len_short']}" if rep["used_len_short"] else ""))
    for label, v in (("verify", rep["verify"]), ("read-back", rep["then_read"])):
        if v:
            first = v["first_mismatch"]
            lines.append(f"  {label}: {v['sectors_checked']} sectors checked, {v['mismatches']} mismatched"
                         + (f" (first: sector {first['sector']}, got {first['got']}, want {first['want']})"
                            if first else "")
                         + (f", {v['unverified_reads']} reads of blocks not written yet" if v["unverified_reads"]
                            else ""))
    n = rep["notifications"]
    lines.append(f"  ring: {rep['ring']}, queue size {rep['queue_size']}, kicks {n['kicks']} "
                 f"({n['kicks_suppressed']} suppressed), calls {n['calls']}, sleeps {n['sleeps']}")
    if rep["broken"] or (rep["then_read"] or {}).get("broken"):
        lines.append(f"  BACK-END FAULT: {rep['broken'] or rep['then_read']['broken']}")
    return "\n".join(lines)


def blk_load_main(args) -> int:
    """``vqscope load blk``: run the load, print the report (``--json``:
    one JSON object); 0 when it passed, 1 when :func:`report_failed`."""
    size = parse_size(args.size, "size") if args.size is not None else None
    with BlkLoad(args.connect, rw=args.rw, bs=parse_size(args.bs, "bs"), iodepth=args.iodepth,
                 queues=args.queues, size=size, rwmixread=args.rwmixread, verify=args.verify,
                 then_read=args.then_read, seed=args.seed, spin=args.spin, stall=args.stall,
                 packed=args.packed) as load:
        rep = load.run(args.seconds)
    print(json.dumps(rep) if args.json else format_report(rep, args.connect), flush=True)
    return 130 if rep["interrupted"] else 1 if report_failed(rep) else 0


__all__ = ["BlkLoad", "RW_MODES", "blk_load_main", "format_report", "parse_size",
           "report_failed"]
