"""Another process's memory, read only: ``/proc/PID/mem`` and ``process_vm_readv``.

:class:`ProcessMemory` reads a process (QEMU, or the owner of a vhost-net
queue) the way issue 3 asks: ``/proc/PID/mem`` is opened read-only — the
kernel's ptrace access check happens there, so a missing permission is
reported at attach time — and kept as ``.mem_fd``, a fallback reader
(``os.pread``) for kernels without cross-memory attach; reads go through
``process_vm_readv``, every range of a refresh gathered in one system call.
Nothing here can write: the file is never opened for writing and the write
twin of the system call is not bound.

:func:`snapshot_remote_split` decodes a split ring of a guest whose RAM is
mapped in that process. ``ram`` is the guest-physical → host-virtual map
(a list of :class:`RamRange`, built from QMP elsewhere). One refresh:

1. the three ring areas are translated gpa → hva (each must lie in one RAM
   range, else RingError) and gathered in ONE ``process_vm_readv``, in this
   order: the driver area (avail), the device area (used), the descriptor
   table, the device area again. The chains listed are those made
   available before the avail read, so the driver wrote their descriptors
   before the table was read; a chain the device returned meanwhile (its
   head among the used entries between the two used reads) may already
   hold the driver's next use of those descriptors: its anomalies are
   dropped (:func:`forget_returned`), never reported as the driver's fault;
2. a :class:`~inspector.memory.GuestMemory` is built whose readable regions
   are those copies and whose validate-only regions are the RAM ranges: the
   decoder accepts buffers anywhere in guest RAM but reads only the copies;
3. first pass: decode. Indirect tables that lie in RAM but were not read are
   returned by ``snapshot_split_pass`` (and are ``indirect_not_read``
   anomalies of that pass only);
4. if there are any, they are gathered in ONE more ``process_vm_readv``
   (at most one per chain so at most ``size``, each at most the decoder's
   16·32768-byte bound; deduplicated, tables less than SPAN_GAP apart read
   as one span, at most 16·max_descs bytes in all), added as readable
   regions, and the ring is decoded again from the same ring-area copies. Only this second result is returned: a table that
   could be read leaves no trace; one that could not (over the byte budget,
   or unmapped in the process) keeps ``indirect_not_read`` on its chain.
   The same read takes the device area again, after the tables: a chain
   the device returned between the two reads (its head in the used ring
   between the two ``used->idx``) may have had its table freed and reused
   by the driver (Linux kfree()s it in detach_buf_split), so the bytes read
   there are not that chain's. Its tables are left out (it keeps
   ``indirect_not_read``) instead of being reported as the driver's fault;
   a chain still in flight owns its table (VIRTIO 1.2 §2.7.5.3.1: the
   driver does not write it until used), so what is wrong in it is real.

Guest memory is hostile: both passes are the bounded decoder walks, and the
second pass cannot ask for new tables (its chains are those of the first,
whose direct descriptors come from the same copy).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import struct
from array import array
from dataclasses import dataclass
from itertools import chain

from . import vqd
from .errors import RingError, SourceError, SourceGone
from .memory import GuestMemory
from .ringref import AREAS, DEFAULT_MAX_DESCS, area_sizes, check_args, ring_between
from .ringsnap import RingSnapshot

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
    raise ImportError("inspector.procmem needs a 64-bit platform (struct iovec of two u64)")

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


#: Indirect tables closer than this (same RAM range) are read as one span:
#: the driver's allocator packs them (Linux: kmalloc-64/-128 slabs), and one
#: region per span keeps the region tables short; the gap bytes are cheap.
SPAN_GAP = 4096


def table_spans(tables: list[tuple[int, int]], ram: list[RamRange], budget: int,
                gap: int = SPAN_GAP) -> list[tuple[int, int, int]]:
    """``(gpa, size, hva)`` spans to read for the indirect ``tables``
    (``(gpa, len)``, duplicates allowed): sorted by gpa, tables at most
    ``gap`` bytes apart inside one RAM range merged, at most ``budget``
    bytes in all (a table that does not fit is left out, and stays
    ``indirect_not_read``)."""
    spans: list[tuple[int, int, int]] = []  # (gpa, size, hva)
    used = 0
    start = end = limit = hva0 = 0  # the open span [start, end), its RAM range ends at limit
    is_open = False
    for gpa, n in sorted(tables):  # a duplicate follows its twin: grows nothing
        if is_open and end + gap >= gpa and gpa + n <= limit:
            grow = max(end, gpa + n) - end
            if used + grow <= budget:
                used += grow
                end += grow
                continue
        r = next((r for r in ram if r.gpa <= gpa and gpa + n <= r.gpa + r.size), None)
        if r is None or used + n > budget:
            continue
        hva = r.hva + (gpa - r.gpa)
        if is_open:
            spans.append((start, end - start, hva0))
        start, end, limit, hva0, is_open = gpa, gpa + n, r.gpa + r.size, hva, True
        used += n
    if is_open:
        spans.append((start, end - start, hva0))
    return spans


VRING_DESC_F_NEXT = 1
VRING_DESC_F_INDIRECT = 4


def returned_heads(used_before: bytes | memoryview, used_after: bytes | memoryview,
                   size: int) -> set[int] | None:
    """Heads the device returned between two reads of the device area
    (``used_before``, ``used_after``: its bytes, §2.7.8): the ids of the
    used entries between the two ``used->idx``, as the second read has them.
    None when ``used->idx`` moved by ``size`` or more: every entry was
    rewritten, so any chain may have been returned."""
    u1 = struct.unpack_from("<H", used_before, 2)[0]
    u2 = struct.unpack_from("<H", used_after, 2)[0]
    n = (u2 - u1) & 0xFFFF
    if n >= size:
        return None
    return {struct.unpack_from("<I", used_after, 4 + 8 * ((u1 + k) % size))[0] for k in range(n)}


def returned_tables(desc: bytes | memoryview, size: int, heads: set[int]) -> list[tuple[int, int]]:
    """The indirect tables ``(gpa, len)`` of the chains of ``heads`` (the
    device returned them: :func:`returned_heads`), walking each head's
    chain in ``desc`` (the descriptor table as read; at most ``size`` steps
    per head)."""
    out = []
    for h in heads:
        for _ in range(size):
            if h >= size:
                break
            addr, length, flags, nxt = struct.unpack_from("<QIHH", desc, 16 * h)
            if flags & VRING_DESC_F_INDIRECT:
                out.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                break
            h = nxt
    return out


_OF_HEAD = re.compile(r"\(head (\d+)\)$")


def forget_returned(snap: RingSnapshot, heads: set[int] | None) -> RingSnapshot:
    """Drop from ``snap`` the anomalies of chains whose head is in ``heads``
    (None: of every chain), ``indirect_not_read`` kept: the device returned
    them while the ring was being read, so their descriptors or tables may
    already be the driver's next use of that memory, not a fault."""
    if heads is None or heads:
        snap.anomalies = [(kind, detail) for kind, detail in snap.anomalies
                          if kind == "indirect_not_read" or not (m := _OF_HEAD.search(detail))
                          or (heads is not None and int(m.group(1)) not in heads)]
    return snap


