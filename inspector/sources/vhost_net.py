"""Kernel vhost-net queues of one process as a source: the guest-visible
half from ``/proc/PID/mem``, the device-private half from BCC probes.

A process that drives vhost-net (QEMU with ``vhost=on``, or ``vqscope load
vhost-net``) holds ``/dev/vhost-net`` fds; the kernel keeps, per vring, a
``struct vhost_virtqueue`` whose ``desc``/``avail``/``used`` are user virtual
addresses in that process and whose ``last_avail_idx``, ``last_used_idx``,
``signalled_used``… nobody else can see. What comes from where:

- the process's vhost-net fds: ``/proc/PID/fd`` links to ``/dev/vhost-net``;
- every vring of the process and its device-private state:
  :meth:`probes.vhost_net.VhostNetProbe.queue_states` (a vring shows up once
  one of vhost's handlers or notification functions ran for it after the
  probes attached: a kick, a packet, a call), kicks/calls/used entries
  counted in the kernel (``counters()``) and log2 latency histograms;
- the memory table (guest-physical → user address) and which fd a vring
  belongs to: the ``vhost_ioctl`` probe, when the process set them up while
  it was attached. Without it, a process with one vhost-net fd names it
  anyway; descriptor addresses (guest-physical) cannot be checked, and the
  queue carries one ``mem_table_unknown`` anomaly instead of an
  ``addr_out_of_range`` per descriptor;
- the rings: :func:`inspector.ring.remote.snapshot_remote_split`, one
  ``process_vm_readv`` per vring, never a write;
- with vhost's device IOTLB on (the owner acked VIRTIO_F_ACCESS_PLATFORM;
  the probe reads ``vq->iotlb``), ``desc``/``avail``/``used`` and every
  descriptor address are IOVAs: they are translated through the probe's
  mirror of that IOTLB (:meth:`probes.vhost_net.VhostNetProbe.iotlb`: the
  maps walked when vqscope first saw the device, then every update and
  invalidation), never through the memory table. The IOTLB is a cache the
  owner fills on misses, so an IOVA without a map is not the driver's
  fault: a ring area without one is an ``iova_untranslated`` anomaly (the
  ring is not read), a descriptor without one an ``iova_untranslated``
  anomaly of its chain (instead of ``addr_out_of_range``).

Queue entries are those of README "Snapshot JSON", device
``vhost-net:PID:FD`` (``vhost-net:PID:?`` when the fd cannot be told),
index 0 (RX) / 1 (TX) as in drivers/vhost/net.c, ``last_avail_idx``
vhost's, plus ``device_state`` and ``histograms`` (README "vhost-net"), and
with the device IOTLB ``iotlb`` (:func:`iotlb_extras`).
"""

from __future__ import annotations

import os
import time

from probes.attach import has_bpf_privilege
from probes.base import PrivilegeError
from probes.iotlb import translation_ranges
from probes.vhost_ioctl import VhostIoctlProbe
from probes.vhost_net import VhostNetProbe

from ..errors import InspectorError, RingError, SourceError, SourceGone
from ..layout import avail_ring_size, desc_table_size, used_ring_size
from ..memory.process import ProcessMemory, RamRange, ram_hva
from ..ring.anomalies import Anomaly, AnomalyKind
from ..ring.remote import snapshot_remote_split
from ..snapshot.model import QueueEntry, Skipped, Snapshot
from ..spec.vhost import DEV_VHOST_NET, VHOST_ACCESS_NAMES
from ..spec.virtio import VIRTIO_RING_F_EVENT_IDX, has_feature
from .base import Source

#: Anomalies that need the memory table: dropped when it is unknown.
NEEDS_MEM_TABLE = frozenset({AnomalyKind.ADDR_OUT_OF_RANGE, AnomalyKind.INDIRECT_OUT_OF_RANGE})
#: Ring areas in the order snapshot_remote_split takes them.
RING_AREAS = ("desc", "avail", "used")


