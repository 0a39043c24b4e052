"""The typed snapshot: what every source returns and every consumer reads.

A :class:`Snapshot` is one look at every queue of a source (README.md,
"Snapshot JSON": each field here is the JSON member of the same name, with
the VIRTIO 1.2 spec's names). The JSON itself is made and parsed only by
:mod:`inspector.snapshot.codec`, where it leaves or enters the process (the
introspection socket, ``vqscope snapshot --json``, the recorder, the
snapshot file and replay sources).

A :class:`QueueEntry` decoded from a ring keeps the decoder's
:class:`~inspector.ring.snapshot.RingSnapshot` as its chain source: its
chains stay columns of integers, and no Python object per chain or
descriptor exists until someone reads :attr:`QueueEntry.chains` (the TUI's
queue screen does, for one queue); the codec turns the columns straight into
JSON. A QueueEntry parsed from JSON keeps the validated chain dicts the same
way.

Per-source additions beyond the README's core fields:

- ``calls_suppressed`` (:attr:`QueueEntry.calls_suppressed`): calls the
  data path did not send because the driver suppressed them (vqscope's
  back-end, QEMU (0) and vhost-net); None, and absent from the JSON, when the
  source does not count them.
- ``device_type``: the virtio device type (``net``, ``block``, ``console``,
  ``scsi``, ``9p``, ``rng``, ``balloon``, ``vsock``, ``fs``, ... : VIRTIO 1.2
  §5's device names, lower case), which gives each queue its role
  (inspector.analysis.roles); None when the source does not know it.
- ``shadow_avail_idx``: ``avail->idx`` as the device last read it (QEMU's
  and libvhost-user's ``shadow_avail_idx``, the kernel's ``vq->avail_idx``):
  entries past it were published after the device last looked; None when the
  source cannot see it.
- ``dropped``: frames the device had for a queue it fills (net RX) and could
  not deliver because the driver had posted no buffer, cumulative; None when
  not counted.
- ``backend`` (:class:`BackendFds`): a vqscope back-end's kick and call
  eventfds of the vring, as that process holds them.
- :attr:`QueueEntry.extras`, JSON values by name, kept in order:
  ``qemu`` (QEMU source: ``path``, ``vhost``, guest-physical ``desc`` /
  ``avail`` / ``used``, and ``desc_hva`` ... ``kick``/``call`` for vhost
  queues or ``used_idx``/``signalled_used`` for the others), ``device_state``,
  ``probe_counters`` and ``histograms`` (vhost-net source), and any member a
  parsed JSON has that this model does not know.
- ``Chain.request`` (the ``request`` member of a chain): a block queue's
  in-flight chain's virtio-blk request
  (:class:`~inspector.ring.blk_request.BlkRequest`: type, sector,
  data_len, status "pending", malformed), where the source decoded it
  (vqscope's back-end, QEMU); None, and absent from the JSON, elsewhere.
  A blk back-end's counters are the queue's ``blk`` extras.
- :attr:`Snapshot.pid` (the process whose queues these are),
  :attr:`Snapshot.skipped` (:class:`Skipped`: queues not shown, and why) and
  :attr:`Snapshot.extras` likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..ring.anomalies import Anomaly, AnomalyKind
from ..ring.snapshot import Chain, Descriptor, RingSnapshot

if TYPE_CHECKING:
    from ..ring.packed import PackedRingSnapshot

__all__ = ["Anomaly", "AnomalyKind", "BackendFds", "Chain", "ChainSource", "Descriptor", "LAYOUTS",
           "PACKED_FIELDS", "QueueEntry", "QueueId", "SPLIT_ONLY_FIELDS", "Skipped", "Snapshot"]

QueueId = tuple[str, int]
"""A queue's identity across snapshots: ``(device, index)``."""


class BackendFds(NamedTuple):
    """A vqscope back-end's eventfds of one vring (its fd numbers, in that
    process): ``kick_fd`` (VHOST_USER_SET_VRING_KICK) and ``call_fd``
    (VHOST_USER_SET_VRING_CALL); None before the front-end set them, or when
    it polls (vhost-user spec, "Ring states")."""

    kick_fd: int | None
    call_fd: int | None


