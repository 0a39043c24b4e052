"""vhost_ioctl probe: the vhost ioctls a process (QEMU, a test harness)
sends on a ``/dev/vhost-net`` fd, with their arguments read from its memory
(``syscalls:sys_enter_ioctl``/``sys_exit_ioctl``; works on every kernel
with syscall tracepoints, kprobes not needed).

From them :meth:`VhostIoctlProbe.devices` keeps, per ``(pid, fd)``, the
memory table, each vring's num/addresses/base/kick/call/backend fd and the
``VHOST_GET_VRING_BASE`` result — so vqscope finds a vhost-net queue's
rings without QMP. ioctl numbers and argument layouts are the UAPI's
(include/uapi/linux/vhost.h, vhost_types.h): a user ABI, not a kernel
struct, so they are spelled out here.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field

from inspector.spec.vhost import (VHOST_IOCTL_NAMES, VHOST_MEM_MAX_NREGIONS, VHOST_MEMORY,
                                  VHOST_MEMORY_REGION, VHOST_VIRTIO, VHOST_VRING_ADDR, VHOST_VRING_FILE,
                                  VHOST_VRING_STATE)
from inspector.events import Event, monotonic_to_realtime_ns

from .attach import AttachPoint, KernelInfo, choose_tracepoint, syscall_field_offset
from .base import Probe

# The UAPI's numbers and layouts: inspector.spec.vhost.
IOCTLS: dict[int, str] = VHOST_IOCTL_NAMES
NUMBERS = {v: k for k, v in IOCTLS.items()}
MAX_REGIONS = VHOST_MEM_MAX_NREGIONS
REGION_SIZE = VHOST_MEMORY_REGION.size
IOCTL_ARG_MAX = 8 + MAX_REGIONS * REGION_SIZE
IOCTL_ARG_BUF = 1 << IOCTL_ARG_MAX.bit_length()   # power of two > IOCTL_ARG_MAX: lengths are masked with it - 1


@dataclass(frozen=True)
class MemRegion:
    """One ``struct vhost_memory_region``: guest-physical start, size (bytes),
    and where it is mapped in the owner (user address)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int


@dataclass
class VhostVringState:
    """What the owner told vhost about one vring (``None``: not set yet).
    ``desc``/``avail``/``used`` are user addresses in the owner's mm;
    ``log`` the log's guest address; ``base`` the last SET_VRING_BASE, and
    ``last_avail_idx`` the last GET_VRING_BASE result (vhost's index when
    the ring stopped)."""

    index: int
    num: int | None = None
    desc: int | None = None
    avail: int | None = None
    used: int | None = None
    log: int | None = None
    flags: int | None = None
    base: int | None = None
    last_avail_idx: int | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    backend_fd: int | None = None


@dataclass
class VhostDevState:
    """One vhost fd of one process, as its ioctls configured it."""

    pid: int
    fd: int
    owner_set: bool = False
    features: int | None = None
    mem_table: list[MemRegion] = field(default_factory=list)
    vrings: dict[int, VhostVringState] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ioctls: int = 0

    def vring(self, index: int) -> VhostVringState:
        return self.vrings.setdefault(index, VhostVringState(index))


@dataclass(frozen=True)
class IoctlRecord:
    """One vhost ioctl as the probe saw it: ``name`` (``VHOST_SET_VRING_ADDR``),
    ``ret`` (0 or -errno), ``data`` the argument bytes after the call."""

    time_ns: int
    pid: int
    fd: int
    cmd: int
    name: str
    ret: int
    data: bytes


def apply_ioctl(dev: VhostDevState, rec: IoctlRecord) -> None:
    """Update ``dev`` with one ioctl (only successful ones change state; a
    failed one is noted in ``dev.errors``). Pure: the unit tests feed it
    literal records."""
    if rec.ret < 0:
        dev.errors.append(f"{rec.name} failed: errno {-rec.ret}")
        return
    d, n = rec.data, rec.name
    if n == "VHOST_SET_OWNER":
        dev.owner_set = True
    elif n == "VHOST_RESET_OWNER":
        dev.owner_set = False
        dev.mem_table = []
        dev.vrings = {}
    elif n in ("VHOST_SET_FEATURES", "VHOST_GET_FEATURES") and len(d) >= 8:
        dev.features = struct.unpack_from("<Q", d)[0]
    elif n == "VHOST_SET_MEM_TABLE" and len(d) >= 8:
        nreg = VHOST_MEMORY.unpack_from(d)[0]
        have = (len(d) - 8) // REGION_SIZE
        regs = []
        for i in range(min(nreg, have)):
            gpa, size, uva, _ = VHOST_MEMORY_REGION.unpack_from(d, 8 + i * REGION_SIZE)
            regs.append(MemRegion(gpa, size, uva))
        dev.mem_table = regs
        if nreg > have:
            dev.errors.append(f"VHOST_SET_MEM_TABLE: {nreg} regions, only the first {have} read "
                              f"(MAX_REGIONS {MAX_REGIONS})")
    elif n == "VHOST_SET_VRING_NUM" and len(d) >= 8:
        idx, num = VHOST_VRING_STATE.unpack_from(d)
        dev.vring(idx).num = num
    elif n == "VHOST_SET_VRING_ADDR" and len(d) >= 40:
        idx, flags, desc, used, avail, log = VHOST_VRING_ADDR.unpack_from(d)
        v = dev.vring(idx)
        v.flags, v.desc, v.used, v.avail, v.log = flags, desc, used, avail, log
    elif n == "VHOST_SET_VRING_BASE" and len(d) >= 8:
        idx, num = VHOST_VRING_STATE.unpack_from(d)
        dev.vring(idx).base = num
    elif n == "VHOST_GET_VRING_BASE" and len(d) >= 8:
        idx, num = VHOST_VRING_STATE.unpack_from(d)
        dev.vring(idx).last_avail_idx = num
    elif n in ("VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_SET_VRING_ERR",
               "VHOST_NET_SET_BACKEND") and len(d) >= 8:
        idx, fd = VHOST_VRING_FILE.unpack_from(d)
        attr = {"VHOST_SET_VRING_KICK": "kick_fd", "VHOST_SET_VRING_CALL": "call_fd",
                "VHOST_SET_VRING_ERR": "err_fd", "VHOST_NET_SET_BACKEND": "backend_fd"}[n]
        setattr(dev.vring(idx), attr, None if fd == -1 else fd)