def iova_ranges(ranges: list[tuple[int, int, int, int]]) -> list[RamRange]:
    """RamRanges (``gpa`` = IOVA, ``hva`` = the owner's user address) of
    :func:`probes.iotlb.translation_ranges`' ``(iova, size, uaddr, perm)``,
    neighbours contiguous in both spaces merged whatever their permission
    (the ring reader checks addresses, not access)."""
    out: list[RamRange] = []
    for iova, size, uaddr, _perm in ranges:
        if out and out[-1].gpa + out[-1].size == iova and out[-1].hva + out[-1].size == uaddr:
            out[-1] = RamRange(out[-1].gpa, out[-1].size + size, out[-1].hva)
        else:
            out.append(RamRange(iova, size, uaddr))
    return out


def untranslated(anomalies: list[Anomaly]) -> list[Anomaly]:
    """``anomalies`` of a ring read through the device IOTLB with every
    ``addr_out_of_range`` / ``indirect_out_of_range`` (an IOVA no map holds)
    turned into ``iova_untranslated`` of the same chain: the IOTLB is a
    cache vhost fills on misses, so the IOVA may be one it has not missed
    on yet, or one invalidated since."""
    out = []
    for a in anomalies:
        if a.kind in NEEDS_MEM_TABLE:
            a = Anomaly(AnomalyKind.IOVA_UNTRANSLATED,
                        f"{a.detail} (an IOVA with no device-IOTLB map: not missed on yet, or invalidated)",
                        a.head)
        out.append(a)
    return out


def iotlb_extras(mirror, ranges: list[tuple[int, int, int, int]], areas: list[tuple[int, int]],
                 lost: int) -> dict:
    """The queue entry's ``iotlb`` extras: ``entries`` (maps mirrored),
    ``ranges`` (after merging), ``source`` ("probe"), ``complete`` (False
    when the walk was truncated, maps were dropped or records lost),
    ``walked`` (the maps present before the probes attached were read) and
    ``ring``: per area ``{"iova", "uaddr" (None: no map), "perm"}`` (the
    access every map under the area grants; an area may span maps
    contiguous in both spaces)."""
    ram = iova_ranges(ranges)
    ring = {}
    for name, (iova, n) in zip(RING_AREAS, areas):
        uaddr = ram_hva(ram, iova, n)
        perm = 0
        if uaddr is not None:
            perm = 3
            for r_iova, r_size, _u, r_perm in ranges:
                if r_iova < iova + n and iova < r_iova + r_size:
                    perm &= r_perm
        ring[name] = {"iova": iova, "uaddr": uaddr, "perm": VHOST_ACCESS_NAMES.get(perm)}
    return {"entries": len(mirror) if mirror is not None else 0, "ranges": len(ranges), "source": "probe",
            "walked": bool(mirror is not None and mirror.walked),
            "complete": bool(mirror is not None and mirror.complete and not lost), "ring": ring}


