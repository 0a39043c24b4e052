"""A running QEMU as a source: every virtqueue of a live VM, read without
side effects through QMP and ``/proc/PID/mem``.

What comes from where (QEMU ≥ 7.2, whose ``x-query-virtio*`` commands this
uses; their replies are quoted in tests/test_qemu_attach.py):

- ``x-query-virtio``: the virtio devices, by QOM path.
- ``x-query-virtio-status`` per device: negotiated (guest) features,
  ``num-vqs``, ``broken``, and ``vhost-started``.
- per queue, the ONE command :func:`queue_command` picks from
  ``vhost-started``:

  - QEMU services the queue itself: ``x-query-virtio-queue-status`` —
    ``vring-desc/avail/used`` (guest-physical), ``vring-num``,
    ``last-avail-idx``, ``used-idx``, ``signalled-used``. Side-effect free
    there: it copies QEMU's own VirtQueue fields.
  - a vhost device (kernel vhost-net, vhost-user) has started:
    ``x-query-virtio-vhost-queue-status`` — ``desc/avail/used`` (QEMU's host
    virtual addresses), ``*-phys``, ``num``, ``kick``/``call`` fds. QEMU's
    ``x-query-virtio-queue-status`` would call ``vhost_get_vring_base`` here,
    which for vhost-user sends GET_VRING_BASE and stops the ring, and
    ``x-query-virtio-queue-element`` can mark a device broken on a bad
    ``next``: this module never sends the first for such a device (and never
    sends the second at all; :class:`QmpChannel` refuses both by name).
    Only the device knows its ``last_avail_idx``: null in the snapshot.

- guest-physical → QEMU virtual: the RAM ranges of the ``memory`` address
  space's flat view (HMP ``info mtree -f``), each translated at its start
  with HMP ``gpa2hva`` and checked against ``/proc/PID/maps``; cached and
  rebuilt when the flat view changes (looked at every ``map_refresh``
  seconds, and after a failed read).
- the rings: :mod:`inspector.procmem`, one ``process_vm_readv`` per queue.

The QMP connection lives on a private event loop in its own thread, so
:meth:`QemuSource.snapshot` can be called from any thread (the TUI polls
from a worker) and inside a program that runs its own asyncio loop.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InspectorError, SourceError, SourceGone
from ..ringref import ring_between

VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_RING_PACKED = 34

#: Feature names as QEMU 7.2's x-query-virtio-status prints them ("NAME:
#: description") -> bit (linux/virtio_*.h). Names are unique across device
#: types; bits are not. Anything QEMU does not name is in
#: ``unknown-dev-features`` already, as bits.
FEATURE_BITS: dict[str, int] = {
    # transport (VIRTIO 1.2 §6) and vhost
    "VIRTIO_F_NOTIFY_ON_EMPTY": 24, "VHOST_F_LOG_ALL": 26, "VIRTIO_F_ANY_LAYOUT": 27,
    "VIRTIO_RING_F_INDIRECT_DESC": 28, "VIRTIO_RING_F_EVENT_IDX": 29,
    "VIRTIO_F_BAD_FEATURE": 30, "VHOST_USER_F_PROTOCOL_FEATURES": 30,
    "VIRTIO_F_VERSION_1": 32, "VIRTIO_F_IOMMU_PLATFORM": 33, "VIRTIO_F_ACCESS_PLATFORM": 33,
    "VIRTIO_F_RING_PACKED": 34, "VIRTIO_F_IN_ORDER": 35, "VIRTIO_F_ORDER_PLATFORM": 36,
    "VIRTIO_F_SR_IOV": 37, "VIRTIO_F_NOTIFICATION_DATA": 38, "VIRTIO_F_RING_RESET": 40,
    # net
    "VIRTIO_NET_F_CSUM": 0, "VIRTIO_NET_F_GUEST_CSUM": 1, "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS": 2,
    "VIRTIO_NET_F_MTU": 3, "VIRTIO_NET_F_MAC": 5, "VIRTIO_NET_F_GSO": 6,
    "VIRTIO_NET_F_GUEST_TSO4": 7, "VIRTIO_NET_F_GUEST_TSO6": 8, "VIRTIO_NET_F_GUEST_ECN": 9,
    "VIRTIO_NET_F_GUEST_UFO": 10, "VIRTIO_NET_F_HOST_TSO4": 11, "VIRTIO_NET_F_HOST_TSO6": 12,
    "VIRTIO_NET_F_HOST_ECN": 13, "VIRTIO_NET_F_HOST_UFO": 14, "VIRTIO_NET_F_MRG_RXBUF": 15,
    "VIRTIO_NET_F_STATUS": 16, "VIRTIO_NET_F_CTRL_VQ": 17, "VIRTIO_NET_F_CTRL_RX": 18,
    "VIRTIO_NET_F_CTRL_VLAN": 19, "VIRTIO_NET_F_CTRL_RX_EXTRA": 20,
    "VIRTIO_NET_F_GUEST_ANNOUNCE": 21, "VIRTIO_NET_F_MQ": 22, "VIRTIO_NET_F_CTRL_MAC_ADDR": 23,
    "VIRTIO_NET_F_NOTF_COAL": 53, "VIRTIO_NET_F_HASH_REPORT": 57, "VIRTIO_NET_F_RSS": 60,
    "VIRTIO_NET_F_RSC_EXT": 61, "VIRTIO_NET_F_STANDBY": 62, "VIRTIO_NET_F_SPEED_DUPLEX": 63,
    # blk
    "VIRTIO_BLK_F_BARRIER": 0, "VIRTIO_BLK_F_SIZE_MAX": 1, "VIRTIO_BLK_F_SEG_MAX": 2,
    "VIRTIO_BLK_F_GEOMETRY": 4, "VIRTIO_BLK_F_RO": 5, "VIRTIO_BLK_F_BLK_SIZE": 6,
    "VIRTIO_BLK_F_SCSI": 7, "VIRTIO_BLK_F_FLUSH": 9, "VIRTIO_BLK_F_TOPOLOGY": 10,
    "VIRTIO_BLK_F_CONFIG_WCE": 11, "VIRTIO_BLK_F_MQ": 12, "VIRTIO_BLK_F_DISCARD": 13,
    "VIRTIO_BLK_F_WRITE_ZEROES": 14, "VIRTIO_BLK_F_SECURE_ERASE": 16,
    # console, scsi, balloon, 9p, vsock, iommu, mem, gpu, i2c
    "VIRTIO_CONSOLE_F_SIZE": 0, "VIRTIO_CONSOLE_F_MULTIPORT": 1, "VIRTIO_CONSOLE_F_EMERG_WRITE": 2,
    "VIRTIO_SCSI_F_INOUT": 0, "VIRTIO_SCSI_F_HOTPLUG": 1, "VIRTIO_SCSI_F_CHANGE": 2,
    "VIRTIO_SCSI_F_T10_PI": 3,
    "VIRTIO_BALLOON_F_MUST_TELL_HOST": 0, "VIRTIO_BALLOON_F_STATS_VQ": 1,
    "VIRTIO_BALLOON_F_DEFLATE_ON_OOM": 2, "VIRTIO_BALLOON_F_FREE_PAGE_HINT": 3,
    "VIRTIO_BALLOON_F_PAGE_POISON": 4, "VIRTIO_BALLOON_F_REPORTING": 5,
    "VIRTIO_9P_MOUNT_TAG": 0, "VIRTIO_VSOCK_F_SEQPACKET": 1,
    "VIRTIO_IOMMU_F_INPUT_RANGE": 0, "VIRTIO_IOMMU_F_DOMAIN_RANGE": 1, "VIRTIO_IOMMU_F_MAP_UNMAP": 2,
    "VIRTIO_IOMMU_F_BYPASS": 3, "VIRTIO_IOMMU_F_PROBE": 4, "VIRTIO_IOMMU_F_MMIO": 5,
    "VIRTIO_IOMMU_F_BYPASS_CONFIG": 6,
    "VIRTIO_MEM_F_ACPI_PXM": 0, "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE": 1,
    "VIRTIO_GPU_F_VIRGL": 0, "VIRTIO_GPU_F_EDID": 1, "VIRTIO_GPU_F_RESOURCE_UUID": 2,
    "VIRTIO_GPU_F_RESOURCE_BLOB": 3, "VIRTIO_GPU_F_CONTEXT_INIT": 4,
    "VIRTIO_I2C_F_ZERO_LENGTH_REQUEST": 0,
}

#: Commands that must never reach a device whose vhost has started (see the
#: module docstring); x-query-virtio-queue-element is never sent at all.
VHOST_UNSAFE = frozenset({"x-query-virtio-queue-status", "x-query-virtio-queue-element"})
QUEUE_STATUS = "x-query-virtio-queue-status"
VHOST_QUEUE_STATUS = "x-query-virtio-vhost-queue-status"


def queue_command(vhost_started: bool) -> str:
    """The one QMP command that gives a queue's addresses and indices. This
    choice is the only place a per-queue command name comes from."""
    return VHOST_QUEUE_STATUS if vhost_started else QUEUE_STATUS


# --------------------------------------------------------------- pure parsing

def features_mask(decoded: dict | None) -> tuple[int, list[str]]:
    """A VirtioDeviceFeatures object of x-query-virtio-status (``transports``
    and ``dev-features``: lists of "NAME: description"; ``unknown-dev-features``:
    an int) as a bit mask, plus the names this table does not know."""
    if not decoded:
        return 0, []
    mask = int(decoded.get("unknown-dev-features", 0))
    unknown = []
    for s in [*decoded.get("transports", []), *decoded.get("dev-features", [])]:
        name = s.split(":", 1)[0].strip()
        bit = FEATURE_BITS.get(name)
        if bit is None:
            unknown.append(name)
        else:
            mask |= 1 << bit
    return mask, unknown


_FV_HEADER = re.compile(r"^FlatView #\d+", re.M)
_FV_AS = re.compile(r'^\s*AS "([^"]*)", root:', re.M)
_FV_RANGE = re.compile(
    r"^\s*([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio -?\d+, ([a-z/]+)\): (\S+)(?: @([0-9a-fA-F]+))?")


@dataclass(frozen=True)
class FlatRange:
    """One RAM line of a flat view: ``[gpa, gpa + size)`` is ``name`` from
    byte ``offset`` of that memory region."""

    gpa: int
    size: int
    name: str
    offset: int


def parse_flatview(text: str, address_space: str = "memory") -> list[FlatRange]:
    """The ``ram`` ranges of ``address_space``'s flat view in HMP ``info
    mtree -f`` output, e.g.::

        FlatView #1
         AS "memory", root: system
         AS "cpu-memory-0", root: system
         Root memory region: system
          0000000000000000-00000000000bffff (prio 0, ram): mem0
          00000000000c0000-00000000000c1fff (prio 0, rom): mem0 @00000000000c0000
          0000000000100000-000000003fffffff (prio 0, ram): mem0 @0000000000100000

    Raises SourceError when there is no such flat view."""
    starts = [m.start() for m in _FV_HEADER.finditer(text)] + [len(text)]
    for a, b in zip(starts, starts[1:]):
        view = text[a:b]
        if address_space not in _FV_AS.findall(view):
            continue
        out = []
        for line in view.splitlines():
            m = _FV_RANGE.match(line)
            if m and m.group(3) == "ram":
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                out.append(FlatRange(lo, hi - lo + 1, m.group(4), int(m.group(5) or "0", 16)))
        return out
    raise SourceError(f'no flat view of address space "{address_space}" in `info mtree -f` '
                      f"({len(text)} characters)")


_GPA2HVA = re.compile(r"Host virtual address for (0x[0-9a-fA-F]+) \(([^)]*)\) is (0x[0-9a-fA-F]+)")


def parse_gpa2hva(text: str, gpa: int) -> int:
    """The address in HMP ``gpa2hva`` output ("Host virtual address for
    0x100000 (mem0) is 0x7ff64c0ff000")."""
    m = _GPA2HVA.search(text)
    if not m or int(m.group(1), 16) != gpa:
        raise SourceError(f"HMP gpa2hva {gpa:#x} answered {text.strip()!r}")
    return int(m.group(3), 16)


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """``/proc/PID/maps`` lines as :class:`Mapping` (sorted, as the kernel
    prints them)."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        out.append(Mapping(int(lo, 16), int(hi, 16), parts[1], parts[5] if len(parts) > 5 else ""))
    return out


def check_mapped(maps: list[Mapping], hva: int, size: int, what: str) -> None:
    """``[hva, hva + size)`` must lie in readable mappings without holes;
    raise SourceError naming ``what`` otherwise."""
    pos, end = hva, hva + size
    for m in maps:
        if m.end <= pos or m.start > pos:
            continue
        if "r" not in m.perms:
            raise SourceError(f"{what}: QEMU's mapping {m.start:#x}-{m.end:#x} ({m.path or 'anonymous'}) "
                              f"at {pos:#x} is not readable ({m.perms})")
        pos = m.end
        if pos >= end:
            return
    raise SourceError(f"{what}: QEMU virtual range {hva:#x}+{size:#x} is not mapped in the process "
                      f"at {pos:#x} (/proc/PID/maps); the memory map changed or gpa2hva lied")


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a Unix socket (SO_PEERCRED)."""
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return pid


def short_name(path: str, name: str) -> str:
    """The device's name in the snapshot: the id the user gave it
    (``/machine/peripheral/ID/virtio-backend``), else the virtio name and the
    anonymous path's tail (``virtio-serial:device[3]``)."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[-1] == "virtio-backend":
        parts = parts[:-1]
    if len(parts) >= 3 and parts[-2] == "peripheral":
        return parts[-1]
    return f"{name}:{parts[-1]}" if parts else name


# --------------------------------------------------------------- QMP channel

class QmpChannel:
    """A synchronous QMP client (qemu.qmp's QMPClient) on a private event
    loop thread; callable from any thread, one command at a time."""

    def __init__(self, path: str, timeout: float = 5.0):
        from qemu.qmp import QMPClient  # a dependency only of this source

        self.path = path
        self.timeout = timeout
        self.pid: int | None = None
        self.greeting: dict | None = None
        self._lock = threading.Lock()
        self._closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise SourceError(f"QMP socket {path} does not exist; start QEMU with "
                              f"-qmp unix:{path},server=on,wait=off") from None
        except OSError as e:
            sock.close()
            why = "nothing listens there (QEMU exited?)" if isinstance(e, ConnectionRefusedError) \
                else e.strerror or str(e)
            raise SourceError(f"cannot connect to the QMP socket {path}: {why}") from None
        self.pid = peer_pid(sock)
        sock.setblocking(False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vqscope-qmp", daemon=True)
        self._thread.start()
        self._client = self._run(self._make(QMPClient), timeout)
        try:
            self._run(self._client.connect(sock), timeout)
        except BaseException as e:
            self._stop_loop()
            sock.close()
            if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
                raise SourceError(
                    f"{path}: no QMP greeting within {timeout:g} s — not a QEMU monitor, or another "
                    f"client holds it (QEMU serves one client per -qmp socket; add another "
                    f"-qmp unix:PATH,server=on,wait=off)") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"{path} is not a QEMU QMP monitor: {first}") from None
        if self._client.greeting is not None:
            self.greeting = self._client.greeting._asdict()

    @staticmethod
    async def _make(cls):
        client = cls("vqscope")
        client.await_greeting = True
        client.negotiate = True
        return client

    def _run(self, coro, timeout: float | None):
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def execute(self, cmd: str, args: dict | None = None, *, vhost_started: bool | None = None) -> Any:
        """Run ``cmd``; QMP errors become :class:`QmpCommandError`, a lost
        connection :class:`SourceGone`. A command of :data:`VHOST_UNSAFE`
        needs ``vhost_started=False`` (the caller read it from
        x-query-virtio-status), or it is refused before it is sent."""
        res = self.execute_many([(cmd, args, vhost_started)])[0]
        if isinstance(res, QmpCommandError):
            raise res
        return res

    def execute_many(self, calls: list[tuple[str, dict | None, bool | None]]) -> list[Any]:
        """Run ``calls`` — ``(cmd, args, vhost_started)`` as for
        :meth:`execute` — pipelined on the one connection (QMP matches
        replies by id); one result per call, a :class:`QmpCommandError` in
        place of a command QEMU refused. Raises like :meth:`execute` for
        everything else."""
        from qemu.qmp import ExecuteError, QMPError

        for cmd, args, vhost_started in calls:
            if cmd in VHOST_UNSAFE and vhost_started is not False:
                raise InspectorError(f"refusing {cmd} {args}: only for a device whose vhost has not "
                                     f"started (it would stop a vhost ring)")
        if self._closed:
            raise SourceGone(f"QMP connection to {self.path} is closed")

        async def run_all():
            return await asyncio.gather(*(self._client.execute(c, a) for c, a, _ in calls),
                                        return_exceptions=True)

        with self._lock:
            try:
                results = self._run(run_all(), self.timeout + 0.01 * len(calls))
            except (asyncio.TimeoutError, TimeoutError):
                raise SourceError(f"QEMU at {self.path} did not answer {calls[0][0]} (and "
                                  f"{len(calls) - 1} more) within {self.timeout:g} s") from None
        out = []
        for (cmd, _, _), r in zip(calls, results):
            if isinstance(r, ExecuteError):
                r = QmpCommandError(cmd, r.error_class, str(r))
            elif isinstance(r, (QMPError, OSError, EOFError)):
                raise SourceGone(f"QEMU at {self.path} went away ({type(r).__name__}: {r})")
            elif isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    def hmp(self, command_line: str) -> str:
        return self.execute("human-monitor-command", {"command-line": command_line})

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.disconnect(), self.timeout)
        except BaseException:  # noqa: BLE001 - a dead peer is closed enough
            pass
        self._stop_loop()


class QmpCommandError(SourceError):
    """QEMU answered a command with an error."""

    def __init__(self, cmd: str, error_class: str, desc: str):
        super().__init__(f"QMP {cmd}: {error_class}: {desc}")
        self.cmd = cmd
        self.error_class = error_class
        self.desc = desc


# --------------------------------------------------------------- plain state

@dataclass
class DeviceState:
    """What x-query-virtio and x-query-virtio-status say about a device."""

    path: str
    name: str
    device: str
    vhost_started: bool
    features: int
    num_vqs: int
    broken: bool
    unknown_features: list[str] = field(default_factory=list)
    vhost_nvqs: int | None = None
    vhost_vq_index: int | None = None
    statuses: tuple[str, ...] = ()

    @property
    def signature(self) -> tuple:
        """What, when it changes, makes every cached queue of the device
        stale (a reset, a driver (re)load, vhost starting or stopping)."""
        return (self.vhost_started, self.features, self.num_vqs, self.statuses)


@dataclass
class QueueState:
    """Untrusted plain state of one queue as QMP reported it."""

    index: int
    num: int
    desc: int            # guest-physical
    avail: int
    used: int
    vhost: bool
    last_avail_idx: int | None = None     # QEMU's, for a queue it services
    qemu_used_idx: int | None = None
    signalled_used: int | None = None
    desc_hva: int | None = None
    avail_hva: int | None = None
    used_hva: int | None = None
    kick: int | None = None
    call: int | None = None

    def qemu_dict(self, path: str) -> dict[str, Any]:
        d: dict[str, Any] = {"path": path, "vhost": self.vhost,
                             "desc": self.desc, "avail": self.avail, "used": self.used}
        if self.vhost:
            d.update(desc_hva=self.desc_hva, avail_hva=self.avail_hva, used_hva=self.used_hva,
                     kick=self.kick, call=self.call)
        else:
            d.update(used_idx=self.qemu_used_idx, signalled_used=self.signalled_used)
        return d


def device_state(path: str, name: str, st: dict) -> DeviceState:
    """Plain state from an x-query-virtio-status reply."""
    features, unknown = features_mask(st.get("guest-features"))
    vdev = st.get("vhost-dev") or {}
    return DeviceState(path=path, name=name, device=short_name(path, name),
                       vhost_started=bool(st.get("vhost-started")), features=features,
                       num_vqs=int(st.get("num-vqs", 0)), broken=bool(st.get("broken")),
                       unknown_features=unknown, vhost_nvqs=vdev.get("nvqs"),
                       vhost_vq_index=vdev.get("vq-index"),
                       statuses=tuple((st.get("status") or {}).get("statuses", ())))


def queue_state(dev: DeviceState, index: int, reply: dict) -> QueueState | None:
    """Plain state from the reply of :func:`queue_command` for ``dev``;
    None when the queue is not set up (size 0 or no addresses)."""
    if dev.vhost_started:
        q = QueueState(index=index, num=int(reply["num"]), desc=int(reply["desc-phys"]),
                       avail=int(reply["avail-phys"]), used=int(reply["used-phys"]), vhost=True,
                       desc_hva=int(reply["desc"]), avail_hva=int(reply["avail"]),
                       used_hva=int(reply["used"]), kick=reply.get("kick"), call=reply.get("call"))
    else:
        q = QueueState(index=index, num=int(reply["vring-num"]), desc=int(reply["vring-desc"]),
                       avail=int(reply["vring-avail"]), used=int(reply["vring-used"]), vhost=False,
                       last_avail_idx=int(reply["last-avail-idx"]), qemu_used_idx=int(reply["used-idx"]),
                       signalled_used=reply.get("signalled-used"))
    if q.num == 0 or not (q.desc and q.avail and q.used):
        return None
    return q



@dataclass
class _Cached:
    """A queue's QMP state (or why it is skipped), until when it may be
    reused, and the ring's indices read right after it was asked."""

    q: QueueState | str
    expires: float
    avail_idx: int | None = None
    used_idx: int | None = None


# --------------------------------------------------------------- the source

class QemuSource:
    """Every virtqueue of the QEMU whose QMP socket is ``qmp_path``.

    ``pid`` defaults to the socket's peer (SO_PEERCRED). ``map_refresh`` is
    how often (seconds) the flat view is looked at again for RAM changes,
    ``device_refresh`` the device list (hot-plug), ``queue_refresh`` the
    longest a queue's QMP state is reused, on average (see :meth:`_snapshot`).
    """

    def __init__(self, qmp_path: str, pid: int | None = None, *, timeout: float = 5.0,
                 map_refresh: float = 3.0, device_refresh: float = 3.0, queue_refresh: float = 5.0):
        self.qmp_path = qmp_path
        self.map_refresh = map_refresh
        self.device_refresh = device_refresh
        self.queue_refresh = queue_refresh
        self._signatures: dict[str, tuple] = {}
        self._queues: dict[tuple[str, int], _Cached] = {}
        self.qmp = QmpChannel(qmp_path, timeout)
        self._pmem = None
        try:
            self.pid = pid if pid is not None else self.qmp.pid
            if not self.pid:
                raise SourceError(f"cannot tell QEMU's pid from {qmp_path} (no SO_PEERCRED); give --pid")
            try:
                self.qmp.execute("x-query-virtio")
            except QmpCommandError as e:
                if e.error_class == "CommandNotFound":
                    ver = ((self.qmp.greeting or {}).get("QMP", {}).get("version", {}).get("qemu", {}))
                    v = ".".join(str(ver.get(k, "?")) for k in ("major", "minor", "micro")) if ver else "?"
                    raise SourceError(f"QEMU < 7.2 has no x-query-virtio (this QEMU is {v}); "
                                      f"vqscope needs QEMU 7.2 or newer") from None
                raise
            name = self.qmp.execute("query-name").get("name")
            self.name = name and f"qemu {name} pid {self.pid} ({qmp_path})" or f"qemu pid {self.pid} ({qmp_path})"
            from ..procmem import ProcessMemory

            self._pmem = ProcessMemory(self.pid)
            self._ram: list = []
            self._ram_key: tuple = ()
            self._ram_checked = 0.0
            self._devices: list[tuple[str, str]] = []
            self._devices_checked = 0.0
            self.refresh_map(force=True)
        except BaseException:
            self.close()
            raise

    # ---- memory map ---------------------------------------------------------
    @property
    def mem_fd(self) -> int | None:
        """The fd of QEMU's ``/proc/PID/mem`` (opened O_RDONLY)."""
        return getattr(self._pmem, "mem_fd", None)

    @property
    def ram(self) -> list:
        """The RamRange list (gpa, size, hva) of QEMU's guest RAM."""
        return list(self._ram)

    def refresh_map(self, force: bool = False) -> bool:
        """Re-read the flat view; rebuild the RAM table when it changed (or
        ``force``). Returns whether it was rebuilt."""
        from ..procmem import RamRange

        text = self.qmp.hmp("info mtree -f")
        ranges = parse_flatview(text)
        if not ranges:
            raise SourceError(f"QEMU pid {self.pid}: the memory address space has no RAM in `info mtree -f`")
        key = tuple(ranges)
        self._ram_checked = time.monotonic()
        if key == self._ram_key and not force:
            return False
        try:
            with open(f"/proc/{self.pid}/maps") as f:
                maps = parse_maps(f.read())
        except OSError as e:
            self._raise_if_gone()
            raise SourceError(f"cannot read /proc/{self.pid}/maps: {e.strerror}") from None
        ram = []
        for r in ranges:
            hva = parse_gpa2hva(self.qmp.hmp(f"gpa2hva {r.gpa:#x}"), r.gpa)
            check_mapped(maps, hva, r.size, f"RAM {r.name} at guest-physical {r.gpa:#x}+{r.size:#x}")
            ram.append(RamRange(gpa=r.gpa, size=r.size, hva=hva))
        self._ram, self._ram_key = ram, key
        return True

    def _gpa_to_hva(self, gpa: int) -> int | None:
        for r in self._ram:
            if r.gpa <= gpa < r.gpa + r.size:
                return gpa - r.gpa + r.hva
        return None

    def _alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            return False

    def _raise_if_gone(self) -> None:
        if not self._alive():
            raise SourceGone(f"QEMU pid {self.pid} ({self.qmp_path}) exited")

    # ---- devices --------------------------------------------------------------
    def _device_list(self) -> list[tuple[str, str]]:
        now = time.monotonic()
        if not self._devices or now - self._devices_checked > self.device_refresh:
            try:
                self._devices = [(str(d["path"]), str(d["name"])) for d in self.qmp.execute("x-query-virtio")]
            except (KeyError, TypeError) as e:
                raise SourceError(f"QEMU {self.qmp_path}: unexpected x-query-virtio reply "
                                  f"({type(e).__name__}: {e})") from None
            self._devices_checked = now
        return self._devices

    def device_states(self, devices: list[tuple[str, str]]) -> tuple[list[DeviceState], list[dict]]:
        """x-query-virtio-status of every ``(path, name)``, pipelined; and
        the devices that vanished meanwhile (hot-unplug)."""
        replies = self.qmp.execute_many([("x-query-virtio-status", {"path": p}, None) for p, _ in devices])
        states, skipped = [], []
        for (path, name), st in zip(devices, replies):
            if isinstance(st, QmpCommandError):
                self._devices = []  # read the list again next time
                skipped.append({"device": short_name(path, name), "index": None, "reason": st.desc})
                continue
            try:
                states.append(device_state(path, name, st))
            except (AttributeError, KeyError, TypeError, ValueError) as e:  # another QEMU's reply shape
                skipped.append({"device": short_name(path, name), "index": None,
                                "reason": f"unexpected x-query-virtio-status reply: {type(e).__name__}: {e}"})
        return states, skipped

    def queue_states(self, keys: list[tuple[DeviceState, int]]) -> list[tuple[DeviceState, int, QueueState | str]]:
        """Ask QEMU about queues ``(device, index)``: ``(device, index,
        QueueState)``, or a string saying why the queue is skipped. Each
        queue's command comes from :func:`queue_command` of its device's
        ``vhost_started`` (and nowhere else); all are pipelined."""
        calls = [(queue_command(dev.vhost_started), {"path": dev.path, "queue": i}, dev.vhost_started)
                 for dev, i in keys]
        out: list[tuple[DeviceState, int, QueueState | str]] = []
        for (dev, i), reply in zip(keys, self.qmp.execute_many(calls) if calls else []):
            if isinstance(reply, QmpCommandError):
                # e.g. a vhost device's queue QEMU keeps (virtio-net's control
                # queue): "Invalid vhost virtqueue number 2".
                out.append((dev, i, reply.desc))
            else:
                try:
                    q = queue_state(dev, i, reply) or "not set up"
                except (AttributeError, KeyError, TypeError, ValueError) as e:  # another QEMU's reply shape
                    q = (f"unexpected {queue_command(dev.vhost_started)} reply: "
                         f"{type(e).__name__}: {e}")
                out.append((dev, i, q))
        return out

    # ---- snapshot -------------------------------------------------------------
    def snapshot(self) -> dict:
        if self._pmem is None:
            raise SourceGone(f"QEMU source {self.qmp_path} is closed")
        try:
            return self._snapshot()
        except SourceGone:
            raise
        except SourceError:
            self._raise_if_gone()
            raise

    def _snapshot(self) -> dict:
        """One round. QMP is the expensive part (QEMU's monitor answers a few
        thousand commands a second, and a VM has hundreds of queues: virtme's
        six virtio-serial devices alone have 384), so a queue's QMP state is
        cached and asked again only when it may have changed:

        - its device's status, features or vhost state changed (reset, driver
          load): every queue of the device;
        - older than ``queue_refresh`` seconds;
        - for a queue QEMU services: the ring moved since (avail_idx or
          used_idx differ from the ring read right after the query), or QEMU
          had not caught up then (last_avail_idx != avail_idx). Otherwise its
          last_avail_idx cannot have changed: QEMU only pops what is available.

        The rings themselves are read every round."""
        now = time.monotonic()
        if now - self._ram_checked > self.map_refresh:
            self.refresh_map()
        devices, skipped = self.device_states(self._device_list())
        entries: dict[tuple[str, int], dict] = {}
        ask: list[tuple[DeviceState, int]] = []
        live = set()
        for dev in devices:
            if self._signatures.get(dev.path) != dev.signature:
                self._signatures[dev.path] = dev.signature
                for k in [k for k in self._queues if k[0] == dev.path]:
                    del self._queues[k]
            for i in range(dev.num_vqs):
                live.add((dev.path, i))
                c = self._queues.get((dev.path, i))
                if c is None or now > c.expires:
                    ask.append((dev, i))
                    continue
                if isinstance(c.q, str):
                    skipped.append({"device": dev.device, "index": i, "reason": c.q})
                    continue
                entry, dec = self._queue_entry(dev, c.q)
                if (not c.q.vhost and dec is not None
                        and not (dec.avail_idx == c.avail_idx == c.q.last_avail_idx
                                 and dec.used_idx == c.used_idx)):
                    ask.append((dev, i))
                    continue
                entries[(dev.path, i)] = entry
        for k in [k for k in self._queues if k not in live]:
            del self._queues[k]
        # QEMU's last_avail_idx is from before the ring read: on a busy queue
        # it can lag behind the ring's used_idx (used <= last_avail <= avail
        # always holds in QEMU). Such a queue is asked once more.
        for attempt in range(2):
            if not ask:
                break
            t = time.monotonic()
            again = []
            for dev, i, q in self.queue_states(ask):
                # expiries spread out, so that queues asked together are not asked together again
                c = _Cached(q, t + self.queue_refresh * random.uniform(0.5, 1.5))
                self._queues[(dev.path, i)] = c
                if isinstance(q, str):
                    skipped.append({"device": dev.device, "index": i, "reason": q})
                    continue
                entry, dec = self._queue_entry(dev, q)
                if dec is not None:
                    c.avail_idx, c.used_idx = dec.avail_idx, dec.used_idx
                    if q.last_avail_idx is not None and not ring_between(dec.used_idx, q.last_avail_idx,
                                                                     dec.avail_idx):
                        again.append((dev, i))
                entries[(dev.path, i)] = entry
            ask = again
        queues = [entries[k] for d in devices for k in ((d.path, i) for i in range(d.num_vqs))
                  if k in entries]
        skipped.sort(key=lambda s: (s["device"], s["index"] if s["index"] is not None else -1))
        return {"source": self.name, "time": time.time(), "pid": self.pid,
                "queues": queues, "skipped": skipped}

    def _read_ring(self, q: QueueState):
        from ..procmem import snapshot_remote_split

        return snapshot_remote_split(self._pmem, self._ram, q.num, q.desc, q.avail, q.used,
                                     q.last_avail_idx)

    def _queue_entry(self, dev: DeviceState, q: QueueState) -> tuple[dict[str, Any], Any]:
        """The snapshot entry of ``q`` and the RingSnapshot it came from
        (None when the ring could not be read)."""
        event_idx = bool(dev.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        packed = bool(dev.features >> VIRTIO_F_RING_PACKED & 1)
        entry: dict[str, Any] = {
            "device": dev.device, "index": q.index, "layout": "packed" if packed else "split",
            "size": q.num, "features": dev.features, "event_idx": event_idx,
            "avail_idx": 0, "used_idx": 0, "last_avail_idx": q.last_avail_idx, "inflight": 0,
            "avail_flags": 0, "used_flags": 0, "used_event": None, "avail_event": None,
            "kicks": 0, "calls": 0, "calls_suppressed": 0, "packets": 0, "bytes": 0,
            "chains": [], "anomalies": [], "qemu": q.qemu_dict(dev.path),
        }
        anomalies = entry["anomalies"]
        if dev.broken:
            anomalies.append({"kind": "device_broken", "detail": f"QEMU marked {dev.path} broken"})
        if packed:
            anomalies.append({"kind": "layout_unsupported",
                              "detail": "VIRTIO_F_RING_PACKED negotiated; only split rings are decoded"})
            return entry, None
        if q.vhost:
            # The device reported QEMU virtual addresses too: they must be
            # where our map puts the guest-physical ones.
            for area in ("desc", "avail", "used"):
                gpa, hva = getattr(q, area), getattr(q, area + "_hva")
                mine = self._gpa_to_hva(gpa)
                if mine is not None and mine != hva:
                    anomalies.append({"kind": "address_mismatch",
                                      "detail": f"{area} at guest-physical {gpa:#x}: vhost has QEMU "
                                                f"address {hva:#x}, the RAM map gives {mine:#x}"})
        from ..procmem import ProcessExitedError

        try:
            dec = self._read_ring(q)
        except ProcessExitedError as e:
            raise SourceGone(f"QEMU pid {self.pid} ({self.qmp_path}) exited: {e}") from None
        except InspectorError as e:
            self._raise_if_gone()
            # The map may have changed (hot-plug): rebuild it once and retry.
            if self.refresh_map():
                try:
                    dec = self._read_ring(q)
                except InspectorError as e2:
                    self._raise_if_gone()
                    anomalies.append({"kind": "ring_unmapped", "detail": str(e2)})
                    return entry, None
            else:
                anomalies.append({"kind": "ring_unmapped", "detail": str(e)})
                return entry, None
        # None when QEMU's answer is older than the ring read (procmem):
        # _snapshot asks QMP again.
        entry["last_avail_idx"] = dec.last_avail_idx
        entry["avail_idx"] = dec.avail_idx
        entry["used_idx"] = dec.used_idx
        entry["inflight"] = dec.inflight
        entry["avail_flags"] = dec.avail_flags
        entry["used_flags"] = dec.used_flags
        entry["chains"] = dec.chains
        if event_idx:
            entry["used_event"] = dec.used_event
            entry["avail_event"] = dec.avail_event
        anomalies += dec.anomaly_dicts()
        return entry, dec

    # ---- lifetime -------------------------------------------------------------
    def close(self) -> None:
        pmem, self._pmem = self._pmem, None
        if pmem is not None:
            close = getattr(pmem, "close", None)
            if close:
                close()
        self.qmp.close()

    def __enter__(self) -> "QemuSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

