"""Another process's memory, read only: ``/proc/PID/mem`` and ``process_vm_readv``.

:class:`ProcessMemory` reads a process (QEMU, or the owner of a vhost-net
queue): ``/proc/PID/mem`` is opened read-only — the
kernel's ptrace access check happens there, so a missing permission is
reported at attach time — and kept as ``.mem_fd``, a fallback reader
(``os.pread``) for kernels without cross-memory attach; reads go through
``process_vm_readv``, every range of a refresh gathered in one system call.
Nothing here can write: the file is never opened for writing and the write
twin of the system call is not bound.

Guest RAM in that process is described by :class:`RamRange` s
(guest-physical → host-virtual; built from QMP or a probe's memory table):
:func:`inspector.ring.remote.snapshot_remote_split` reads a ring through it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
from array import array
from dataclasses import dataclass
from itertools import chain

from ..errors import SourceError, SourceGone

#: Most iovecs one process_vm_readv takes (UIO_MAXIOV).
IOV_MAX = 1024
U64_END = 1 << 64
YAMA_PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


class NoSuchProcessError(SourceError):
    """There is no process with that pid (at attach time)."""


class ProcessAccessError(SourceError):
    """No permission to read the process (ptrace access mode check)."""


class ProcessExitedError(SourceGone):
    """The process exited while attached (for QEMU: the VM is gone)."""

    def __init__(self, pid: int, message: str):
        super().__init__(message)
        self.pid = pid


class ProcessReadError(SourceError):
    """A range is not mapped in the process (``addr`` is the first byte that
    could not be read)."""

    def __init__(self, message: str, addr: int):
        super().__init__(message)
        self.addr = addr


if array("Q").itemsize != ctypes.sizeof(ctypes.c_void_p) or ctypes.sizeof(ctypes.c_size_t) != 8:
    raise ImportError("inspector.memory.process needs a 64-bit platform (struct iovec of two u64)")

_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
# iovec arrays are passed as addresses of array('Q') [base, len, base, len, ...]:
# built at C speed, unlike ctypes structures filled field by field.
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                              ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_process_vm_readv.restype = ctypes.c_ssize_t


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def permission_message(pid: int) -> str:
    """Why reading ``pid`` is refused, and what to do (names CAP_SYS_PTRACE
    and kernel.yama.ptrace_scope with its current value)."""
    try:
        with open(YAMA_PTRACE_SCOPE, encoding="ascii") as f:
            scope = f.read().strip()
        yama = (f"kernel.yama.ptrace_scope is {scope} (0: same uid suffices, 1: only "
                f"descendants or CAP_SYS_PTRACE, 2: CAP_SYS_PTRACE required, 3: no attach "
                f"until reboot)")
    except OSError:
        yama = "kernel.yama.ptrace_scope is not set (Yama is not active on this kernel)"
    return (f"no permission to read the memory of process {pid} ({_comm(pid)}): run vqscope as "
            f"root or with CAP_SYS_PTRACE (e.g. sudo, or setcap cap_sys_ptrace+ep); {yama}")


class ProcessMemory:
    """Read-only access to the memory of process ``pid``.

    ``use_pread=True`` reads with ``os.pread`` on ``.mem_fd`` instead of
    ``process_vm_readv`` (one call per range; also the automatic fallback
    when the kernel lacks process_vm_readv). ``syscalls`` counts the reading
    system calls made, for tests and benchmarks.
    """

    def __init__(self, pid: int, *, use_pread: bool = False):
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise NoSuchProcessError(f"{pid!r} is not a process id: pass QEMU's pid (--pid)")
        self.pid = pid
        self.use_pread = use_pread
        self.syscalls = 0
        self.mem_fd = -1
        self._pidfd = -1
        self._poll = None
        # The pidfd first: if the pid is reused after this, the pidfd still
        # names the process we meant, and shows it exited.
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcessError(self._no_such()) from None
        except (OSError, AttributeError):
            self._pidfd = -1  # kernel < 5.3: no pid-reuse check
        try:
            self.mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.close()
            raise NoSuchProcessError(self._no_such()) from None
        except PermissionError:
            self.close()
            raise ProcessAccessError(permission_message(pid)) from None
        except OSError as e:
            self.close()
            raise SourceError(f"cannot open /proc/{pid}/mem: {e.strerror}") from None
        if self._pidfd >= 0:
            self._poll = select.poll()
            self._poll.register(self._pidfd, select.POLLIN)
        self._check_alive()

    def _no_such(self) -> str:
        return (f"no process with pid {self.pid}: check QEMU's pid (--pid) or the monitor "
                f"socket, and that the VM is still running")

    # --- lifetime ------------------------------------------------------------
    def close(self) -> None:
        for name in ("mem_fd", "_pidfd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
        self._poll = None

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def closed(self) -> bool:
        return self.mem_fd < 0

    def _exited(self) -> ProcessExitedError:
        return ProcessExitedError(self.pid, f"process {self.pid} exited while attached: the VM "
                                            f"is gone (attach again to a running QEMU)")

    def _check_alive(self) -> None:
        """Raise ProcessExitedError if the process has exited (then data just
        read may come from another process that reused the pid)."""
        if self._poll is not None and self._poll.poll(0):
            raise self._exited()

    # --- reading ---------------------------------------------------------------
    def readv(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(hva, size)`` range, gathered in one system
        call (one per IOV_MAX ranges). Raises ProcessReadError naming the
        first address that could not be read, ProcessExitedError,
        ProcessAccessError."""
        buf, offsets = self.gather(ranges)
        mv = memoryview(buf)
        return [bytes(mv[o:o + n]) for o, (_, n) in zip(offsets, ranges)]

    def gather(self, ranges: list[tuple[int, int]]) -> tuple[bytearray, list[int]]:
        """Like :meth:`readv`, without copies: one bytearray holding the
        ranges back to back, and the offset of each range in it."""
        buf, offsets, failed = self._gather(ranges, partial=False)
        assert not failed
        return buf, offsets

    def gather_partial(self, ranges: list[tuple[int, int]],
                       ) -> tuple[bytearray, list[int], set[int]]:
        """Like :meth:`gather`, but a range that is not mapped does not fail
        the others: also returns the indices of the ranges not read (their
        bytes are zeros). Needs one more system call per unreadable range."""
        return self._gather(ranges, partial=True)

    def _gather(self, ranges, *, partial: bool):
        if self.closed:
            raise SourceError(f"process {self.pid}: memory reader is closed")
        offsets = []
        total = 0
        for hva, n in ranges:
            if n < 0 or not 0 <= hva < U64_END or hva + n > U64_END:
                raise ProcessReadError(f"process {self.pid}: range {hva:#x}+{n:#x} is not a "
                                       f"user-space address range", hva)
            offsets.append(total)
            total += n
        buf = bytearray(total)
        failed: set[int] = set()
        if total:
            cbuf = (ctypes.c_char * total).from_buffer(buf)
            try:
                base = ctypes.addressof(cbuf)
                i = 0
                while i < len(ranges):
                    j = min(len(ranges), i + IOV_MAX)
                    k = self._read_some(ranges, offsets, base, i, j)
                    if k == j:
                        i = j
                        continue
                    # ranges[i:k] were read, ranges[k] was not
                    if not partial:
                        hva, n = ranges[k]
                        raise self._unmapped(hva, n)
                    failed.add(k)
                    i = k + 1
            finally:
                del cbuf
        self._check_alive()
        return buf, offsets, failed

    def _unmapped(self, hva: int, n: int) -> ProcessReadError:
        return ProcessReadError(
            f"process {self.pid}: {n} bytes at host virtual address {hva:#x} are not all mapped "
            f"(the guest RAM map may be stale after hot-plug: refresh it)", hva)

    def _read_some(self, ranges, offsets, base: int, i: int, j: int) -> int:
        """Read ranges[i:j] (at most IOV_MAX) into base + offsets; the index
        of the first range not read completely (j when all were)."""
        if self.use_pread:
            return self._pread_some(ranges, offsets, base, i, j)
        n = j - i
        chunk = ranges[i:j]
        remote = array("Q", chain.from_iterable(chunk))
        want = sum(remote[1::2])
        local = array("Q", (base + offsets[i], want))
        self.syscalls += 1
        got = _process_vm_readv(self.pid, local.buffer_info()[0], 1, remote.buffer_info()[0],
                                n, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EFAULT:
                return i  # nothing read: ranges[i] is not mapped
            if err == errno.ESRCH:
                raise self._exited()
            if err in (errno.EPERM, errno.EACCES):
                raise ProcessAccessError(permission_message(self.pid))
            if err == errno.ENOSYS:
                self.use_pread = True
                return self._pread_some(ranges, offsets, base, i, j)
            raise SourceError(f"process {self.pid}: process_vm_readv failed: "
                              f"{os.strerror(err)}")
        if got == want:
            return j
        # a partial read stops at the first range that could not be read
        acc = 0
        for m in range(i, j):
            acc += ranges[m][1]
            if got < acc:
                return m
        return j  # pragma: no cover - got < want implies a short range

    def _pread_some(self, ranges, offsets, base: int, i: int, j: int) -> int:
        for m in range(i, j):
            hva, size = ranges[m]
            if not size:
                continue
            if hva + size > 1 << 63:  # pread's offset is a signed off_t
                return m
            self.syscalls += 1
            try:
                data = os.pread(self.mem_fd, size, hva)
            except OSError as e:
                if e.errno in (errno.EIO, errno.EFAULT):
                    return m
                raise SourceError(f"process {self.pid}: reading /proc/{self.pid}/mem failed: "
                                  f"{e.strerror}") from None
            if len(data) != size:
                self._check_alive()  # an exited process reads as empty
                return m
            ctypes.memmove(base + offsets[m], data, size)
        return j


@dataclass(frozen=True)
class RamRange:
    """``size`` bytes of guest RAM at guest-physical ``gpa``, mapped at host
    virtual address ``hva`` in the process (QMP ``info mtree -f`` +
    ``gpa2hva``)."""

    gpa: int
    size: int
    hva: int

    def hva_of(self, gpa: int, size: int) -> int | None:
        """The hva of ``[gpa, gpa + size)`` if this range holds all of it."""
        if self.gpa <= gpa and gpa + size <= self.gpa + self.size:
            return self.hva + (gpa - self.gpa)
        return None


def ram_hva(ram: list[RamRange], gpa: int, size: int) -> int | None:
    """The hva of ``[gpa, gpa + size)`` through the first RAM range holding
    all of it, or None."""
    for r in ram:
        hva = r.hva_of(gpa, size)
        if hva is not None:
            return hva
    return None


__all__ = [
    "IOV_MAX",
    "NoSuchProcessError",
    "ProcessAccessError",
    "ProcessExitedError",
    "ProcessMemory",
    "ProcessReadError",
    "RamRange",
    "permission_message",
    "ram_hva",
]
