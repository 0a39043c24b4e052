"""Attach points: what a probe wants to attach (kprobe, tracepoint, uprobe),
what the running kernel offers, and why a point is unavailable.

Pure functions of kernel facts (``/proc/kallsyms``, tracefs formats, BTF
presence; :class:`KernelInfo` gathers them once): they import neither BCC
nor need root, so ``vqscope probe --list`` and the unit tests run anywhere.
The rule, after BCC's tools (biolatency picks kprobe or tracepoint by what
``get_kprobe_functions`` finds): attach what the kernel has, report the rest
with a reason, never fail on a missing function. Compiler clones
(``.constprop``/``.isra``) are resolved, and trusted for argument reads only
where the argument keeps its place (:func:`clone_args_trusted`).
"""

from __future__ import annotations

import ctypes.util
import os
import re
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NO_KPROBES = "no kprobes in this kernel (CONFIG_KPROBES unset)"


NOT_FOUND = "function not found in /proc/kallsyms (inlined or renamed)"


NOT_ROOT = "not root (needs CAP_BPF and CAP_PERFMON)"


CLONE_ARGS = "clone with changed arguments"


NO_TRACEPOINT = "tracepoint not in this kernel"


NO_UPROBE_LIB = "library not found"


def no_btf_reason(module: str, btf_dir: str = "/sys/kernel/btf") -> str:
    what = "the kernel" if module == "vmlinux" else f"module {module}"
    return f"no BTF for {what} ({btf_dir}/{module} missing)"


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


def c_name(kind: str, wanted: str) -> str:
    """C function / #define stem of an attach point: ``KPROBE_VHOST_NOTIFY``,
    ``TRACEPOINT_SYS_ENTER_WRITE``, ``UPROBE_EVENTFD_WRITE``."""
    w = wanted.split(":")[-1]
    return re.sub(r"[^A-Za-z0-9]", "_", f"{kind}_{w}").upper()


def print_points(points: list[AttachPoint], file=None) -> None:
    """The ``probe --list`` table, under 80 columns."""
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
