"""What every vqscope probe shares: attach points and the reasons they are
unavailable, kernel symbol resolution, the choice of attach point, the
``#define`` prelude, and a :class:`Probe` base class that compiles a BCC
program once, attaches what the kernel offers and reads the in-kernel
aggregation (counters, log2 histograms) and the optional event stream.

The pure parts (``parse_kallsyms``, ``resolve_symbol``, ``choose_kprobe``,
``KernelInfo.from_texts``, ``define_prelude``, ``Probe.plan``,
``Probe.ebpf_text``) import neither BCC nor need root; ``Probe.attach``
needs root (CAP_BPF + CAP_PERFMON) and BCC (Debian python3-bpfcc).

Conventions taken from BCC's tools (biolatency picks kprobe or tracepoint by
what ``get_kprobe_functions`` finds): attach what the running kernel has,
report the rest with a reason, never fail on a missing function.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from inspector.errors import InspectorError
from inspector.events import Event, monotonic_to_realtime_ns

# ------------------------------------------------------------------ reasons
NO_KPROBES = "no kprobes in this kernel (CONFIG_KPROBES unset)"
NOT_FOUND = "function not found in /proc/kallsyms (inlined or renamed)"
NOT_ROOT = "not root (needs CAP_BPF and CAP_PERFMON)"
CLONE_ARGS = "clone with changed arguments"
NO_TRACEPOINT = "tracepoint not in this kernel"
NO_UPROBE_LIB = "library not found"


def no_btf_reason(module: str, btf_dir: str = "/sys/kernel/btf") -> str:
    what = "the kernel" if module == "vmlinux" else f"module {module}"
    return f"no BTF for {what} ({btf_dir}/{module} missing)"


class ProbeError(InspectorError):
    """A probe that cannot be built or attached (BCC missing, compile
    error, attach refused)."""


class PrivilegeError(ProbeError):
    """Attaching needs root or CAP_BPF + CAP_PERFMON; the CLI exits 2."""


@dataclass(frozen=True)
class AttachPoint:
    """One place a probe hooks into.

    - ``probe``: ``vhost_net`` | ``eventfd`` | ``vhost_ioctl``
    - ``kind``: ``kprobe`` | ``kretprobe`` | ``fentry`` | ``tracepoint`` | ``uprobe``
    - ``wanted``: the function or tracepoint asked for (``vhost_notify``)
    - ``target``: what it resolved to (``vhost_notify.constprop.0``,
      ``syscalls:sys_enter_ioctl``, ``/lib/x86_64-linux-gnu/libc.so.6:eventfd_write``);
      empty when nothing resolved
    - ``status``: ``attached`` | ``unavailable`` (from ``plan()``:
      ``attached`` means "would attach")
    - ``reason``: empty, or why it is unavailable
    """

    probe: str
    kind: str
    wanted: str
    target: str
    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "attached"

    def as_dict(self) -> dict:
        return {"probe": self.probe, "kind": self.kind, "wanted": self.wanted, "target": self.target,
                "status": self.status, "reason": self.reason}


# ------------------------------------------------------------------ kernel facts

_CLONE = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*)(?P<suffix>(?:\.(?:constprop|isra|part|llvm)\.\d+)+)$")


def parse_kallsyms(text: str) -> dict[str, tuple[int, str]]:
    """Text symbols of a ``/proc/kallsyms`` text: ``{name: (address,
    module)}`` (module ``""`` for vmlinux). Only code (types ``t``/``T``) is
    kept; addresses are 0 when read without privilege. ``.cold`` parts are
    not entry points and are dropped."""
    out: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[1] not in ("t", "T"):
            continue
        name = parts[2]
        if ".cold" in name:
            continue
        mod = parts[3].strip("[]") if len(parts) > 3 else ""
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        out.setdefault(name, (addr, mod))
    return out


def resolve_symbol(name: str, symbols: dict[str, tuple[int, str]]) -> tuple[str | None, str]:
    """The symbol to attach to for function ``name``: the plain symbol when
    present (suffix ``""``), else the first compiler clone
    (``name.constprop.0``, ``name.isra.0``, ``name.part.0``; suffix like
    ``.constprop.0``), else ``(None, "")`` (inlined or renamed)."""
    if name in symbols:
        return name, ""
    clones = []
    for s in symbols:
        m = _CLONE.match(s)
        if m and m.group("base") == name:
            clones.append((m.group("suffix"), s))
    if not clones:
        return None, ""
    clones.sort(key=lambda c: (".isra" in c[0], ".part" in c[0], c[1]))
    return clones[0][1], clones[0][0]


def clone_args_trusted(suffix: str, arg_index: int | None) -> bool:
    """Whether a clone's argument ``arg_index`` (the source position of the
    pointer we read) can be read from the same register as in the source.

    - no suffix: yes;
    - no argument read (``arg_index`` None, e.g. a kretprobe): yes;
    - ``.constprop``: GCC drops parameters that are constant *or unused*
      (``vhost_notify(dev, vq)`` became ``vhost_notify.constprop.0(vq)`` on
      Debian 6.1), so only the first parameter keeps its register;
    - ``.isra`` (scalar replacement may pass a pointer's fields instead) and
      ``.part`` (an outlined part takes whatever it needs): never.
    """
    if not suffix or arg_index is None:
        return True
    if ".isra" in suffix or ".part" in suffix or ".llvm" in suffix:
        return False
    return arg_index == 0


def has_bpf_privilege() -> bool:
    """Root, or CAP_SYS_ADMIN, or CAP_BPF together with CAP_PERFMON in the
    effective set (/proc/self/status CapEff)."""
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return bool(eff >> 21 & 1) or (bool(eff >> 39 & 1) and bool(eff >> 38 & 1))
    except OSError:
        pass
    return False


TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_events_dir() -> Path | None:
    for d in TRACEFS:
        p = Path(d) / "events"
        try:
            if p.is_dir():
                return p
        except OSError:  # not root: tracefs is mode 0700
            continue
    return None


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


def syscall_field_offset(category_event: str, field_name: str, default: int = 16) -> int:
    """Offset of ``field_name`` in a tracepoint's record, from its tracefs
    ``format`` file (``field:unsigned int fd; offset:16; ...``); ``default``
    (the syscall tracepoints' ABI: args/ret at 16) when tracefs is not
    readable."""
    d = tracefs_events_dir()
    if d is None:
        return default
    cat, ev = category_event.split(":", 1)
    try:
        text = (d / cat / ev / "format").read_text()
    except OSError:
        return default
    return parse_format_offset(text, field_name, default)


def parse_format_offset(text: str, field_name: str, default: int = 16) -> int:
    """Offset of ``field_name`` in a tracefs ``format`` text."""
    m = re.search(r"field:[^;]*[\s*]" + re.escape(field_name) + r";\s*offset:(\d+);", text)
    return int(m.group(1)) if m else default


@dataclass
class KernelInfo:
    """What a probe needs to know about the kernel it runs on.

    ``symbols``: text symbols from /proc/kallsyms (``parse_kallsyms``);
    ``has_kprobes``: CONFIG_KPROBES (``register_kprobe`` in kallsyms);
    ``is_root``: may load BPF; ``btf_dir``: where module BTF lives;
    ``tracepoints``: None (unknown: tracefs not mounted) or the set of
    ``category:event`` names present; ``has_ringbuf``: BPF ring buffers
    (5.8+, ``bpf_ringbuf_output`` in kallsyms).
    """

    symbols: dict[str, tuple[int, str]]
    has_kprobes: bool
    is_root: bool
    btf_dir: str = "/sys/kernel/btf"
    tracepoints: set[str] | None = None
    has_ringbuf: bool = True

    @classmethod
    def from_texts(cls, kallsyms: str, *, is_root: bool, btf_dir: str = "/sys/kernel/btf",
                   tracepoints: set[str] | None = None) -> KernelInfo:
        """From a kallsyms text (pure; used by tests with saved texts)."""
        syms = parse_kallsyms(kallsyms)
        # register_kprobe is exported code on every kernel built with kprobes.
        has_kp = "register_kprobe" in syms
        has_rb = "bpf_ringbuf_output" in syms or "bpf_ringbuf_reserve" in syms
        return cls(syms, has_kp, is_root, btf_dir, tracepoints, has_rb)

    @classmethod
    def from_system(cls) -> KernelInfo:
        """The running kernel (reads /proc/kallsyms; no BPF)."""
        try:
            text = Path("/proc/kallsyms").read_text()
        except OSError:
            text = ""
        tps = None
        d = tracefs_events_dir()
        if d is not None:
            tps = set()
            for cat in ("syscalls",):
                p = d / cat
                if p.is_dir():
                    tps.update(f"{cat}:{e.name}" for e in p.iterdir())
        return cls.from_texts(text, is_root=has_bpf_privilege(), tracepoints=tps)

    def has_btf(self, module: str) -> bool:
        return Path(self.btf_dir, module).exists()

    def address(self, name: str) -> int:
        return self.symbols.get(name, (0, ""))[0]


def choose_kprobe(probe: str, kind: str, wanted: str, kinfo: KernelInfo, *,
                  arg_index: int | None = None, btf_modules: Iterable[str] = ()) -> AttachPoint:
    """Attach point for function ``wanted`` as a ``kprobe``/``kretprobe``.

    ``arg_index`` is the source position of the pointer argument the probe
    reads at entry (None when it reads none); ``btf_modules`` the modules
    whose BTF the probe's offsets come from. Reasons, in order: no kprobes,
    function not found, clone with changed arguments, no BTF, not root."""
    if not kinfo.has_kprobes:
        return AttachPoint(probe, kind, wanted, "", "unavailable", NO_KPROBES)
    target, suffix = resolve_symbol(wanted, kinfo.symbols)
    if target is None:
        return AttachPoint(probe, kind, wanted, "", "unavailable", NOT_FOUND)
    if kind == "kprobe" and not clone_args_trusted(suffix, arg_index):
        return AttachPoint(probe, kind, wanted, target, "unavailable",
                           f"{CLONE_ARGS} ({target}; argument {arg_index} of the source cannot be trusted)")
    for m in btf_modules:
        if not kinfo.has_btf(m):
            return AttachPoint(probe, kind, wanted, target, "unavailable", no_btf_reason(m, kinfo.btf_dir))
    if not kinfo.is_root:
        return AttachPoint(probe, kind, wanted, target, "unavailable", NOT_ROOT)
    return AttachPoint(probe, kind, wanted, target, "attached")


def choose_tracepoint(probe: str, tp: str, kinfo: KernelInfo) -> AttachPoint:
    """Attach point for tracepoint ``category:event``."""
    if kinfo.tracepoints is not None and tp not in kinfo.tracepoints:
        return AttachPoint(probe, "tracepoint", tp, "", "unavailable", NO_TRACEPOINT)
    if not kinfo.is_root:
        return AttachPoint(probe, "tracepoint", tp, tp, "unavailable", NOT_ROOT)
    return AttachPoint(probe, "tracepoint", tp, tp, "attached")


def find_libc() -> str | None:
    """The C library's path (ld.so cache), e.g. /lib/x86_64-linux-gnu/libc.so.6."""
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"):
        p = Path(d, name)
        if p.exists():
            return str(p)
    return name if os.path.isabs(name) else None


def choose_uprobe(probe: str, lib: str | None, sym: str, kinfo: KernelInfo, kind: str = "uprobe") -> AttachPoint:
    if lib is None:
        return AttachPoint(probe, kind, sym, "", "unavailable", f"{NO_UPROBE_LIB} (libc)")
    if not kinfo.is_root:
        return AttachPoint(probe, kind, sym, f"{lib}:{sym}", "unavailable", NOT_ROOT)
    return AttachPoint(probe, kind, sym, f"{lib}:{sym}", "attached")


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
            d[f"HAVE_{_cname(ap.kind, ap.wanted)}"] = ap.ok
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
            from bcc import BPF
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
        fn = _cname(ap.kind, ap.wanted).lower().encode()
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


def _cname(kind: str, wanted: str) -> str:
    """C function / #define stem of an attach point: ``KPROBE_VHOST_NOTIFY``,
    ``TRACEPOINT_SYS_ENTER_WRITE``, ``UPROBE_EVENTFD_WRITE``."""
    w = wanted.split(":")[-1]
    return re.sub(r"[^A-Za-z0-9]", "_", f"{kind}_{w}").upper()


def print_points(points: list[AttachPoint], file=None) -> None:
    """The ``probe --list`` table, under 80 columns."""
    import sys
    import textwrap

    f = file or sys.stdout
    print(f"{'PROBE':<12}{'KIND':<11}{'POINT':<31}STATUS", file=f)
    for ap in points:
        where = ap.wanted if ap.target in ("", ap.wanted) else ap.target
        if ap.kind == "uprobe":
            where = "libc:" + ap.wanted
        print(f"{ap.probe:<12}{ap.kind:<11}{where[:30]:<31}{ap.status}", file=f)
        if ap.reason:
            for line in textwrap.wrap(ap.reason, 74):
                print(f"{'':6}{line}", file=f)
