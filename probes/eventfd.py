"""eventfd probe: kicks (driver→device notifications, VIRTIO 1.2 §2.7.13)
and calls (device→driver, §2.7.14) as they cross eventfds.

Everywhere: ``syscalls:sys_enter_write``/``sys_enter_read``/
``sys_exit_read`` filtered in the kernel by (tgid, fd) — the fds come from
:meth:`EventfdProbe.watch` (vhost-user SET_VRING_KICK/CALL, the vhost
ioctls, or ``/proc/PID/fdinfo``) — and uprobes on libc's
``eventfd_write``/``eventfd_read``. Where kprobes exist, also
``eventfd_signal_mask`` (or ``eventfd_signal``), ``ioeventfd_write`` (a KVM
kick), ``irqfd_wakeup`` (a KVM interrupt injection) and
``vhost_poll_wakeup``.

Counters per watched (device, queue): ``kicks`` (writes to a kick fd: the
driver's notifications), ``kicks_read`` (sum of the counter values a device
read from its kick fd: what a back-end counts), ``calls`` (writes to a call
fd), ``calls_read``, ``writes``, ``reads``, ``libc_eventfd_write``,
``libc_eventfd_read``; per kernel object (key ``("kernel", address)``):
``signals``, ``kvm_kicks``, ``kvm_calls``, ``vhost_wakeups``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from inspector.events import Event

from .attach import (AttachPoint, KernelInfo, choose_kprobe, choose_tracepoint, choose_uprobe,
                     find_libc, resolve_symbol, syscall_field_offset)
from .base import Probe, ProbeError

KIND_UNKNOWN, KIND_KICK, KIND_CALL = 0, 1, 2
SIDE_DEVICE, SIDE_DRIVER = 0, 1
KERNEL_KEY_MIN = 1 << 47  # kernel addresses are above this; Python's ids below

TRACEPOINTS = ["syscalls:sys_enter_write", "syscalls:sys_enter_read", "syscalls:sys_exit_read"]
UPROBES = ["eventfd_write", "eventfd_read"]
KPROBES = ["eventfd_signal_mask", "eventfd_signal", "ioeventfd_write", "irqfd_wakeup", "vhost_poll_wakeup"]


@dataclass(frozen=True)
class EventfdInfo:
    """One eventfd of a process, from ``/proc/PID/fdinfo/FD``: ``id`` is
    ``eventfd-id`` (the same eventfd in every process that holds it, since
    Linux 5.16), ``count`` the counter now (``eventfd-count``, hex)."""

    pid: int
    fd: int
    id: int | None
    count: int


def parse_fdinfo(text: str) -> tuple[int | None, int | None]:
    """``(eventfd-id, eventfd-count)`` of an fdinfo text, ``(None, None)``
    for an fd that is not an eventfd."""
    m = re.search(r"^eventfd-count:\s*([0-9a-fA-F]+)", text, re.MULTILINE)
    if not m:
        return None, None
    i = re.search(r"^eventfd-id:\s*(\d+)", text, re.MULTILINE)
    return (int(i.group(1)) if i else None), int(m.group(1), 16)


def process_eventfds(pid: int) -> dict[int, EventfdInfo]:
    """``{fd: EventfdInfo}`` for every eventfd process ``pid`` holds.
    Raises ProbeError when the process's fds cannot be listed."""
    base = Path(f"/proc/{pid}")
    try:
        fds = [int(n) for n in os.listdir(base / "fd")]
    except OSError as e:
        raise ProbeError(f"cannot list the fds of pid {pid}: {e.strerror}") from e
    out = {}
    for fd in fds:
        try:
            if os.readlink(base / "fd" / str(fd)) != "anon_inode:[eventfd]":
                continue
            eid, cnt = parse_fdinfo((base / "fdinfo" / str(fd)).read_text())
        except OSError:
            continue  # closed meanwhile
        if cnt is not None:
            out[fd] = EventfdInfo(pid, fd, eid, cnt)
    return out


def snapshot_eventfd_ids(snapshot: dict) -> dict[int, tuple[str, int, str]]:
    """``{eventfd_id: (device, queue, kind)}`` of the kick and call fds a
    vqscope back-end's snapshot names (top-level ``pid``, each queue's
    ``backend.kick_fd`` / ``call_fd``), their ids read from
    ``/proc/PID/fdinfo``: the same eventfd is then found under any fd
    number, in the back-end (dups) and in its front-end
    (:meth:`EventfdProbe.watch_eventfd_ids`). Raises ProbeError when the
    snapshot has no pid or the kernel gives no ``eventfd-id`` (before 5.16)."""
    pid = snapshot.get("pid")
    if not isinstance(pid, int):
        raise ProbeError("the snapshot names no back-end pid: is it a vqscope back-end's (--connect)?")
    out: dict[int, tuple[str, int, str]] = {}
    for q in snapshot.get("queues", []):
        for kind in ("kick", "call"):
            fd = (q.get("backend") or {}).get(f"{kind}_fd")
            if not isinstance(fd, int):
                continue
            try:
                eid, _ = parse_fdinfo(Path(f"/proc/{pid}/fdinfo/{fd}").read_text())
            except OSError as e:
                raise ProbeError(f"cannot read fd {fd} of back-end pid {pid}: {e.strerror}") from e
            if eid is None:
                raise ProbeError(f"fd {fd} of pid {pid} ({q['device']} queue {q['index']} {kind}) has no "
                                 "eventfd-id: not an eventfd, or a kernel before 5.16")
            out[eid] = (q["device"], q["index"], kind)
    return out


