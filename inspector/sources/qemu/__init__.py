"""A running QEMU as a source: every virtqueue of a live VM, read without
side effects through QMP and ``/proc/PID/mem``.

What comes from where (QEMU ≥ 7.2, whose ``x-query-virtio*`` commands this
uses; their replies are quoted in the QEMU attach tests):

- ``x-query-virtio``: the virtio devices, by QOM path.
- ``x-query-virtio-status`` per device: negotiated (guest) features,
  ``num-vqs``, ``broken``, and ``vhost-started``.
- per queue, the ONE command :func:`queue_command` picks from
  ``vhost-started``:

  - QEMU services the queue itself: ``x-query-virtio-queue-status`` —
    ``vring-desc/avail/used`` (guest-physical), ``vring-num``,
    ``last-avail-idx``, ``shadow-avail-idx`` (the snapshot's
    ``shadow_avail_idx``), ``used-idx``, ``signalled-used``. Side-effect
    free there: it copies QEMU's own VirtQueue fields.
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
- the rings: :mod:`inspector.ring.remote`, one ``process_vm_readv`` per queue.
  A packed queue (VIRTIO_F_RING_PACKED, §2.8) that QEMU services is decoded
  with QEMU's ``used-idx`` and ``last-avail-idx`` as bare slots (QMP has no
  wrap counters; ``positions`` "derived": the counters come from the ring,
  :mod:`inspector.ring.reference_packed`); a packed queue of a started
  vhost device from the descriptor flags alone (``positions`` "flags").
- each queue's ``device_type``: the device's virtio name (``virtio-net``...)
  as VIRTIO §5 names it (:func:`inspector.analysis.roles.device_type_of`).
- a block device's (virtio-blk, vhost-user-blk) in-flight chains: their
  virtio-blk request headers (:mod:`inspector.ring.blk_request`), read in one
  more ``process_vm_readv`` per queue that has chains in flight.

The QMP connection lives on a private event loop in its own thread, so
:meth:`QemuSource.snapshot` can be called from any thread (the TUI polls
from a worker) and inside a program that runs its own asyncio loop.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

from ...analysis.roles import device_type_of
from ...errors import InspectorError, SourceError, SourceGone
from ...memory.process import ProcessExitedError, ProcessMemory, RamRange
from ...ring.anomalies import Anomaly, AnomalyKind
from ...ring.blk_request import attach_requests, process_reader
from ...ring.checks import ring_between
from ...ring.packed import PackedRingSnapshot, packed_counter
from ...ring.remote import snapshot_remote_packed, snapshot_remote_split
from ...ring.snapshot import RingSnapshot
from ...snapshot.model import QueueEntry, Skipped, Snapshot
from ...spec.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX
from ..base import Source
from .hmp import FlatRange, Mapping, check_mapped, iommu_model, parse_flatview, parse_gpa2hva, parse_maps
from .qmp import VHOST_UNSAFE, QmpChannel, QmpCommandError, peer_pid, queue_command
from .state import (FEATURE_BITS, DeviceState, QueueState, device_state, features_mask, queue_state,
                    short_name)

__all__ = ["QemuSource", "FlatRange", "Mapping", "check_mapped", "parse_flatview", "parse_gpa2hva",
           "parse_maps", "VHOST_UNSAFE", "QmpChannel", "QmpCommandError", "peer_pid",
           "queue_command", "FEATURE_BITS", "DeviceState", "QueueState", "device_state",
           "features_mask", "queue_state", "short_name"]


@dataclass
class _Cached:
    """A queue's QMP state (or why it is skipped), until when it may be
    reused, and the ring's positions read right after it was asked
    (:func:`_marks`)."""

    q: QueueState | str
    expires: float
    marks: tuple[int, int] | None = None


def _marks(dec: RingSnapshot | PackedRingSnapshot) -> tuple[int, int]:
    """Where the driver and the device are in a decoded ring: split
    ``(avail_idx, used_idx)``, packed the counters of next_avail and
    next_used (:func:`inspector.ring.packed.packed_counter`)."""
    if isinstance(dec, PackedRingSnapshot):
        return (packed_counter(dec.next_avail, dec.avail_wrap_counter, dec.size),
                packed_counter(dec.next_used, dec.used_wrap_counter, dec.size))
    return dec.avail_idx, dec.used_idx


def _caught_up(q: QueueState, dec: RingSnapshot | PackedRingSnapshot) -> bool:
    """Had QEMU taken everything available when it answered? Then its
    last_avail_idx cannot change until the ring moves (QEMU only pops what
    is available)."""
    if isinstance(dec, PackedRingSnapshot):
        return (dec.positions == "derived" and dec.last_avail_idx is not None
                and (dec.last_avail_idx, dec.last_avail_wrap_counter)
                == (dec.next_avail, dec.avail_wrap_counter))
    return dec.avail_idx == q.last_avail_idx


def _older_than_ring(q: QueueState, dec: RingSnapshot | PackedRingSnapshot) -> bool:
    """Is QEMU's answer older than the ring read (ask it again)? Split:
    its last_avail_idx is not between the ring's used_idx and avail_idx
    (QEMU keeps used <= last_avail <= avail). Packed: the decoder could not
    use QEMU's positions (:func:`inspector.ring.remote.snapshot_remote_packed`
    fell back to the flags)."""
    if q.last_avail_idx is None:
        return False
    if isinstance(dec, PackedRingSnapshot):
        return dec.positions != "derived"
    return not ring_between(dec.used_idx, q.last_avail_idx, dec.avail_idx)


# --------------------------------------------------------------- the source

class QemuSource(Source):
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
        self._iommu: str | None = None
        self._iommu_checked: float | None = None
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

    def device_states(self, devices: list[tuple[str, str]]) -> tuple[list[DeviceState], list[Skipped]]:
        """x-query-virtio-status of every ``(path, name)``, pipelined; and
        the devices that vanished meanwhile (hot-unplug)."""
        replies = self.qmp.execute_many([("x-query-virtio-status", {"path": p}, None) for p, _ in devices])
        states, skipped = [], []
        for (path, name), st in zip(devices, replies):
            if isinstance(st, QmpCommandError):
                self._devices = []  # read the list again next time
                skipped.append(Skipped(short_name(path, name), None, st.desc))
                continue
            try:
                states.append(device_state(path, name, st))
            except (AttributeError, KeyError, TypeError, ValueError) as e:  # another QEMU's reply shape
                skipped.append(Skipped(short_name(path, name), None,
                                       f"unexpected x-query-virtio-status reply: {type(e).__name__}: {e}"))
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
    def snapshot(self) -> Snapshot:
        """Every virtqueue of the VM now (see :meth:`_snapshot`); SourceGone
        when QEMU exited, SourceError when it cannot be asked."""
        if self._pmem is None:
            raise SourceGone(f"QEMU source {self.qmp_path} is closed")
        try:
            return self._snapshot()
        except SourceGone:
            raise
        except SourceError:
            self._raise_if_gone()
            raise

    def _snapshot(self) -> Snapshot:
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
        entries: dict[tuple[str, int], QueueEntry] = {}
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
                    skipped.append(Skipped(dev.device, i, c.q))
                    continue
                entry, dec = self._queue_entry(dev, c.q)
                if (not c.q.vhost and dec is not None
                        and not (_marks(dec) == c.marks and _caught_up(c.q, dec))):
                    ask.append((dev, i))
                    continue
                entries[(dev.path, i)] = entry
        for k in [k for k in self._queues if k not in live]:
            del self._queues[k]
        # QEMU's last_avail_idx is from before the ring read: on a busy queue
        # it can lag behind the ring's used_idx (used <= last_avail <= avail
        # always holds in QEMU); a packed queue's positions can be older
        # than its ring (_older_than_ring). Such a queue is asked once more.
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
                    skipped.append(Skipped(dev.device, i, q))
                    continue
                entry, dec = self._queue_entry(dev, q)
                if dec is not None:
                    c.marks = _marks(dec)
                    if _older_than_ring(q, dec):
                        again.append((dev, i))
                entries[(dev.path, i)] = entry
            ask = again
        queues = [entries[k] for d in devices for k in ((d.path, i) for i in range(d.num_vqs))
                  if k in entries]
        skipped.sort(key=lambda s: (s.device, s.index if s.index is not None else -1))
        return Snapshot(source=self.name, time=time.time(), pid=self.pid, queues=queues, skipped=skipped)

    def _read_ring(self, q: QueueState, packed: bool):
        if not packed:
            return snapshot_remote_split(self._pmem, self._ram, q.num, q.desc, q.avail, q.used,
                                         q.last_avail_idx)
        # QEMU's VirtQueue of a packed ring keeps last_avail_idx and used_idx
        # as slots (0..num-1) with separate wrap counters that QMP does not
        # report: bare slots, counters derived from the ring. A value that
        # is not a slot (another QEMU's reply) is not used.
        def slot(v):
            return v if v is not None and 0 <= v < q.num else None
        nu, la = slot(q.qemu_used_idx), slot(q.last_avail_idx)
        dec = snapshot_remote_packed(self._pmem, self._ram, q.num, q.desc, q.avail, q.used,
                                     next_used=nu, last_avail_idx=la if nu is not None else None)
        if (dec.positions == "derived" and q.inuse and dec.inflight == q.num
                and (dec.last_avail_idx, dec.last_avail_wrap_counter) == (dec.next_used, dec.used_wrap_counter)):
            # Every descriptor outstanding and last-avail-idx == used-idx: the
            # ring cannot tell "QEMU took all" from "took none"
            # (reference_packed); QEMU's inuse (popped, not returned) can.
            uw = dec.used_wrap_counter
            dec = snapshot_remote_packed(self._pmem, self._ram, q.num, q.desc, q.avail, q.used,
                                         next_used=nu, used_wrap_counter=uw, last_avail_idx=la,
                                         last_avail_wrap_counter=1 - uw)
            dec.positions = "derived"   # the wrap counters still come from the ring (and inuse)
        return dec

    def _queue_entry(self, dev: DeviceState, q: QueueState,
                     ) -> tuple[QueueEntry, RingSnapshot | PackedRingSnapshot | None]:
        """The snapshot entry of ``q`` and the RingSnapshot or
        PackedRingSnapshot it came from (None when the ring could not be
        read). A packed queue's ``vring-avail``/``vring-used`` are its driver
        and device event suppression areas (§2.8.10)."""
        packed = bool(dev.features >> VIRTIO_F_RING_PACKED & 1)
        entry = QueueEntry(
            device=dev.device, index=q.index, layout="packed" if packed else "split", size=q.num,
            features=dev.features, event_idx=bool(dev.features >> VIRTIO_RING_F_EVENT_IDX & 1),
            last_avail_idx=q.last_avail_idx, calls_suppressed=0, extras={"qemu": q.qemu_dict(dev.path)},
            device_type=device_type_of(dev.name), shadow_avail_idx=q.shadow_avail_idx)
        anomalies = entry.anomalies
        if dev.broken:
            anomalies.append(Anomaly(AnomalyKind.DEVICE_BROKEN, f"QEMU marked {dev.path} broken"))
        if q.vhost:
            # The device reported QEMU virtual addresses too: they must be
            # where our map puts the guest-physical ones.
            for area in ("desc", "avail", "used"):
                gpa, hva = getattr(q, area), getattr(q, area + "_hva")
                mine = self._gpa_to_hva(gpa)
                if mine is not None and mine != hva:
                    anomalies.append(Anomaly(AnomalyKind.ADDRESS_MISMATCH,
                                             f"{area} at guest-physical {gpa:#x}: vhost has QEMU "
                                             f"address {hva:#x}, the RAM map gives {mine:#x}"))
        iommu = self._viommu() if dev.features >> VIRTIO_F_ACCESS_PLATFORM & 1 else None
        if iommu:
            # The driver maps its rings through the vIOMMU (VIRTIO 1.2 §6.1): desc/avail/used are
            # IOVAs. Translating them would mean walking the guest's IOMMU page tables; they are
            # not read as guest-physical (that reads unrelated memory, or nothing).
            anomalies.append(Anomaly(AnomalyKind.IOVA_UNTRANSLATED,
                                     f"{dev.path} negotiated VIRTIO_F_ACCESS_PLATFORM behind a vIOMMU "
                                     f"({iommu}): desc {q.desc:#x}, avail {q.avail:#x}, used {q.used:#x} are "
                                     f"IOVAs; the ring is not read"))
            if not q.vhost and q.shadow_avail_idx is not None and q.qemu_used_idx is not None:
                # QEMU's own view of a queue it services: what it last read and wrote
                entry.avail_idx, entry.used_idx = q.shadow_avail_idx, q.qemu_used_idx
                entry.inflight = (q.shadow_avail_idx - q.qemu_used_idx) & 0xFFFF
            return entry, None
        try:
            dec = self._read_ring(q, packed)
        except ProcessExitedError as e:
            raise SourceGone(f"QEMU pid {self.pid} ({self.qmp_path}) exited: {e}") from None
        except InspectorError as e:
            self._raise_if_gone()
            # The map may have changed (hot-plug): rebuild it once and retry.
            if self.refresh_map():
                try:
                    dec = self._read_ring(q, packed)
                except InspectorError as e2:
                    self._raise_if_gone()
                    anomalies.append(Anomaly(AnomalyKind.RING_UNMAPPED, str(e2)))
                    return entry, None
            else:
                anomalies.append(Anomaly(AnomalyKind.RING_UNMAPPED, str(e)))
                return entry, None
        # last_avail_idx None when QEMU's answer is older than the ring read
        # (ring.remote): _snapshot asks QMP again.
        entry.fill_from_ring(dec)
        if entry.device_type == "block" and dec.n_chains:
            # virtio-blk / vhost-user-blk: each in-flight chain's request header,
            # all in one process_vm_readv after the ring read (a chain returned
            # meanwhile may show the driver's next request in its buffers).
            attach_requests(dec, process_reader(self._pmem, self._ram))
        return entry, dec

    def _viommu(self) -> str | None:
        """The vIOMMU in front of the machine's devices, by the IOMMU memory
        regions of ``info mtree`` (intel-iommu: ``vtd-BB.F-dmar``;
        virtio-iommu; AMD; SMMUv3), or None; looked at again every
        ``map_refresh`` s."""
        now = time.monotonic()
        if self._iommu_checked is None or now - self._iommu_checked >= self.map_refresh:
            self._iommu = iommu_model(self.qmp.hmp("info mtree"))
            self._iommu_checked = now
        return self._iommu

    # ---- lifetime -------------------------------------------------------------
    def close(self) -> None:
        pmem, self._pmem = self._pmem, None
        if pmem is not None:
            close = getattr(pmem, "close", None)
            if close:
                close()
        self.qmp.close()