def snapshot_remote_split(pmem: ProcessMemory, ram: list[RamRange], size: int, desc_gpa: int,
                          avail_gpa: int, used_gpa: int, last_avail_idx: int | None, *,
                          impl=vqd, max_descs: int = DEFAULT_MAX_DESCS) -> RingSnapshot:
    """Snapshot the split ring at ``desc_gpa``/``avail_gpa``/``used_gpa``
    (guest-physical) in the guest RAM ``ram`` of process ``pmem``, with
    decoder ``impl`` (:mod:`inspector.vqd` or :mod:`inspector.ringref`);
    see the module docstring. A ``last_avail_idx`` not between this read's
    ``used->idx`` and ``avail->idx`` is older than the read and is not used
    (the result's ``last_avail_idx`` is None). Raises RingError when a ring area is not
    inside one RAM range, ProcessReadError / ProcessExitedError /
    ProcessAccessError when the process cannot be read."""
    check_args(size, desc_gpa, avail_gpa, used_gpa, last_avail_idx, max_descs)
    areas = list(zip((desc_gpa, avail_gpa, used_gpa), area_sizes(size)))
    ranges = []
    for i, (gpa, n) in enumerate(areas):
        hva = ram_hva(ram, gpa, n)
        if hva is None:
            raise RingError(f"{AREAS[i]} at guest-physical 0x{gpa:x} (+0x{n:x} bytes) is not "
                            f"inside one guest RAM range of process {pmem.pid}: check the queue "
                            f"addresses and the guest RAM map")
        ranges.append((hva, n))
    # One read: the driver area, the device area, the descriptor table, then
    # the device area again (see the module docstring).
    buf, offs = pmem.gather([ranges[1], ranges[2], ranges[0], ranges[2]])
    view = memoryview(buf)
    offsets = (offs[2], offs[0], offs[1])          # desc, avail, used, as decoded
    used_n = areas[2][1]
    used_first = view[offs[1]:offs[1] + used_n]
    used_last = view[offs[3]:offs[3] + used_n]
    if last_avail_idx is not None and not ring_between(
            struct.unpack_from("<H", used_first, 2)[0], last_avail_idx,
            struct.unpack_from("<H", view, offs[0] + 2)[0]):
        # The device's last_avail_idx (QMP, a probe) is older than this read:
        # the device keeps used <= last_avail <= avail, so decoded from it,
        # returned chains would show as available. Decode without it; the
        # result's last_avail_idx says None.
        last_avail_idx = None
    mem = GuestMemory()
    for (gpa, n), (hva, _), off in zip(areas, ranges, offsets):
        mem.add(gpa, buf, uva=hva, size=n, buf_offset=off)
    for r in ram:
        mem.add_valid(r.gpa, r.size, uva=r.hva)
    snap, unread = impl.snapshot_split_pass(mem, size, desc_gpa, avail_gpa, used_gpa,
                                            last_avail_idx, max_descs=max_descs,
                                            skip_if_unread=True)
    if not unread:
        return forget_returned(snap, returned_heads(used_first, used_last, size))
    # Second pass: the unread indirect tables, coalesced into spans, within
    # budget; then the device area again (see the module docstring).
    tables = table_spans(unread, ram, 16 * max_descs)
    used_hva = ranges[2][0]
    tbuf, toffs, failed = pmem.gather_partial([(hva, n) for _, n, hva in tables] + [(used_hva, used_n)])
    if len(tables) not in failed:
        used_last = memoryview(tbuf)[toffs[-1]:toffs[-1] + used_n]
    returned = returned_heads(used_first, used_last, size)
    stale = None if returned is None else returned_tables(view[offsets[0]:offsets[0] + areas[0][1]],
                                                           size, returned)
    if stale is not None:   # None: the ring turned over meanwhile; no table is sure
        for k, ((gpa, n, hva), off) in enumerate(zip(tables, toffs)):
            if k in failed:
                continue
            if not stale or not any(a < gpa + n and gpa < a + ln for a, ln in stale):
                mem.add(gpa, tbuf, uva=hva, size=n, buf_offset=off)
                continue
            # The span holds a returned chain's table: add the others one by one.
            for a, ln in set(unread):
                if gpa <= a and a + ln <= gpa + n and \
                        not any(b < a + ln and a < b + m for b, m in stale):
                    mem.add(a, tbuf, uva=hva + a - gpa, size=ln, buf_offset=off + a - gpa)
    snap = impl.snapshot_split_pass(mem, size, desc_gpa, avail_gpa, used_gpa, last_avail_idx,
                                    max_descs=max_descs)[0]
    return forget_returned(snap, returned)

__all__ = [
    "IOV_MAX",
    "NoSuchProcessError",
    "ProcessAccessError",
    "ProcessExitedError",
    "ProcessMemory",
    "ProcessReadError",
    "RamRange",
    "forget_returned",
    "permission_message",
    "ram_hva",
    "returned_heads",
    "returned_tables",
    "snapshot_remote_split",
    "table_spans",
]