class Skipped(NamedTuple):
    """A queue (or a whole device: ``index`` None) a source did not show,
    and why (``reason``, for people)."""

    device: str
    index: int | None
    reason: str


class ChainSource(Protocol):
    """Where a queue's chains come from without being built: a decoder's
    :class:`~inspector.ring.snapshot.RingSnapshot`, or the codec's parsed
    JSON chains. ``chains`` builds (and may cache) the Chain tuples."""

    @property
    def n_chains(self) -> int: ...

    @property
    def chains(self) -> list[Chain]: ...


class _NoChains:
    """The chain source of a queue with no chains (ring not read)."""

    n_chains = 0

    @property
    def chains(self) -> list[Chain]:
        return []


_NO_CHAINS = _NoChains()


class _ChainList:
    """A chain source over Chain tuples built by the caller."""

    __slots__ = ("chains",)

    def __init__(self, chains: list[Chain]):
        self.chains = chains

    @property
    def n_chains(self) -> int:
        return len(self.chains)


#: The QueueEntry fields of the README contract, in JSON order (``chains``
#: and ``anomalies`` follow them).
CORE_FIELDS = ("device", "index", "layout", "size", "features", "event_idx", "avail_idx", "used_idx",
               "last_avail_idx", "inflight", "avail_flags", "used_flags", "used_event", "avail_event",
               "kicks", "calls", "packets", "bytes")


#: Per-source additions (module docstring): in the JSON only when not None.
OPTIONAL_FIELDS = ("device_type", "shadow_avail_idx", "calls_suppressed", "dropped")

#: The core fields that name split-ring memory (§2.7.6, §2.7.8): null in a
#: packed queue's JSON, which has no avail or used ring.
SPLIT_ONLY_FIELDS = ("avail_idx", "used_idx", "avail_flags", "used_flags", "used_event", "avail_event")

#: A packed queue's fields (VIRTIO 1.2 §2.8; README.md, "Snapshot JSON"), in
#: JSON order, present exactly when ``layout`` is ``"packed"``; each None
#: (null) when the ring was not read:
#:
#: - ``next_avail``, ``avail_wrap_counter``: the driver's next descriptor slot
#:   and its Driver Ring Wrap Counter (§2.8.1), as the ring shows them (where
#:   the run of available descriptors ends);
#: - ``next_used``, ``used_wrap_counter``: the device's next used slot and its
#:   Device Ring Wrap Counter;
#: - ``last_avail_wrap_counter``: the wrap counter of ``last_avail_idx`` (the
#:   device's next slot to read);
#: - ``driver_event_*`` / ``device_event_*``: the driver's and the device's
#:   event suppression structures (§2.8.10, ``struct pvirtq_event_suppr``):
#:   ``flags`` (RING_EVENT_FLAGS_ENABLE/DISABLE/DESC), ``off`` and ``wrap``
#:   (``desc_event_off`` / ``desc_event_wrap``, meaningful with DESC); the
#:   driver's controls calls (used buffer notifications), the device's kicks;
#: - ``positions``: how the device's positions were found: ``"device"``
#:   (given with their wrap counters by the source), ``"derived"`` (slots
#:   given, wrap counters derived from the ring), ``"flags"`` (read from the
#:   descriptor flags alone; inspector.ring.packed).
PACKED_FIELDS = ("next_avail", "avail_wrap_counter", "next_used", "used_wrap_counter", "last_avail_wrap_counter",
                 "driver_event_flags", "driver_event_off", "driver_event_wrap",
                 "device_event_flags", "device_event_off", "device_event_wrap", "positions")

#: The values of ``layout``.
LAYOUTS = ("split", "packed")


