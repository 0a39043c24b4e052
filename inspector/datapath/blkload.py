"""The driver side of one virtio-blk requestq under load, in C
(csrc/vqd_blkload.c; VIRTIO 1.2 §2.7, §5.2.6): the data path of
``vqscope load blk`` (inspector/tools/blk_load.py), who sets up the
vhost-user connection and guest memory and hands a ring with nothing in
flight to one :class:`BlkLoadQueue` per requestq.

:meth:`BlkLoadQueue.run` keeps ``iodepth`` requests in flight for a while
without the GIL (one Python thread per queue runs them in parallel) and
returns a :class:`BlkLoadResult` of counters and latency histograms. A
back-end that breaks the ring (a used id that is no request in flight, a
used length beyond the chain, used->idx too far ahead) or that completes
nothing for ``stall`` seconds ends the run: :attr:`BlkLoadResult.broken`
says what it did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._cffi import check, ffi, lib
from ..errors import ArgumentError

#: Offset orders (csrc/vqd_blkload.h).
SEQUENTIAL = lib.VQD_BL_SEQ
RANDOM = lib.VQD_BL_RANDOM
HIST_BUCKETS = lib.VQD_BL_HIST_BUCKETS
MAX_SLOTS = lib.VQD_BL_MAX_SLOTS

#: Counters of struct vqd_blkload copied into a result (and summed over queues).
COUNTERS = ("submitted", "completed", "reads", "writes", "fills", "bytes_read", "bytes_written",
            "status_ok", "status_ioerr", "status_unsupp", "status_other", "used_len_short",
            "verified_sectors", "mismatched_sectors", "unverified_reads", "kicks", "kicks_suppressed",
            "calls", "sleeps")


def bucket_low(bucket: int) -> int:
    """The smallest latency (ns) that falls in histogram ``bucket``."""
    return int(lib.vqd_blkload_bucket_low(bucket))


def sector_pattern(sector: int, nsectors: int, seed: int) -> bytes:
    """The ``--verify`` pattern of ``nsectors`` 512-byte sectors from
    ``sector`` (what a verified write puts there and a verified read wants)."""
    buf = ffi.new("uint8_t[]", 512 * nsectors)
    lib.vqd_blkload_pattern(buf, sector, nsectors, seed & (2**64 - 1))
    return bytes(ffi.buffer(buf))


@dataclass
class Latency:
    """Completion latencies of one direction (or of several, from
    :meth:`merge`): ``n`` completions, ``min_ns``/``max_ns``/``sum_ns`` and
    ``hist`` (per-bucket counts, :func:`bucket_low`)."""

    n: int = 0
    min_ns: int = 0
    max_ns: int = 0
    sum_ns: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)

    @classmethod
    def from_c(cls, lat) -> "Latency":
        return cls(int(lat.n), int(lat.min_ns) if lat.n else 0, int(lat.max_ns), int(lat.sum_ns), list(lat.hist))

    @classmethod
    def merge(cls, parts: list["Latency"]) -> "Latency":
        some = [p for p in parts if p.n]
        return cls(sum(p.n for p in some), min((p.min_ns for p in some), default=0),
                   max((p.max_ns for p in some), default=0), sum(p.sum_ns for p in some),
                   [sum(col) for col in zip(*(p.hist for p in parts))] if parts else [0] * HIST_BUCKETS)

    @property
    def avg_ns(self) -> float:
        return self.sum_ns / self.n if self.n else 0.0

    def percentile_ns(self, p: float) -> int:
        """The latency (ns) below which ``p`` percent of completions fall:
        the middle of its histogram bucket (1/16 relative error at most),
        clamped to [min, max]. 0 when nothing completed."""
        total = sum(self.hist)
        if not total:
            return 0
        want = max(1, -(-total * p // 100))
        seen = 0
        for b, n in enumerate(self.hist):
            seen += n
            if seen >= want:
                lo, hi = bucket_low(b), bucket_low(b + 1)
                mid = lo if hi - lo <= 1 else (lo + hi) // 2
                return max(self.min_ns, min(self.max_ns, mid))
        return self.max_ns


@dataclass
class BlkLoadResult:
    """What one run did on one queue (or, from :meth:`merge`, on all):
    the counters of :data:`COUNTERS`, ``elapsed_ns`` (wall time, drain
    included), the latencies of reads and of writes (``lat_read``,
    ``lat_write``; :attr:`lat` both), the first verify mismatch
    (``first_mismatch``: sector, 8-byte word got, word wanted), ``broken``
    (None, or what the back-end did wrong) and the requests still
    ``in_flight`` when the run ended (0 unless broken)."""

    counters: dict[str, int]
    elapsed_ns: int
    lat_read: Latency
    lat_write: Latency
    first_mismatch: tuple[int, int, int] | None = None
    broken: str | None = None
    in_flight: int = 0

    @property
    def lat(self) -> Latency:
        return Latency.merge([self.lat_read, self.lat_write])

    @classmethod
    def merge(cls, results: list["BlkLoadResult"]) -> "BlkLoadResult":
        """The sum of per-queue results run at the same time (elapsed: the
        longest; the first mismatch and the broken reasons of any)."""
        return cls({k: sum(r.counters[k] for r in results) for k in COUNTERS},
                   max((r.elapsed_ns for r in results), default=0),
                   Latency.merge([r.lat_read for r in results]), Latency.merge([r.lat_write for r in results]),
                   next((r.first_mismatch for r in results if r.first_mismatch), None),
                   "; ".join(f"queue {i}: {r.broken}" for i, r in enumerate(results) if r.broken) or None,
                   sum(r.in_flight for r in results))


class BlkLoadQueue:
    """One requestq driven by the C engine.

    ``mem_addr``/``mem_size``: the host address and size of guest memory
    (guest-physical 0 is ``mem_addr``; the caller keeps it mapped);
    ``ring``: (queue size, desc gpa, avail gpa, used gpa, avail idx, last
    used idx) of a split ring, or with ``packed``: (queue size, descriptor
    ring gpa, driver event suppression gpa, device event suppression gpa,
    next avail slot, next used slot), and ``wraps`` (avail, used wrap
    counters); ``slots``: ``iodepth`` tuples (header gpa, status gpa, data
    gpa), the data ``bs`` bytes long; ``seg_size``: longest data descriptor
    (the back-end's size_max); ``region``: (first sector, blocks of ``bs``);
    ``read_pct``: percent of requests that are IN; ``order``:
    :data:`SEQUENTIAL` or :data:`RANDOM`; ``verify``: writes carry
    :func:`sector_pattern`, reads are checked against it (with ``track``,
    only reads of blocks this queue wrote before; ``fill``: after the timed
    part, write every block not yet written); ``spin``: empty polls before
    sleeping on ``call_fd``; ``stall``: seconds without a completion that
    end the run; ``conn_fd``: the vhost-user socket, whose hang-up (seen
    while waiting) ends the run. ArgumentError names a bad parameter."""

    def __init__(self, mem_addr: int, mem_size: int, ring: tuple[int, int, int, int, int, int], *,
                 event_idx: bool, kick_fd: int, call_fd: int, slots: list[tuple[int, int, int]], bs: int,
                 seg_size: int, region: tuple[int, int], read_pct: int, order: int, seed: int = 0,
                 verify: bool = False, track: bool = False, fill: bool = False, max_ios: int = 0,
                 spin: int = 64, stall: float = 10.0, conn_fd: int = -1, packed: bool = False,
                 wraps: tuple[int, int] = (1, 1)):
        self.bl = bl = ffi.new("struct vqd_blkload *")
        self._slots = ffi.new("struct vqd_bl_slot[]", max(len(slots), 1))
        self._free = ffi.new("uint32_t[]", max(len(slots), 1))
        for i, (hdr, status, data) in enumerate(slots):
            self._slots[i].hdr_gpa, self._slots[i].status_gpa, self._slots[i].data_gpa = hdr, status, data
        blocks = region[1]
        self._written = ffi.new("uint8_t[]", (blocks + 7) // 8) if track else ffi.NULL
        bl.mem = ffi.cast("uint8_t *", mem_addr)
        bl.mem_size = mem_size
        (bl.num, bl.desc_gpa, bl.avail_gpa, bl.used_gpa, bl.avail_idx, bl.last_used_idx) = ring
        bl.packed, (bl.avail_wrap, bl.used_wrap) = bool(packed), wraps
        bl.event_idx = bool(event_idx)
        bl.kick_fd, bl.call_fd, bl.conn_fd = kick_fd, call_fd, conn_fd
        bl.slots, bl.iodepth, bl.bs, bl.seg_size = self._slots, len(slots), bs, seg_size
        bl.region_sector, bl.region_blocks = region
        bl.read_pct, bl.pattern, bl.seed = read_pct, order, seed & (2**64 - 1)
        bl.verify, bl.fill, bl.written, bl.max_ios = bool(verify), bool(fill and track), self._written, max_ios
        bl.spin, bl.stall_ns = spin, int(stall * 1e9)
        rc = lib.vqd_blkload_init(bl, self._free)
        if rc == lib.VQD_E_INVAL:
            raise ArgumentError(f"load blk: {ffi.string(bl.reason).decode(errors='replace')}")
        check(rc, "load blk: setting up the requestq", ffi.string(bl.reason).decode(errors="replace"))

    @property
    def descs_per_request(self) -> int:
        return self.bl.descs_per_slot

    @property
    def ring_indices(self) -> tuple[int, int]:
        """(avail idx, last used idx) as the engine left them."""
        return self.bl.avail_idx, self.bl.last_used_idx

    def set_mode(self, *, read_pct: int, order: int, max_ios: int = 0, track: bool | None = None,
                 fill: bool = False) -> None:
        """Change what the next :meth:`run` does (e.g. a read-back pass:
        read_pct 100, SEQUENTIAL, max_ios = the region's blocks, track
        False: check every read)."""
        bl = self.bl
        bl.read_pct, bl.pattern, bl.max_ios, bl.fill = read_pct, order, max_ios, fill
        if track is not None:
            bl.written = self._written if track else ffi.NULL
        bl.cursor_ = bl.fill_cursor_ = 0

    def stop(self) -> None:
        """Make a :meth:`run` in another thread stop submitting and drain
        (e.g. on Ctrl-C); safe from any thread."""
        self.bl.stop = 1

    def run(self, seconds: float) -> BlkLoadResult:
        """Keep the queue full for ``seconds`` (then fill and drain), without
        the GIL; the result counts this run only."""
        lib.vqd_blkload_run(self.bl, int(seconds * 1e9))
        return self.result()

    def result(self) -> BlkLoadResult:
        """The counters of the last run."""
        bl = self.bl
        broken = ffi.string(bl.reason).decode(errors="replace") if bl.broken else None
        return BlkLoadResult({k: int(getattr(bl, k)) for k in COUNTERS}, int(bl.elapsed_ns),
                             Latency.from_c(bl.lat[0]), Latency.from_c(bl.lat[1]),
                             (int(bl.first_mismatch_sector), int(bl.mismatch_got), int(bl.mismatch_want))
                             if bl.mismatched_sectors else None, broken, int(bl.in_flight))
