"""What every vqscope probe shares besides its attach points
(probes/attach.py): the ``#define`` prelude the BPF C is configured with,
and a :class:`Probe` base class that compiles a BCC program once, attaches
what the kernel offers and reads the in-kernel aggregation (counters, log2
histograms) and the optional event stream.

The pure parts (``define_prelude``, ``Probe.plan``, ``Probe.ebpf_text``)
import neither BCC nor need root; ``Probe.attach`` needs root (CAP_BPF +
CAP_PERFMON) and BCC (Debian python3-bpfcc).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path

from inspector.errors import InspectorError
from inspector.events import Event, monotonic_to_realtime_ns

from .attach import NOT_ROOT, AttachPoint, KernelInfo, c_name, has_bpf_privilege, tracefs_events_dir


class ProbeError(InspectorError):
    """A probe that cannot be built or attached (BCC missing, compile
    error, attach refused)."""


class PrivilegeError(ProbeError):
    """Attaching needs root or CAP_BPF + CAP_PERFMON; the CLI exits 2."""


def ensure_tracefs() -> None:
    """Mount tracefs on /sys/kernel/tracing when no tracefs is mounted
    (BCC attaches tracepoints, kprobes and uprobes through it). Needs root;
    raises ProbeError saying how to mount it by hand."""
    if tracefs_events_dir() is not None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", b"/sys/kernel/tracing", b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise ProbeError(f"tracefs is not mounted and mounting it failed ({os.strerror(err)}): "
                         "run `mount -t tracefs tracefs /sys/kernel/tracing`")


# ------------------------------------------------------------------ C generation

def define_prelude(defines: dict[str, int | str | bool]) -> str:
    """``#define NAME VALUE`` lines, sorted, for the top of a BPF program.
    Booleans become 1/0 (use ``#if NAME``); ints are written in decimal
    (negative allowed); strings are pasted as they are."""
    lines = []
    for k in sorted(defines):
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", k):
            raise ProbeError(f"bad #define name {k!r}: upper-case C identifiers only")
        v = defines[k]
        if isinstance(v, bool):
            v = int(v)
        lines.append(f"#define {k} {v}")
    return "\n".join(lines) + "\n"


def counter_defines(names: list[str], prefix: str = "C_") -> dict[str, int]:
    """``{C_KICKS: 0, ..., NCOUNTERS: n}``: index of each counter in the
    program's ``u64 c[NCOUNTERS]`` array (one source of truth: Python)."""
    d = {prefix + n.upper(): i for i, n in enumerate(names)}
    d["NCOUNTERS"] = len(names)
    return d


HIST_NAMES = ["kick_to_handler_ns", "handler_run_ns", "used_to_call_ns"]


def log2_bucket_low(slot: int) -> int:
    """Lowest value of BCC's ``bpf_log2l`` slot: 0 for slot 0, else 2**(slot-1)."""
    return 0 if slot == 0 else 1 << (slot - 1)


def bpf_source(filename: str) -> str:
    """The text of ``probes/FILENAME`` (a ``.bpf.c`` or ``.bpf.h``)."""
    return Path(__file__).with_name(filename).read_text()


# ------------------------------------------------------------------ the probe base


class Probe:
    """Base of every probe: plan, generate, attach, read.

    Subclasses set ``name`` and ``COUNTERS`` (names of the in-kernel
    per-key counters) and ``EVENT_KINDS`` (inspector.events kinds in the
    order of the program's ``EV_*`` ids), and implement ``plan()``,
    ``defines()`` and ``_attach_point(bpf, ap)``.

    ``pids``: trace only these processes (thread-group ids), None for all;
    ``stream``: also deliver per-event records (``events()``) through a BPF
    ring buffer (a perf buffer when the kernel has none); ``kernel``: facts
    about the kernel (default: the running one).
    """

    name = "base"
    COUNTERS: list[str] = []
    EVENT_KINDS: list[str] = []
    MAX_PIDS = 64

    def __init__(self, pids: list[int] | None = None, stream: bool = False,
                 kernel: KernelInfo | None = None, ringbuf_pages: int = 256):
        self.pids = list(pids) if pids else None
        if self.pids and len(self.pids) > self.MAX_PIDS:
            raise ProbeError(f"{self.name}: at most {self.MAX_PIDS} pids, got {len(self.pids)}")
        self.stream = stream
        self.kernel = kernel if kernel is not None else KernelInfo.from_system()
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.points: list[AttachPoint] = []
        self._events: list[Event] = []
        self._lost_perf = 0
        self._lock = threading.Lock()
        self._use_ringbuf = self.kernel.has_ringbuf

    # ---- pure ------------------------------------------------------------
    def plan(self) -> list[AttachPoint]:
        """What would be attached on this kernel, and why not (no BPF)."""
        raise NotImplementedError

    def defines(self) -> dict[str, int | str | bool]:
        """The probe-specific #defines (offsets, symbol addresses, flags)."""
        raise NotImplementedError

    def common_defines(self) -> dict[str, int | str | bool]:
        d: dict[str, int | str | bool] = dict(counter_defines(self.COUNTERS))
        for i, k in enumerate(self.EVENT_KINDS):
            d[f"EV_{k.upper()}"] = i
        for i, h in enumerate(HIST_NAMES):
            d[f"H_{h.upper()}"] = i
        d["STREAM"] = self.stream
        d["USE_RINGBUF"] = self._use_ringbuf
        d["RINGBUF_PAGES"] = self.ringbuf_pages
        d["FILTER_PIDS"] = bool(self.pids)
        d["MAX_PIDS"] = self.MAX_PIDS
        for ap in self.plan():
            d[f"HAVE_{c_name(ap.kind, ap.wanted)}"] = ap.ok
        return d

    def ebpf_text(self) -> str:
        """The final BPF C: the #define prelude, then probes/NAME.bpf.c."""
        d = self.common_defines()
        d.update(self.defines())
        return (f"/* vqscope probe {self.name}: generated #defines, then {self.name}.bpf.c */\n"
                + define_prelude(d) + bpf_source("common.bpf.h") + "\n" + bpf_source(f"{self.name}.bpf.c"))

    # ---- live ------------------------------------------------------------
    def attach(self) -> list[AttachPoint]:
        """Compile the program once and attach every planned point; a point
        the kernel refuses is reported ``unavailable`` with the error, never
        fatal. Raises PrivilegeError without root/CAP_BPF, ProbeError when
        BCC is missing or the program does not compile."""
        if not has_bpf_privilege():
            raise PrivilegeError(f"probe {self.name}: {NOT_ROOT}; run as root")
        try:
            from bcc import BPF  # BCC (Debian python3-bpfcc): only to attach, as root
        except ImportError as e:
            raise ProbeError("BCC's Python binding is missing: install python3-bpfcc (make deps) and use a "
                             "venv made with --system-site-packages") from e
        ensure_tracefs()
        planned = self.plan()
        text = self.ebpf_text()
        try:
            self.bpf = BPF(text=text.encode(), cflags=["-Werror=macro-redefined", "-Wno-unused-function"])
        except Exception as e:  # BCC raises bare Exception on compile/load failure
            raise ProbeError(f"probe {self.name}: BPF program did not load: {e}") from e
        out = []
        for ap in planned:
            if not ap.ok:
                out.append(ap)
                continue
            try:
                self._attach_point(self.bpf, ap)
                out.append(ap)
            except Exception as e:
                last = (str(e).strip().splitlines() or ["?"])[-1][:160]  # not the whole verifier log
                out.append(AttachPoint(ap.probe, ap.kind, ap.wanted, ap.target, "unavailable",
                                       f"attach failed: {last}"))
        if self.pids:
            m = self.bpf[b"pid_filter"]
            for p in self.pids:
                m[ctypes.c_uint32(p)] = ctypes.c_uint8(1)
        if self.stream:
            if self._use_ringbuf:
                self.bpf[b"events"].open_ring_buffer(self._on_event)
            else:
                self.bpf[b"events"].open_perf_buffer(self._on_event, page_cnt=self.ringbuf_pages,
                                                    lost_cb=self._on_lost)
        self.points = out
        self._after_attach()
        return out

    def _after_attach(self) -> None:
        """Hook: fill maps after loading."""

    def _attach_point(self, bpf, ap: AttachPoint) -> None:
        fn = c_name(ap.kind, ap.wanted).lower().encode()
        target = ap.target.encode()
        if ap.kind == "kprobe":
            bpf.attach_kprobe(event=target, fn_name=fn)
        elif ap.kind == "kretprobe":
            bpf.attach_kretprobe(event=target, fn_name=fn, maxactive=64)
        elif ap.kind == "tracepoint":
            bpf.attach_tracepoint(tp=target, fn_name=fn)
        elif ap.kind in ("uprobe", "uretprobe"):
            lib, sym = target.rsplit(b":", 1)
            if ap.kind == "uprobe":
                bpf.attach_uprobe(name=lib, sym=sym, fn_name=fn)
            else:
                bpf.attach_uretprobe(name=lib, sym=sym, fn_name=fn)
        else:
            raise ProbeError(f"{ap.kind} attach points are not implemented")

    def _need(self):
        if self.bpf is None:
            raise ProbeError(f"probe {self.name}: not attached (call attach() first)")
        return self.bpf

    def counters(self) -> dict:
        """``{key: {counter: n}}`` summed over CPUs (in-kernel aggregation;
        cheap enough to read at the refresh rate)."""
        bpf = self._need()
        out = {}
        for k, v in bpf[b"counters"].items():
            tot = [0] * len(self.COUNTERS)
            for cpu in v:
                for i in range(len(self.COUNTERS)):
                    tot[i] += cpu.c[i]
            out[self._key(k)] = dict(zip(self.COUNTERS, tot))
        return out

    def histograms(self) -> dict:
        """``{key: {hist name: {bucket_low_ns: count}}}``, log2 buckets."""
        bpf = self._need()
        out: dict = {}
        for k, v in bpf[b"hists"].items():
            if not v.value:
                continue
            name = HIST_NAMES[k.hist]
            out.setdefault(self._key(k.key), {}).setdefault(name, {})[log2_bucket_low(k.slot)] = v.value
        return out

    def _key(self, k):
        """Python key of a counters/hists map key (default: the u64)."""
        return getattr(k, "value", k)

    def poll(self, timeout_ms: int = 0) -> None:
        """Drain the stream (ring/perf buffer) into the events() list."""
        if not self.stream:
            return
        bpf = self._need()
        if self._use_ringbuf:
            bpf.ring_buffer_poll(timeout_ms) if timeout_ms else bpf.ring_buffer_consume()
        else:
            bpf.perf_buffer_poll(timeout_ms)

    def events(self) -> list[Event]:
        """Events delivered since the previous call, oldest first (needs
        ``stream=True``)."""
        self.poll()
        with self._lock:
            ev, self._events = self._events, []
        return ev

    def lost(self) -> int:
        """Events the stream could not deliver (ring full, perf overrun),
        cumulative since attach()."""
        bpf = self._need()
        n = self._lost_perf
        for v in bpf[b"lost"].values():
            n += sum(int(x) for x in v)
        return n

    def _on_lost(self, n: int) -> None:
        self._lost_perf += n

    def _on_event(self, ctx, data, size) -> None:
        e = ctypes.cast(data, ctypes.POINTER(StreamRecord)).contents
        ev = self._event(e)
        if ev is not None:
            with self._lock:
                self._events.append(ev)

    def _event(self, rec: StreamRecord) -> Event | None:
        kind = self.EVENT_KINDS[rec.kind] if rec.kind < len(self.EVENT_KINDS) else f"kind{rec.kind}"
        return Event(monotonic_to_realtime_ns(rec.ts), self.device_name(rec.key), rec.queue, kind, rec.value)

    def device_name(self, key: int) -> str:
        return f"{self.name}:{key:#x}"

    def close(self) -> None:
        """Detach and free the program (idempotent)."""
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            finally:
                self.bpf = None

    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamRecord(ctypes.Structure):
    """``struct vqs_event`` of common.bpf.h: one stream record."""

    _fields_ = [("ts", ctypes.c_uint64), ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("pid", ctypes.c_uint32), ("kind", ctypes.c_uint16), ("queue", ctypes.c_int16)]