class QueueEntry:
    """One virtqueue of a snapshot (README.md, "Snapshot JSON", ``queues[]``).

    Ring fields (VIRTIO 1.2 §2.7): ``avail_idx``, ``avail_flags`` and
    ``used_event`` from the driver area (§2.7.6), ``used_idx``,
    ``used_flags`` and ``avail_event`` from the device area (§2.7.8);
    ``used_event``/``avail_event`` None without VIRTIO_RING_F_EVENT_IDX
    (§2.7.10); ``inflight`` = (avail_idx − used_idx) mod 2^16;
    ``last_avail_idx`` the device's next avail slot, None when unknown.
    ``features``: the negotiated feature bits (a mask of bit numbers of
    inspector.spec.virtio). Counters (``kicks``, ``calls``, ``packets``,
    ``bytes``) are cumulative, 0 when the source cannot see them.
    ``anomalies``: a list of :class:`~inspector.ring.anomalies.Anomaly`.
    The per-source additions are in the module docstring.

    A packed queue (``layout`` ``"packed"``, VIRTIO 1.2 §2.8) has no avail or
    used ring: its :data:`SPLIT_ONLY_FIELDS` are None (whatever was passed),
    ``inflight`` counts the descriptors between the device's ``next_used``
    and the driver's ``next_avail``, ``last_avail_idx`` is the device's next
    slot to read, and the :data:`PACKED_FIELDS` (keywords; None for a split
    queue) say the rest.

    ``chains`` (keyword) is a list of :class:`Chain`, or a
    :class:`ChainSource` read lazily; :meth:`fill_from_ring` sets the ring
    fields and chains from a decoder's result at once. Entries compare
    equal when every field, chain and anomaly is.
    """

    __slots__ = CORE_FIELDS + OPTIONAL_FIELDS + PACKED_FIELDS + ("anomalies", "backend", "extras", "_chain_source")

    def __init__(self, *, device: str, index: int, size: int, features: int, event_idx: bool,
                 layout: str = "split", avail_idx: int = 0, used_idx: int = 0,
                 last_avail_idx: int | None = None, inflight: int = 0, avail_flags: int = 0,
                 used_flags: int = 0, used_event: int | None = None, avail_event: int | None = None,
                 kicks: int = 0, calls: int = 0, packets: int = 0, bytes: int = 0,
                 chains: list[Chain] | ChainSource | None = None, anomalies: list[Anomaly] | None = None,
                 calls_suppressed: int | None = None, backend: BackendFds | None = None,
                 extras: dict[str, Any] | None = None, device_type: str | None = None,
                 shadow_avail_idx: int | None = None, dropped: int | None = None, **packed: Any):
        self.device = device
        self.index = index
        self.layout = layout
        self.size = size
        self.features = features
        self.event_idx = event_idx
        self.avail_idx = avail_idx
        self.used_idx = used_idx
        self.last_avail_idx = last_avail_idx
        self.inflight = inflight
        self.avail_flags = avail_flags
        self.used_flags = used_flags
        self.used_event = used_event
        self.avail_event = avail_event
        self.kicks = kicks
        self.calls = calls
        self.packets = packets
        self.bytes = bytes
        self.anomalies: list[Anomaly] = [] if anomalies is None else anomalies
        self.calls_suppressed = calls_suppressed
        self.device_type = device_type
        self.shadow_avail_idx = shadow_avail_idx
        self.dropped = dropped
        self.backend = backend
        self.extras: dict[str, Any] = {} if extras is None else extras
        self.chains = chains  # the setter
        for f in PACKED_FIELDS:
            setattr(self, f, packed.pop(f, None))
        if packed:
            raise TypeError(f"QueueEntry: unknown fields {sorted(packed)}")
        if layout == "packed":
            for f in SPLIT_ONLY_FIELDS:
                setattr(self, f, None)

    # --- chains -------------------------------------------------------------------
    @property
    def chains(self) -> list[Chain]:
        """The in-flight chains (README: the heads in ``avail->ring`` from
        ``last_avail_idx``, or ``used_idx`` when it is unknown, up to
        ``avail_idx``), built on first access from the chain source and
        cached there: do not modify the list."""
        return self._chain_source.chains

    @chains.setter
    def chains(self, chains: list[Chain] | ChainSource | None) -> None:
        if chains is None:
            self._chain_source = _NO_CHAINS
        elif isinstance(chains, (list, tuple)):
            self._chain_source = _ChainList(list(chains))
        else:
            self._chain_source = chains

    @property
    def chain_source(self) -> ChainSource:
        """Where the chains come from (a RingSnapshot, the codec's parsed
        JSON, or a list given); what the codec reads to emit them."""
        return self._chain_source

    @property
    def n_chains(self) -> int:
        """Number of chains, without building them."""
        return self._chain_source.n_chains

    @property
    def id(self) -> QueueId:
        """``(device, index)``: the queue's identity across snapshots."""
        return (self.device, self.index)

    def fill_from_ring(self, ring: RingSnapshot | PackedRingSnapshot) -> QueueEntry:
        """Take the ring fields from a decoder's result. Split (VIRTIO 1.2
        §2.7): ``avail_idx``, ``used_idx``, ``inflight``, the flags,
        ``last_avail_idx`` (the ring's: None when the decoder walked from
        ``used_idx``), ``used_event``/``avail_event`` when ``event_idx``.
        Packed (§2.8, a ring whose ``layout`` is ``"packed"``): ``layout``,
        ``inflight``, ``last_avail_idx`` and every :data:`PACKED_FIELDS`
        member of the same name; the split-only fields become None. Then
        the chains (lazily, from the ring's columns) and, after those
        already listed, its anomalies. Returns self."""
        if getattr(ring, "layout", "split") == "packed":
            self.layout = "packed"
            for f in SPLIT_ONLY_FIELDS:
                setattr(self, f, None)
            for f in PACKED_FIELDS:
                setattr(self, f, getattr(ring, f))
            self.inflight = ring.inflight
            self.last_avail_idx = ring.last_avail_idx
            self._chain_source = ring
            self.anomalies += ring.anomalies
            return self
        self.avail_idx = ring.avail_idx
        self.used_idx = ring.used_idx
        self.inflight = ring.inflight
        self.avail_flags = ring.avail_flags
        self.used_flags = ring.used_flags
        self.last_avail_idx = ring.last_avail_idx
        if self.event_idx:
            self.used_event = ring.used_event
            self.avail_event = ring.avail_event
        self._chain_source = ring
        self.anomalies += ring.anomalies
        return self

    def has_anomaly(self, kind: AnomalyKind) -> bool:
        """Is there an anomaly of ``kind``?"""
        return any(a.kind is kind for a in self.anomalies)

    # --- comparison ---------------------------------------------------------------
    def _values(self) -> tuple:
        return (tuple(getattr(self, f) for f in CORE_FIELDS + OPTIONAL_FIELDS + PACKED_FIELDS), self.anomalies,
                self.backend, self.extras)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueueEntry):
            return NotImplemented
        return self._values() == other._values() and self.chains == other.chains

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    @property
    def packed(self) -> bool:
        """Is this a packed virtqueue (VIRTIO_F_RING_PACKED, §2.8)?"""
        return self.layout == "packed"

    def __repr__(self) -> str:
        if self.layout == "packed":
            return (f"<QueueEntry {self.device} #{self.index} packed size={self.size} "
                    f"next_avail={self.next_avail}/{self.avail_wrap_counter} "
                    f"next_used={self.next_used}/{self.used_wrap_counter} chains={self.n_chains} "
                    f"anomalies={len(self.anomalies)}>")
        return (f"<QueueEntry {self.device} #{self.index} size={self.size} avail_idx={self.avail_idx} "
                f"used_idx={self.used_idx} chains={self.n_chains} anomalies={len(self.anomalies)}>")


@dataclass(slots=True)
class Snapshot:
    """One look at every queue of a source (README.md, "Snapshot JSON").

    ``source``: what was looked at, for people; ``time``: when, in seconds
    since the epoch; ``queues``: a list of :class:`QueueEntry`. ``pid``: the
    process whose queues these are (vqscope back-end, QEMU, vhost-net user),
    None when the source has none (absent from the JSON); ``skipped``: the
    queues a source did not show (QEMU, vhost-net), None when it lists none;
    ``extras``: other top-level JSON members, by name.
    """

    source: str
    time: float
    queues: list[QueueEntry] = field(default_factory=list)
    pid: int | None = None
    skipped: list[Skipped] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def queue(self, device: str, index: int) -> QueueEntry | None:
        """The queue ``index`` of ``device``, or None."""
        return next((q for q in self.queues if q.device == device and q.index == index), None)