class _Rec(ctypes.Structure):
    _fields_ = [("ts", ctypes.c_uint64), ("arg", ctypes.c_uint64), ("ret", ctypes.c_int64),
                ("pid", ctypes.c_uint32), ("fd", ctypes.c_uint32), ("cmd", ctypes.c_uint32),
                ("len", ctypes.c_uint32), ("data", ctypes.c_uint8 * IOCTL_ARG_BUF)]


def _possible_cpus() -> int:
    """CPUs the kernel may bring up (/sys/devices/system/cpu/possible,
    e.g. ``0-7``); scratch space is per CPU."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
        return int(text.split(",")[-1].split("-")[-1]) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 64


class VhostIoctlProbe(Probe):
    """Follows the vhost ioctls of ``pids`` (all processes when None).

    ``devices()`` → ``{(pid, fd): VhostDevState}``; ``records()`` → the
    IoctlRecords seen since the last call; ``events()`` (``stream=True``) →
    ``Event(t, "vhost-net:PID:FD", vring index or -1, "ioctl", cmd)``.
    """

    name = "vhost_ioctl"
    COUNTERS = ["ioctls"]
    EVENT_KINDS = ["ioctl"]
    TRACEPOINTS = ["syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl"]

    def __init__(self, pids: list[int] | None = None, stream: bool = False, kernel: KernelInfo | None = None,
                 **kw):
        super().__init__(pids, stream, kernel, **kw)
        self._devs: dict[tuple[int, int], VhostDevState] = {}
        self._records: list[IoctlRecord] = []

    def plan(self) -> list[AttachPoint]:
        return [choose_tracepoint(self.name, tp, self.kernel) for tp in self.TRACEPOINTS]

    def defines(self) -> dict[str, int | str | bool]:
        return {"SYSCALL_ARGS_OFF": syscall_field_offset("syscalls:sys_enter_ioctl", "fd"),
                "SYSCALL_RET_OFF": syscall_field_offset("syscalls:sys_exit_ioctl", "ret"),
                "VHOST_VIRTIO": VHOST_VIRTIO, "VHOST_SET_MEM_TABLE": NUMBERS["VHOST_SET_MEM_TABLE"],
                "MAX_REGIONS": MAX_REGIONS, "REGION_SIZE": REGION_SIZE, "IOCTL_ARG_MAX": IOCTL_ARG_MAX, "IOCTL_ARG_BUF": IOCTL_ARG_BUF,
                "NR_CPUS_MAX": _possible_cpus()}

    def _after_attach(self) -> None:
        if self._use_ringbuf:
            self.bpf[b"ioctls"].open_ring_buffer(self._on_ioctl)
        else:
            self.bpf[b"ioctls"].open_perf_buffer(self._on_ioctl, page_cnt=self.ringbuf_pages,
                                                lost_cb=self._on_lost)

    def _on_ioctl(self, ctx, data, size) -> None:
        r = ctypes.cast(data, ctypes.POINTER(_Rec)).contents
        rec = IoctlRecord(monotonic_to_realtime_ns(r.ts), r.pid, r.fd, r.cmd,
                          IOCTLS.get(r.cmd, f"VHOST_{r.cmd:#x}"), r.ret, bytes(r.data[:r.len]))
        with self._lock:
            dev = self._devs.setdefault((rec.pid, rec.fd), VhostDevState(rec.pid, rec.fd))
            dev.ioctls += 1
            apply_ioctl(dev, rec)
            self._records.append(rec)
            if self.stream:
                q = struct.unpack_from("<I", rec.data)[0] if len(rec.data) >= 4 and "VRING" in rec.name \
                    or rec.name == "VHOST_NET_SET_BACKEND" else -1
                self._events.append(Event(rec.time_ns, f"vhost-net:{rec.pid}:{rec.fd}", q, "ioctl", rec.cmd))

    def poll(self, timeout_ms: int = 0) -> None:
        bpf = self._need()
        if self._use_ringbuf:
            bpf.ring_buffer_poll(timeout_ms) if timeout_ms else bpf.ring_buffer_consume()
        else:
            bpf.perf_buffer_poll(timeout_ms)

    def devices(self) -> dict[tuple[int, int], VhostDevState]:
        """``{(pid, fd): VhostDevState}`` from every vhost ioctl seen so far
        (drains the ring buffer first)."""
        self.poll()
        with self._lock:
            return dict(self._devs)

    def records(self) -> list[IoctlRecord]:
        """The ioctls seen since the previous call, oldest first."""
        self.poll()
        with self._lock:
            r, self._records = self._records, []
        return r

    def counters(self) -> dict:
        """``{(pid, fd): {"ioctls": n}}`` (kept in Python: ioctls are rare)."""
        self.poll()
        with self._lock:
            return {k: {"ioctls": d.ioctls} for k, d in self._devs.items()}

    def histograms(self) -> dict:
        return {}

    def events(self) -> list[Event]:
        self.poll()
        with self._lock:
            ev, self._events = self._events, []
        return ev