def vhost_net_fds(pid: int) -> list[int]:
    """The fds of process ``pid`` open on /dev/vhost-net, sorted. Raises
    SourceError when the process does not exist or its fds cannot be
    listed."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        raise SourceError(f"no process with pid {pid} (--vhost-net PID)") from None
    except PermissionError:
        raise SourceError(f"no permission to list the fds of process {pid}: run as root") from None
    out = []
    for n in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}") == DEV_VHOST_NET:
                out.append(int(n))
        except OSError:
            continue  # closed meanwhile
    return sorted(out)


def check_kernel(plan: list) -> None:
    """Raise InspectorError when this kernel cannot show vhost-net queues:
    no /dev/vhost-net, or no handler attach point (the reasons the vhost_net
    probe's plan gives: no kprobes, no BTF, functions not found)."""
    if not os.path.exists(DEV_VHOST_NET):
        raise InspectorError(f"this kernel has no vhost-net ({DEV_VHOST_NET} missing): load it with "
                             f"`modprobe vhost_net` (CONFIG_VHOST_NET); no process here can have "
                             f"vhost-net queues")
    handlers = [ap for ap in plan if ap.wanted.startswith("handle_")]
    if not any(ap.ok for ap in handlers):
        reasons = sorted({ap.reason for ap in handlers if ap.reason})
        raise InspectorError("cannot probe vhost-net on this kernel: " + "; ".join(reasons)
                             + " (see `vqscope probe --list`)")


class VhostNetSource(Source):
    """Every vhost-net vring of process ``pid`` (see the module docstring).

    ``stream``: also collect per-event records for :meth:`events`;
    ``wait``: at the first snapshot, how long (seconds) to wait for the
    probes to see each vhost-net device's vrings; ``ioctl_probe``: attach
    the vhost_ioctl probe too (memory tables and fds of rings set up from
    now on). ``probes``: an already attached ``(VhostNetProbe,
    VhostIoctlProbe or None)`` to use instead of compiling new ones (they
    stay the caller's: close() leaves them attached). Raises PrivilegeError (an InspectorError) without root/CAP_BPF,
    InspectorError on a kernel without vhost-net or kprobes, SourceError
    for a process without vhost-net fds.
    """

    def __init__(self, pid: int, *, stream: bool = False, wait: float = 3.0, ioctl_probe: bool = True,
                 probes: tuple | None = None):
        self.pid = pid
        self.has_events = stream
        self._borrowed = probes is not None
        self.name = f"vhost-net pid {pid}"
        self.wait = wait
        self._waited = False
        self.probe = None
        self.ioctl = None
        self._pmem = None
        if not has_bpf_privilege():
            raise PrivilegeError("reading vhost-net queues needs BCC probes: run as root (or with CAP_BPF "
                                 "and CAP_PERFMON, plus CAP_SYS_PTRACE to read the process's memory)")
        probe = probes[0] if probes is not None else VhostNetProbe(pids=[pid], stream=stream)
        check_kernel(probe.plan())
        self.fds = vhost_net_fds(pid)
        if not self.fds:
            raise SourceError(f"process {pid} ({_comm(pid)}) holds no {DEV_VHOST_NET} fd: give the pid "
                              f"of a QEMU with vhost=on or of `vqscope load vhost-net`")
        try:
            self._pmem = ProcessMemory(pid)
            self.probe = probe
            if probes is not None:
                self.ioctl = probes[1]
            else:
                probe.attach()
                if ioctl_probe:
                    self.ioctl = _ioctl_probe(pid)
        except BaseException:
            self.close()
            raise

    # ---- lifetime ---------------------------------------------------------
    def close(self) -> None:
        for p in (self.probe, self.ioctl):
            if p is not None and not self._borrowed:
                p.close()
        self.probe = self.ioctl = None
        if self._pmem is not None:
            self._pmem.close()
            self._pmem = None

    # ---- what the probes know ------------------------------------------------
    def _states(self) -> dict:
        """``{vq address: VhostVqState}`` of this process's vrings; waits
        (once, up to ``wait`` s) until each vhost-net fd has its two."""
        states = {}
        deadline = time.monotonic() + (0 if self._waited else self.wait)
        while True:
            states = {vq: s for vq, s in self.probe.queue_states().items() if s.owner_pid == self.pid}
            if len(states) >= 2 * len(self.fds) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self._waited = True
        return states

    def _device_of(self, st):
        """``(device name, VhostDevState of its fd or None)`` for vring
        state ``st``: the fd whose VHOST_SET_VRING_ADDR (seen by the ioctl
        probe) gave these addresses, else the only vhost-net fd, else ``?``."""
        devices = self.ioctl.devices() if self.ioctl is not None else {}
        for (pid, fd), dev in devices.items():
            if pid != self.pid:
                continue
            for vr in dev.vrings.values():
                if (vr.desc, vr.avail, vr.used) == (st.desc, st.avail, st.used):
                    return f"vhost-net:{self.pid}:{fd}", dev
        if len(self.fds) == 1:
            return f"vhost-net:{self.pid}:{self.fds[0]}", None
        return f"vhost-net:{self.pid}:?", None

    def _check_alive(self) -> None:
        if not os.path.exists(f"/proc/{self.pid}"):
            raise SourceGone(f"process {self.pid} exited: its vhost-net queues are gone")

    # ---- snapshot ---------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Every vring of the process seen so far."""
        if self.probe is None:
            raise SourceGone(f"vhost-net source for pid {self.pid} is closed")
        self._check_alive()
        try:
            self.fds = vhost_net_fds(self.pid) or self.fds
        except SourceError:
            self._check_alive()
            raise
        states = self._states()
        counters = self.probe.counters()
        hists = self.probe.histograms()
        queues, skipped = [], []
        for vq, st in sorted(states.items(), key=lambda kv: (kv[1].index, kv[0])):
            device, dev = self._device_of(st)
            queues.append(self._entry(device, dev, st, counters.get(vq, {}), hists.get(vq, {})))
        queues.sort(key=lambda q: q.id)
        seen = {q.device for q in queues}
        if len(queues) < 2 * len(self.fds):
            for fd in self.fds:
                if f"vhost-net:{self.pid}:{fd}" not in seen:
                    skipped.append(Skipped(f"vhost-net:{self.pid}:{fd}", None,
                                           "no vring of this device seen yet: the probes see a vring "
                                           "when vhost works on it (a kick, a packet, a call)"))
        return Snapshot(source=self.name, time=time.time(), pid=self.pid, queues=queues, skipped=skipped)

    def _entry(self, device: str, dev, st, cnt: dict, hist: dict) -> QueueEntry:
        features = dev.features if dev is not None else None
        if features is None:
            features = getattr(st, "acked_features", None)
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        entry = QueueEntry(
            device=device, index=st.index, size=st.num, features=features or 0,
            event_idx=has_feature(features or 0, VIRTIO_RING_F_EVENT_IDX),
            last_avail_idx=st.last_avail_idx, kicks=cnt.get("kicks", 0), calls=cnt.get("calls", 0),
            calls_suppressed=cnt.get("calls_suppressed", 0), packets=cnt.get("used_added", 0),
            device_type="net", shadow_avail_idx=st.avail_idx,   # vhost's vq->avail_idx: what it last read
            extras={"device_state": {
                "last_avail_idx": st.last_avail_idx, "avail_idx": st.avail_idx,
                "last_used_idx": st.last_used_idx, "used_flags": st.used_flags,
                "signalled_used": st.signalled_used, "signalled_used_valid": st.signalled_used_valid,
                "notify_enabled": st.notify_enabled, "owner_pid": st.owner_pid, "vq": st.vq,
                "desc": st.desc, "avail": st.avail, "used": st.used,
                "acked_features": st.acked_features,
                "age_s": max(0, now_ns - st.time_ns) / 1e9,
            },
            "probe_counters": dict(cnt),
            "histograms": {name: {str(low): n for low, n in sorted(b.items())} for name, b in hist.items()},
        })
        if not st.num:
            entry.anomalies.append(Anomaly(AnomalyKind.RING_UNMAPPED, "vring size 0 (not set up)"))
            return entry
        if getattr(st, "iotlb", 0):
            return self._iova_entry(entry, st)
        mem_table = [(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                     for r in dev.mem_table] if dev is not None and dev.mem_table else None
        try:
            dec = self._read_ring(st, mem_table)
        except SourceGone:
            raise
        except (RingError, SourceError) as e:
            self._check_alive()
            entry.anomalies.append(Anomaly(AnomalyKind.RING_UNMAPPED, str(e)))
            return entry
        # last_avail_idx None when the probe's value (vhost's last handler
        # run) is older than the ring read (ring.remote); device_state keeps
        # the probe's value.
        entry.fill_from_ring(dec)
        if mem_table is None:
            entry.anomalies = [a for a in entry.anomalies if a.kind not in NEEDS_MEM_TABLE]
            entry.anomalies.append(Anomaly(AnomalyKind.MEM_TABLE_UNKNOWN,
                                           "the vhost memory table was set before vqscope attached: "
                                           "descriptor addresses (guest-physical) are not checked"))
        return entry

    def _iova_entry(self, entry: QueueEntry, st) -> QueueEntry:
        """Fill ``entry`` for a vring whose addresses are IOVAs (``st.iotlb``
        set): translate through the probe's mirror of that IOTLB (module
        docstring)."""
        mirror = self.probe.iotlb(st.iotlb)
        lost = self.probe.iotlb_lost()
        ranges = translation_ranges(mirror.maps()) if mirror is not None else []
        areas = [(st.desc, desc_table_size(st.num)), (st.avail, avail_ring_size(st.num)),
                 (st.used, used_ring_size(st.num))]
        extras = iotlb_extras(mirror, ranges, areas, lost)
        entry.extras["iotlb"] = extras
        missing = [name for name in RING_AREAS if extras["ring"][name]["uaddr"] is None]
        if missing:
            seen = "" if extras["walked"] else "; its maps from before vqscope attached were not read yet"
            entry.anomalies.append(Anomaly(AnomalyKind.IOVA_UNTRANSLATED, (
                "vring " + ", ".join(f"{n} at IOVA {extras['ring'][n]['iova']:#x}" for n in missing)
                + f": no map in vhost's device IOTLB ({extras['entries']} maps known{seen}); not read")))
            return entry
        try:
            dec = snapshot_remote_split(self._pmem, iova_ranges(ranges), st.num, st.desc, st.avail, st.used,
                                        st.last_avail_idx)
        except SourceGone:
            raise
        except (RingError, SourceError) as e:
            self._check_alive()
            entry.anomalies.append(Anomaly(AnomalyKind.RING_UNMAPPED, str(e)))
            return entry
        entry.fill_from_ring(dec)
        entry.anomalies = untranslated(entry.anomalies)
        return entry

    def _read_ring(self, st, mem_table):
        """Decode the vring at ``st``'s user addresses. With the memory
        table (``[(guest_phys_addr, size, userspace_addr)]``) the areas are
        translated to guest-physical and buffers are checked against guest
        memory; without, each area is its own range (gpa = its address)."""
        areas = [(st.desc, desc_table_size(st.num)), (st.avail, avail_ring_size(st.num)),
                 (st.used, used_ring_size(st.num))]
        if mem_table:
            ram = [RamRange(gpa=g, size=n, hva=u) for g, n, u in mem_table]
            gpas = []
            for (uva, n), what in zip(areas, ("desc", "avail", "used")):
                g = next((r.gpa + uva - r.hva for r in ram if r.hva <= uva and uva + n <= r.hva + r.size), None)
                if g is None:
                    raise RingError(f"vring {what} at user address {uva:#x} (+{n:#x}) is outside the "
                                    f"memory table of process {self.pid}")
                gpas.append(g)
        else:
            ram = [RamRange(gpa=uva, size=n, hva=uva) for uva, n in areas]
            gpas = [uva for uva, _ in areas]
        return snapshot_remote_split(self._pmem, ram, st.num, *gpas, st.last_avail_idx)

    # ---- events -------------------------------------------------------------------
    def events(self) -> list:
        """Probe events since the previous call (``stream=True``), with the
        device named as in the snapshot when the process has one vhost-net
        fd."""
        if self.probe is None or not self.probe.stream:
            return []
        evs = self.probe.events()
        if len(self.fds) == 1:
            name = f"vhost-net:{self.pid}:{self.fds[0]}"
            evs = [e._replace(device=name) for e in evs]
        return evs

    def events_lost(self) -> int:
        return self.probe.lost() if self.probe is not None and self.probe.stream else 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _ioctl_probe(pid: int):
    """The attached vhost_ioctl probe for ``pid``, or None when that probe
    is not available (not built, or its tracepoints are missing)."""
    p = VhostIoctlProbe(pids=[pid])
    try:
        points = p.attach()
    except InspectorError:
        p.close()
        return None
    if not any(ap.ok for ap in points):
        p.close()
        return None
    return p

