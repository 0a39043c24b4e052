"""Reading sources in the background, for the exporter.

Each source is a :class:`Watch`: its own thread opens the source, takes a
snapshot and the events since the last one every ``interval`` seconds,
feeds the doctor's :class:`~inspector.analysis.Analyzer`, and publishes an
immutable :class:`Reading` by swapping one reference. A scrape reads only
those references (never a source), so a stuck source (a SIGSTOPped
back-end, a QEMU that does not answer QMP) delays nobody: its reading ages,
its ``up`` drops, the others go on. A thread per source keeps one hung read
from holding another source's turn; an idle thread costs a wait.

:class:`Fleet` owns the watches: fixed sources (``--connect``,
``--vhost-net``, a ``--qmp`` path) and QMP globs, looked at again every
``rescan`` seconds, whose matches come and go with their VMs (a socket file
that disappears, or that no QEMU listens on any more, takes its watch with
it).
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from ..analysis import Analyzer, Diagnosis, Thresholds
from ..errors import InspectorError
from ..snapshot.model import QueueId, Snapshot
from ..sources import BackendSource, QemuSource, Source, VhostNetSource

log = logging.getLogger("vqscope.exporter")

#: The sources' reads fall at this many points of each interval, a group of
#: sources read together at each. One burst of 64 back-end reads holds the
#: GIL ~30 ms (a scrape then waits); reads spread evenly over the interval
#: cost ~1.5x the CPU of reads in bursts (each read finds the interpreter's
#: caches cold: 5.7 % of a core against 3.5-4 % for 64 sources a second,
#: measured by schedstat). Four groups keep a burst near 8 ms.
PHASES = 4

#: The kinds of source the exporter reads (the ``kind`` label of vqscope_source_info).
KINDS = ("backend", "qemu", "vhost-net")


class SourceSpec(NamedTuple):
    """A source to watch: ``label`` (the ``source`` label: the path given,
    or ``vhost-net:PID``), ``kind`` (one of :data:`KINDS`) and ``open``
    (makes the Source; may raise SourceError, is called again after a
    failure)."""

    label: str
    kind: str
    open: Callable[[], Source]


def backend_spec(path: str, timeout: float) -> SourceSpec:
    """A vqscope back-end or proxy, by its vhost-user or introspection
    socket; its snapshots without chains (no metric shows them, and they
    are ~90 % of a loaded back-end's reply and its parsing)."""
    return SourceSpec(path, "backend", lambda: BackendSource(path, timeout=timeout, chains=False))


def qemu_spec(path: str, timeout: float) -> SourceSpec:
    """A running QEMU by its QMP socket (pid from SO_PEERCRED; root reads
    /proc/PID/mem)."""
    return SourceSpec(path, "qemu", lambda: QemuSource(path, timeout=timeout))


def vhost_net_spec(pid: int) -> SourceSpec:
    """Every kernel vhost-net queue of process ``pid`` (BCC probes: root)."""
    return SourceSpec(f"vhost-net:{pid}", "vhost-net", lambda: VhostNetSource(pid, stream=True, ioctl_probe=True))


@dataclass(frozen=True)
class Reading:
    """One successful read: the ``snapshot``, the Analyzer's ``diagnoses``
    after it (by queue id), ``taken`` (time.monotonic() when it was
    published), ``duration`` (seconds the read took) and ``prepared`` (what
    the watch's ``prepare`` made of it in the reader thread, or None)."""

    snapshot: Snapshot
    diagnoses: dict[QueueId, Diagnosis]
    taken: float
    duration: float
    prepared: object = None


class Watch:
    """One source, read by its own daemon thread every ``interval`` s.

    Public state, each attribute replaced whole by the thread (a scrape
    reads them without a lock and may see one read's counters with the
    previous read's reading, never a torn object): ``reading`` (the last
    :class:`Reading`, None before the first), ``ok`` (the last attempt
    succeeded), ``reads`` / ``errors`` (attempts, failures), ``last_error``,
    ``events_lost`` (the source's, cumulative), ``name`` (the source's own
    name once opened). A failed read closes the source; the next attempt
    opens it again (the Analyzer's state is kept across, so a stall keeps
    its start). ``prepare(snapshot, diagnoses, label)``, when given, runs
    in the thread after each read (the collector's sample building: off the
    scrape path). ``phase``: seconds before the first read (the Fleet
    spreads its watches' reads over the interval, so that 64 sources are
    not parsed in one burst while a scrape waits for the GIL).
    """

    def __init__(self, spec: SourceSpec, interval: float, thresholds: Thresholds,
                 prepare: Callable[[Snapshot, dict, str], object] | None = None, phase: float = 0.0):
        self.spec = spec
        self.prepare = prepare
        self.phase = phase
        self.interval = interval
        self.thresholds = thresholds
        self.reading: Reading | None = None
        self.ok = False
        self.reads = 0
        self.errors = 0
        self.last_error = ""
        self.events_lost = 0
        self.name = spec.label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"exporter {spec.label}", daemon=True)

    @property
    def label(self) -> str:
        return self.spec.label

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to end after its current read (not waited for: a
        hung read ends at the source's own timeout); it closes the source."""
        self._stop.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the reading being served was taken; None before any."""
        r = self.reading
        return None if r is None else (time.monotonic() if now is None else now) - r.taken

    def _run(self) -> None:
        src: Source | None = None
        analyzer: Analyzer | None = None
        try:
            self._stop.wait(self.phase)
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    if src is None:
                        src = self.spec.open()
                        self.name = src.name or self.spec.label
                        if analyzer is None:
                            analyzer = Analyzer(self.thresholds, notifications_seen=src.has_events)
                    snap = src.snapshot()
                    events = src.events()
                    analyzer.update(snap, events)
                    self.events_lost = src.events_lost()
                    diagnoses = analyzer.diagnoses
                    prepared = self.prepare(snap, diagnoses, self.label) if self.prepare else None
                    t1 = time.monotonic()
                    self.reading = Reading(snap, diagnoses, t1, t1 - t0, prepared)
                    if not self.ok:
                        log.info("source %s: up (%d queues)", self.label, len(snap.queues))
                    self.ok = True
                except Exception as e:   # noqa: BLE001 - a source's failure must not end its watch
                    if not isinstance(e, (InspectorError, OSError)):
                        log.exception("source %s: unexpected error", self.label)
                    msg = str(e) or type(e).__name__
                    if self.ok or msg != self.last_error:
                        log.warning("source %s: down: %s", self.label, msg)
                    self.errors += 1
                    self.last_error = msg
                    self.ok = False
                    src = _close(src)
                self.reads += 1
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        finally:
            _close(src)


def _ident(path: str) -> tuple | None:
    """(device, inode, mtime) of a socket file, None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path``
    (False for ECONNREFUSED or a vanished file). Asked only of a socket
    whose watch is down, i.e. not connected: connecting and closing is what
    the watch's own next attempt would do."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        s.close()
    return True


def _close(src: Source | None) -> None:
    """Close ``src`` (errors logged, not raised); returns None."""
    if src is not None:
        try:
            src.close()
        except Exception as e:   # noqa: BLE001
            log.debug("closing a source: %s", e)
    return None


class Fleet:
    """Every watched source: ``specs`` (fixed) plus the QMP sockets that
    match ``qmp_globs`` (patterns with ``*?[``; looked at every ``rescan``
    s by a daemon thread: a new match starts a watch, a vanished file stops
    its watch and its metrics go with it). A label given twice is watched
    once. ``prepare`` is passed to each :class:`Watch`.
    """

    def __init__(self, specs: Iterable[SourceSpec], qmp_globs: Iterable[str] = (), *, interval: float = 1.0,
                 thresholds: Thresholds = Thresholds(), timeout: float = 5.0, rescan: float | None = None,
                 prepare: Callable[[Snapshot, dict, str], object] | None = None):
        self.interval = interval
        self.prepare = prepare
        self.thresholds = thresholds
        self.timeout = timeout
        self.qmp_globs = list(qmp_globs)
        self.rescan = interval if rescan is None else rescan
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}
        self._fixed = {}
        for s in specs:
            self._fixed.setdefault(s.label, s)
        self._added = 0
        self._stale: dict[str, tuple | None] = {}   # glob matches nothing listens on: path -> _ident
        self._stop = threading.Event()
        self._scanner: threading.Thread | None = None

    def start(self) -> Fleet:
        for spec in self._fixed.values():
            self._add(spec)
        if self.qmp_globs:
            self.scan()
            self._scanner = threading.Thread(target=self._scan_loop, name="exporter glob", daemon=True)
            self._scanner.start()
        return self

    def watches(self) -> list[Watch]:
        """The watches now, in the order they were added."""
        with self._lock:
            return list(self._watches.values())

    def scan(self) -> None:
        """Match the QMP globs now: start watches for new sockets, stop those
        whose socket file is gone, or that nothing listens on any more (QEMU
        does not remove its QMP socket when it exits: such a stale file is
        passed over until it is replaced). Fixed sources are never dropped."""
        found: dict[str, None] = {}
        for pattern in self.qmp_globs:
            for path in sorted(glob.glob(pattern)):
                ident = _ident(path)
                if ident is None or self._stale.get(path) == ident:
                    continue
                self._stale.pop(path, None)
                found.setdefault(path)
        with self._lock:
            globbed = [w for label, w in self._watches.items() if label not in self._fixed]
        for w in globbed:
            if w.label in found and not w.ok and w.reads and not _listening(w.label):
                self._stale[w.label] = _ident(w.label)
                del found[w.label]
            if w.label not in found:
                with self._lock:
                    self._watches.pop(w.label, None)
                w.stop()
                log.info("source %s: gone (%s)", w.label, "no QEMU listens" if w.label in self._stale
                         else "socket removed")
        for path in found:
            if path not in self._watches:
                self._add(qemu_spec(path, self.timeout))

    def _add(self, spec: SourceSpec) -> None:
        # PHASES groups, each read in one burst at its point of the interval
        self._added += 1
        w = Watch(spec, self.interval, self.thresholds, self.prepare,
                  phase=(self._added % PHASES) * self.interval / PHASES)
        with self._lock:
            if spec.label in self._watches:
                return
            self._watches[spec.label] = w
        w.start()

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.rescan):
            try:
                self.scan()
            except Exception:   # noqa: BLE001 - a bad glob or a race with unlink: try again next time
                log.exception("matching %s", self.qmp_globs)

    def scanner_alive(self) -> bool:
        """Whether the glob scanner runs (True when there are no globs)."""
        return self._scanner is None or self._scanner.is_alive() or self._stop.is_set()

    def stop(self) -> None:
        """Stop the scanner and every watch (their threads close their sources)."""
        self._stop.set()
        for w in self.watches():
            w.stop()