class EventfdProbe(Probe):
    """Counts (and optionally streams) kicks and calls on watched eventfds.

    ``counters()`` → ``{(device, queue): {counter: n}}`` (kernel objects:
    ``("kernel", address)``); ``events()`` → ``Event(t, device, queue,
    "kick"|"call", value)``: a kick's value the counter written or read
    (kicks coalesced), a call's 0 — inspector.events gives a call's value as
    the ``used_idx`` it covered (what the doctor reads), which an eventfd
    does not carry; the counter a call wrote or read is in ``counters()``
    (``calls``, ``calls_read``).
    """

    name = "eventfd"
    COUNTERS = ["kicks", "kicks_read", "calls", "calls_read", "writes", "reads", "libc_eventfd_write",
                "libc_eventfd_read", "signals", "kvm_kicks", "kvm_calls", "vhost_wakeups"]
    EVENT_KINDS = ["kick", "call"]

    def __init__(self, pids: list[int] | None = None, stream: bool = False, kernel: KernelInfo | None = None,
                 **kw):
        super().__init__(pids, stream, kernel, **kw)
        self._ids: dict[tuple[str, int], int] = {}
        self._names: dict[int, tuple[str, int]] = {}
        self._watch: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    # ---- pure ------------------------------------------------------------

    def _event(self, rec) -> Event | None:
        """The base class's Event, with a call's value 0 (its used_idx is
        not known here; see the class docstring)."""
        ev = super()._event(rec)
        if ev is not None and ev.kind == "call":
            ev = ev._replace(value=0)
        return ev
    def plan(self) -> list[AttachPoint]:
        k = self.kernel
        pts = [choose_tracepoint(self.name, tp, k) for tp in TRACEPOINTS]
        lib = find_libc()
        pts += [choose_uprobe(self.name, lib, s, k) for s in UPROBES]
        sig_mask, _ = resolve_symbol("eventfd_signal_mask", k.symbols)
        for f in KPROBES:
            ap = choose_kprobe(self.name, "kprobe", f, k, arg_index=0)
            if f == "eventfd_signal" and sig_mask and ap.ok:
                # eventfd_signal() calls eventfd_signal_mask(): count once.
                ap = AttachPoint(self.name, "kprobe", f, ap.target, "unavailable",
                                 "not needed: eventfd_signal_mask is probed (it is called from here)")
            pts.append(ap)
        return pts

    def defines(self) -> dict[str, int | str | bool]:
        return {
            "SYSCALL_ARGS_OFF": syscall_field_offset("syscalls:sys_enter_write", "fd"),
            "SYSCALL_RET_OFF": syscall_field_offset("syscalls:sys_exit_read", "ret"),
            "KIND_UNKNOWN": KIND_UNKNOWN, "KIND_KICK": KIND_KICK, "KIND_CALL": KIND_CALL,
            "SIDE_DEVICE": SIDE_DEVICE, "SIDE_DRIVER": SIDE_DRIVER,
        }

    def key_of(self, device: str, queue: int) -> int:
        """The small integer id standing for (device, queue) in the maps."""
        k = (device, queue)
        if k not in self._ids:
            i = len(self._ids) + 1
            self._ids[k] = i
            self._names[i] = k
        return self._ids[k]

    # ---- watching --------------------------------------------------------
    def watch(self, pid: int, fd: int, device: str, queue: int = -1, kind: str = "",
              side: str = "device") -> None:
        """Count reads/writes of ``fd`` in process ``pid`` under (device,
        queue). ``kind``: ``kick``, ``call`` or ``""`` (decided by the
        direction: a device reads kicks and writes calls, a driver writes
        kicks and reads calls); ``side``: ``device`` (a back-end) or
        ``driver`` (a front-end: QEMU, testpmd's virtio-user)."""
        kinds = {"": KIND_UNKNOWN, "kick": KIND_KICK, "call": KIND_CALL}
        sides = {"device": SIDE_DEVICE, "driver": SIDE_DRIVER}
        if kind not in kinds or side not in sides:
            raise ProbeError(f"watch pid {pid} fd {fd}: kind {kind!r} (kick|call|'') or side {side!r} "
                             "(device|driver) unknown")
        val = (self.key_of(device, queue), queue, sides[side], kinds[kind])
        self._watch[(pid, fd)] = val
        if self.bpf is not None:
            self._put(pid, fd, val)

    def watch_eventfd_ids(self, pid: int, ids: dict[int, tuple[str, int, str]], side: str) -> int:
        """Watch every fd of ``pid`` whose ``eventfd-id`` is a key of ``ids``
        (``{eventfd_id: (device, queue, kind)}``): one eventfd known in one
        process (e.g. a back-end's kick fd) found in another (the
        front-end), dups included. Returns how many fds were watched."""
        n = 0
        for fd, info in process_eventfds(pid).items():
            if info.id in ids:
                dev, q, kind = ids[info.id]
                self.watch(pid, fd, dev, q, kind, side)
                n += 1
        return n

    def watch_process(self, pid: int, device: str, side: str = "device") -> int:
        """Watch every eventfd ``pid`` holds, as queue -1 with the kind
        decided by direction (when nothing tells which fd is which)."""
        fds = process_eventfds(pid)
        for fd in fds:
            self.watch(pid, fd, device, -1, "", side)
        return len(fds)

    def _put(self, pid: int, fd: int, val: tuple[int, int, int, int]) -> None:
        m = self.bpf[b"watched"]
        k = m.Key(pid, fd)
        v = m.Leaf(*val)
        m[k] = v

    def _after_attach(self) -> None:
        for (pid, fd), val in self._watch.items():
            self._put(pid, fd, val)

    def _key(self, k):
        k = getattr(k, "value", k)
        if k >= KERNEL_KEY_MIN:
            return ("kernel", k)
        return self._names.get(k, ("?", k))

    def device_name(self, key: int) -> str:
        return self._names.get(key, (f"kernel:{key:#x}", -1))[0]
