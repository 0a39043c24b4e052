"""The doctor's rules: from a queue's observation and its open episodes
(:mod:`inspector.analysis.analyzer`) to a verdict and one sentence of
evidence.

Index arithmetic is modulo 2^16 (VIRTIO 1.2 §2.7: the ring indices wrap).
Notification rules follow §2.7.7 (used buffer notifications, "calls": the
driver's ``VRING_AVAIL_F_NO_INTERRUPT`` or, with VIRTIO_RING_F_EVENT_IDX, its
``used_event``) and §2.7.10 (available buffer notifications, "kicks": the
device's ``VRING_USED_F_NO_NOTIFY`` or its ``avail_event``), with
``vring_need_event`` (inspector.spec.virtio) as the kernel's
include/uapi/linux/virtio_ring.h has it.

A packed queue (§2.8) is judged by the same rules: its :class:`Observation`
holds positions as counters (inspector.ring.packed: ``packed_counter``,
distances ``packed_distance``, modulo 2·size) in the split names' places —
the driver's ``next_avail`` as ``avail_idx``, the device's ``next_used`` as
``used_idx``, its read position as ``last_avail_idx`` — and its event
suppression (§2.8.10) as the split rules read notification state: the
driver's structure (calls) DESC as ``used_event`` at (off, wrap), DISABLE as
``VRING_AVAIL_F_NO_INTERRUPT``; the device's (kicks) DESC as ``avail_event``,
DISABLE as ``VRING_USED_F_NO_NOTIFY``. The evidence speaks packed terms
(:class:`Terms`). One rule is packed only: with the driver's flags ENABLE
every used descriptor wants a call, so descriptors returned with no call
for the threshold are call_missing (:func:`_calls_not_sent`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ring.anomalies import AnomalyKind
from ..ring.packed import packed_counter, packed_distance, packed_position
from ..snapshot.model import QueueEntry
from ..spec.virtio import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
                           VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY, vring_need_event)
from .roles import Role, device_type_of
from .verdict import Verdict

M16 = 0xFFFF

#: Anomalies that break the ring the moment they are seen: the device said so.
HARD_BROKEN = frozenset({AnomalyKind.QUEUE_BROKEN, AnomalyKind.DEVICE_BROKEN})
#: Anomalies that are not a broken ring: flagged, informational, or a limit of
#: the reader (a zero-length descriptor is allowed; a truncated walk, an
#: indirect table not read, a packed ring not decoded, a vhost address that
#: disagrees with QEMU's RAM map, a memory table set before the probes).
NOT_BROKEN = frozenset({AnomalyKind.ZERO_LEN, AnomalyKind.TRUNCATED, AnomalyKind.INDIRECT_NOT_READ,
                        AnomalyKind.LAYOUT_UNSUPPORTED, AnomalyKind.ADDRESS_MISMATCH,
                        AnomalyKind.MEM_TABLE_UNKNOWN, AnomalyKind.IOVA_UNTRANSLATED,
                        AnomalyKind.IOTLB_MISS_UNANSWERED})


class Terms:
    """How the evidence names a layout's positions and notification rules
    (split: §2.7's index names; packed: §2.8's positions and event
    suppression)."""

    __slots__ = ("avail", "used", "entries", "call_rule", "kick_event", "kick_flag", "kick_suppressed",
                 "calls_off", "used_event", "avail_event")

    def __init__(self, **kw: str):
        for k, v in kw.items():
            setattr(self, k, v)


SPLIT_TERMS = Terms(avail="avail_idx", used="used_idx", entries="entries", used_event="used_event",
                    avail_event="avail_event", call_rule="EVENT_IDX, §2.7.7", kick_event="EVENT_IDX, §2.7.10",
                    kick_flag="VRING_USED_F_NO_NOTIFY clear (§2.7.10)",
                    kick_suppressed="the device left VRING_USED_F_NO_NOTIFY set: the driver will not kick (§2.7.10)",
                    calls_off="VRING_AVAIL_F_NO_INTERRUPT set: the driver said it polls")
PACKED_TERMS = Terms(avail="next_avail", used="next_used", entries="descriptors",
                     used_event="the driver's event off", avail_event="the device's event off",
                     call_rule="driver event flags DESC, §2.8.10", kick_event="device event flags DESC, §2.8.10",
                     kick_flag="device event flags ENABLE (§2.8.10)",
                     kick_suppressed="the device left its event flags at RING_EVENT_FLAGS_DISABLE: "
                                     "the driver will not kick (§2.8.10)",
                     calls_off="driver event flags DISABLE: the driver said it polls")


@dataclass(slots=True)
class Observation:
    """The numbers of one queue at one snapshot that the rules read
    (QueueEntry's fields, same names; ``t`` the snapshot time, s). A packed
    queue's positions are counters (module docstring; ``packed`` True),
    ``calls_off``: the driver disabled calls and polls (split: NO_INTERRUPT
    without EVENT_IDX; packed: its event flags DISABLE); ``calls_each``
    (packed, driver event flags ENABLE): every used descriptor wants a call."""

    t: float
    size: int
    avail_idx: int
    used_idx: int
    last_avail_idx: int | None
    shadow_avail_idx: int | None
    used_event: int | None
    avail_event: int | None
    avail_flags: int
    used_flags: int
    event_idx: bool
    kicks: int
    calls: int
    dropped: int | None
    breaking: bool
    calls_off: bool = False
    packed: bool = False
    calls_each: bool = False
    terms: Terms = SPLIT_TERMS

    @classmethod
    def of(cls, q: QueueEntry, t: float) -> Observation:
        breaking = False
        for a in q.anomalies:
            if a.kind not in NOT_BROKEN:
                breaking = True
                break
        if q.layout == "packed":
            return cls._of_packed(q, t, breaking)
        return cls(t, q.size, q.avail_idx, q.used_idx, q.last_avail_idx, q.shadow_avail_idx,
                   q.used_event, q.avail_event, q.avail_flags, q.used_flags, q.event_idx,
                   q.kicks, q.calls, q.dropped, breaking,
                   not q.event_idx and bool(q.avail_flags & VRING_AVAIL_F_NO_INTERRUPT))

    @classmethod
    def _of_packed(cls, q: QueueEntry, t: float, breaking: bool) -> Observation:
        """A packed queue (§2.8): positions as counters, event suppression
        as the split rules read it (module docstring). A ring not read
        (positions None) owes nothing: both counters 0."""
        n = q.size
        if n <= 0 or None in (q.next_avail, q.avail_wrap_counter, q.next_used, q.used_wrap_counter):
            return cls(t, n, 0, 0, None, None, None, None, 0, 0, True, q.kicks, q.calls, q.dropped, breaking,
                       packed=True, terms=PACKED_TERMS)
        la = (packed_counter(q.last_avail_idx, q.last_avail_wrap_counter, n)
              if q.last_avail_idx is not None and q.last_avail_wrap_counter is not None else None)
        dr, dv = q.driver_event_flags, q.device_event_flags
        ue = (packed_counter(q.driver_event_off, q.driver_event_wrap, n)
              if dr == RING_EVENT_FLAGS_DESC and q.driver_event_off is not None and q.driver_event_wrap is not None
              else None)
        ae = (packed_counter(q.device_event_off, q.device_event_wrap, n)
              if dv == RING_EVENT_FLAGS_DESC and q.device_event_off is not None and q.device_event_wrap is not None
              else None)
        return cls(t, n, packed_counter(q.next_avail, q.avail_wrap_counter, n),
                   packed_counter(q.next_used, q.used_wrap_counter, n), la, None, ue, ae,
                   VRING_AVAIL_F_NO_INTERRUPT if dr == RING_EVENT_FLAGS_DISABLE else 0,
                   VRING_USED_F_NO_NOTIFY if dv == RING_EVENT_FLAGS_DISABLE else 0, True,
                   q.kicks, q.calls, q.dropped, breaking, dr == RING_EVENT_FLAGS_DISABLE, True,
                   dr == RING_EVENT_FLAGS_ENABLE, PACKED_TERMS)

    def dist(self, c_from: int, c_to: int) -> int:
        """Slots from index/counter ``c_from`` forward to ``c_to``: modulo
        2^16 (split), ``packed_distance`` (packed)."""
        if self.packed:
            return packed_distance(c_from, c_to, self.size)
        return (c_to - c_from) & M16

    def need_event(self, event: int, new: int, old: int) -> bool:
        """``vring_need_event`` in this layout's arithmetic: ``event`` is
        one of the positions ``old .. new-1`` that a move published."""
        if self.packed:
            return self.dist(event + 1, new) < self.dist(old, new)
        return vring_need_event(event, new, old)

    def at(self, c: int | None) -> str:
        """A position for people: the index (split), ``slot S wrap W`` (packed)."""
        if not self.packed or c is None:
            return str(c)
        slot, wrap = packed_position(c, self.size)
        return f"slot {slot} wrap {wrap}"

    def device_owes(self) -> bool:
        """Buffers outstanding: ``avail_idx != used_idx`` (the device has
        buffers to take or to return)."""
        return self.avail_idx != self.used_idx and self.size > 0

    def device_progress(self, prev: Observation | None) -> bool:
        """The device returned something since ``prev`` (``used_idx`` moved)."""
        return prev is not None and self.used_idx != prev.used_idx

    def driver_owes(self) -> bool:
        """With EVENT_IDX: ``used_idx`` has passed ``used_event`` by 1 ... size
        entries, so a call was due (§2.7.7: ``vring_need_event(used_event,
        used_idx, old)`` held when it passed). ``used_event`` 0 is not read as
        a request: Linux writes 0 there when it disables callbacks
        (virtqueue_disable_cb_split, "this is a hack"), and polls."""
        if not self.event_idx or self.used_event is None or (self.used_event == 0 and not self.packed):
            return False
        return 1 <= self.dist(self.used_event, self.used_idx) <= self.size

    def driver_progress(self, prev: Observation | None) -> bool:
        """The driver did something since ``prev``: moved ``used_event``
        (it collected used entries) or ``avail_idx`` (it refilled or sent)."""
        return prev is not None and (self.used_event != prev.used_event or self.avail_idx != prev.avail_idx)

    def no_buffers(self) -> bool:
        """The device has no available buffer left: ``avail_idx`` equals
        ``last_avail_idx`` (or ``used_idx`` where the device's position is
        unknown)."""
        pos = self.last_avail_idx if self.last_avail_idx is not None else self.used_idx
        return self.avail_idx == pos and self.size > 0


@dataclass(slots=True)
class Episode:
    """A stretch during which one side owes progress: since ``t0`` (the
    snapshot that first showed it; ``at_least``: it was already there at the
    first snapshot), with the counters of the snapshot before it (``kicks0``,
    ``calls0``, ``dropped0``, ``shadow0``, ``last_avail0``; the first
    snapshot's own when ``at_least``), whether the device had just taken
    or filled buffers when it began (``filled``) and its ``used_idx`` then
    (``used0``)."""

    t0: float
    at_least: bool
    kicks0: int
    calls0: int
    dropped0: int | None
    shadow0: int | None
    last_avail0: int | None
    filled: bool
    used0: int = 0

    @classmethod
    def start(cls, prev: Observation | None, ob: Observation, last_call_used: int | None) -> Episode:
        base = prev if prev is not None else ob
        filled = prev is not None and (ob.used_idx != prev.used_idx
                                       or ob.last_avail_idx != prev.last_avail_idx)
        # Kicks and avail_idx reads between prev and ob that came with progress (the device
        # took or returned buffers then) were for the entries it consumed, not for those
        # still waiting at ob: count the device's looking from ob.
        look = ob if filled else base
        return cls(ob.t, prev is None, look.kicks, base.calls, base.dropped, look.shadow_avail_idx,
                   base.last_avail_idx, filled, base.used_idx)


def _for(ep: Episode, now: float) -> str:
    return f"{'at least ' if ep.at_least else ''}{now - ep.t0:.1f} s"


def judge(q: QueueEntry, ob: Observation, role: Role, device_ep: Episode | None,
          driver_ep: Episode | None, starve_ep: Episode | None, broken_streak: int,
          last_call_used: int | None, seen: bool, th) -> tuple[Verdict | None, str, float | None]:
    """The verdict on one queue: ``(verdict, evidence, since)``, or ``(None,
    "", None)`` when no rule fires (the caller says healthy or idle).
    ``since`` None keeps the previous diagnosis's. ``seen``: the source's
    kick and call counters are real. ``th``: the Analyzer's Thresholds.
    Order: a broken ring, a misplaced used ring, the driver's side, the
    device's side, starvation."""
    # --- ring_broken: the device said so, or the decoder saw it twice
    for a in q.anomalies:
        if a.kind in HARD_BROKEN:
            return Verdict.RING_BROKEN, f"{a.kind.value}: {a.detail}", None
    if broken_streak >= th.broken_snapshots:
        a = next(a for a in q.anomalies if a.kind not in NOT_BROKEN)
        return (Verdict.RING_BROKEN,
                f"{a.kind.value} in {broken_streak} snapshots in a row: {a.detail}", None)
    mismatch = layout_mismatch(q)
    if mismatch:
        return Verdict.LAYOUT_MISMATCH, mismatch, None
    now = ob.t
    stall = th.stall_s
    if driver_ep is not None and now - driver_ep.t0 >= stall and not reclaims_lazily(q, role, ob):
        if ob.calls_each:
            return _calls_not_sent(ob, driver_ep)
        return _driver_side(ob, driver_ep, starve_ep, last_call_used, seen)
    if role is Role.CONSUME and device_ep is not None and now - device_ep.t0 >= stall:
        return _why_device(q, _device_side(ob, device_ep, seen))
    if role is Role.FILL and device_ep is not None and now - device_ep.t0 >= stall:
        filled_none = _fill_stalled(ob, device_ep)
        if filled_none is not None:
            return _why_device(q, filled_none)
    if role is Role.FILL and starve_ep is not None and now - starve_ep.t0 >= stall:
        return _starved(ob, starve_ep)
    return None, "", None


def _why_device(q: QueueEntry, found: tuple[Verdict, str, float]) -> tuple[Verdict, str, float]:
    """A device-side verdict, with the reason the source knows when the
    device waits for the front-end: an unanswered IOTLB miss (vqscope's
    back-end behind an IOMMU) is why a device_stalled device takes nothing."""
    verdict, evidence, since = found
    if verdict is Verdict.DEVICE_STALLED:
        for a in q.anomalies:
            if a.kind is AnomalyKind.IOTLB_MISS_UNANSWERED:
                return verdict, f"{evidence}; it is {a.detail}", since
    return found


def _fill_stalled(ob: Observation, ep: Episode) -> tuple[Verdict, str, float] | None:
    """device_stalled on a queue the device fills (net RX): buffers are
    posted, ``used_idx`` is still, and the device counted frames it dropped
    meanwhile (``dropped``): it had data and buffers and filled none. Without
    a drop count an RX queue waiting is just idle."""
    if ob.dropped is None or ep.dropped0 is None or ob.dropped <= ep.dropped0:
        return None
    posted = ob.dist(ob.last_avail_idx if ob.last_avail_idx is not None else ob.used_idx, ob.avail_idx)
    if not posted:
        return None
    T, at = ob.terms, ob.at
    return (Verdict.DEVICE_STALLED,
            f"{posted} buffers posted ({T.avail} {at(ob.avail_idx)}, {T.used} {at(ob.used_idx)}) and none filled for "
            f"{_for(ep, ob.t)} while {ob.dropped - ep.dropped0} frames for this queue were dropped", ep.t0)


def reclaims_lazily(q: QueueEntry, role: Role, ob: Observation) -> bool:
    """A transmit queue (net transmitq, console transmitq: odd indices, §5.1.2, §5.3.2)
    whose used entries only hand buffers back to a driver that takes them at its next
    send: Linux virtio_console reclaims them in __send_to_port (its out_intr only wakes
    writers), virtio_net without napi_tx in start_xmit. Left uncollected they stall
    nothing until the driver runs out of buffers (``avail_idx - used_event`` reaches
    ``size``)."""
    if role is not Role.CONSUME or q.index % 2 != 1 or device_type_of(q.device_type) not in ("net", "console"):
        return False
    return ob.used_event is not None and ob.dist(ob.used_event, ob.avail_idx) < ob.size


def _driver_side(ob: Observation, ep: Episode, starve_ep: Episode | None, last_call_used: int | None,
                 seen: bool) -> tuple[Verdict, str, float]:
    """call_missing / driver_stalled (§2.7.7; packed: §2.8.10 with the
    driver's event flags DESC): ``used_idx`` passed ``used_event``, so a
    call was due, and the driver has not moved ``used_event`` nor
    ``avail_idx`` for the threshold. Whether the call was sent: calls
    counted during the episode, or the used_idx carried by the last call
    event (the back-end's log) past ``used_event``."""
    u, ue = ob.used_idx, ob.used_event
    T, at = ob.terms, ob.at
    behind = ob.dist(ue, u)
    head = (f"{T.used} {at(u)} passed {T.used_event} {at(ue)} by {behind} ({T.call_rule}: a call was due) "
            f"and the driver has not moved {T.used_event} or {T.avail} {at(ob.avail_idx)} for {_for(ep, ob.t)}")
    extra = ""
    if starve_ep is not None and ob.dropped is not None and starve_ep.dropped0 is not None \
            and ob.dropped > starve_ep.dropped0:
        extra = f"; {ob.dropped - starve_ep.dropped0} frames dropped for want of a buffer"
    if not seen:
        return (Verdict.DRIVER_STALLED,
                f"{head}; this source sees no calls: cannot tell call_missing from driver_stalled{extra}",
                ep.t0)
    sent_now = ob.calls - ep.calls0
    if sent_now > 0:
        return Verdict.DRIVER_STALLED, f"{head}; {sent_now} calls sent, driver did not respond{extra}", ep.t0
    if last_call_used is not None and ((last_call_used - ue - 1) & M16) < behind:
        return (Verdict.DRIVER_STALLED,
                f"{head}; a call was sent at used_idx {last_call_used}, driver did not respond{extra}", ep.t0)
    last = f"last call at used_idx {last_call_used}" if last_call_used is not None else "no call seen"
    if ep.at_least and last_call_used is None:
        return (Verdict.DRIVER_STALLED,
                f"{head}; no call sent while watching, and whether one came before cannot be told{extra}",
                ep.t0)
    return Verdict.CALL_MISSING, f"{head}; 1 call due, none sent ({last}){extra}", ep.t0


def calls_owed(ob: Observation, prev: Observation | None, ep: Episode | None, seen: bool) -> bool:
    """A packed queue whose driver's event flags are ENABLE (§2.8.10: a
    call after every used descriptor): the device returned descriptors
    (``next_used`` moved) in an interval in which it sent no call, and has
    sent none since (``calls`` still from the episode's start). Only where
    calls are counted (``seen``): elsewhere nothing tells a missing call."""
    if not seen or not ob.calls_each:
        return False
    if ep is not None and ob.calls == ep.calls0:
        return True
    return prev is not None and prev.packed and ob.used_idx != prev.used_idx and ob.calls == prev.calls


def _calls_not_sent(ob: Observation, ep: Episode) -> tuple[Verdict, str, float]:
    """call_missing of :func:`calls_owed`."""
    at = ob.at
    return (Verdict.CALL_MISSING,
            f"the device returned {ob.dist(ep.used0, ob.used_idx)} descriptors (next_used {at(ep.used0)} to "
            f"{at(ob.used_idx)}) under driver event flags ENABLE (§2.8.10: every used descriptor wants a call) "
            f"and sent no call for {_for(ep, ob.t)}", ep.t0)


def _kick_due(ob: Observation, old: int) -> bool:
    """Did publishing ``old .. avail_idx`` require a kick under the device's
    suppression state (§2.7.10)? With EVENT_IDX: ``vring_need_event(
    avail_event, avail_idx, old)``; without: ``VRING_USED_F_NO_NOTIFY``
    clear. Packed (§2.8.10): device event flags DESC: the same at (off,
    wrap); ENABLE: yes; DISABLE: no."""
    if ob.event_idx and ob.avail_event is not None:
        return ob.need_event(ob.avail_event, ob.avail_idx, old)
    return not ob.used_flags & VRING_USED_F_NO_NOTIFY


def _suppression(ob: Observation, old: int, what: str) -> str:
    T, at = ob.terms, ob.at
    if ob.event_idx and ob.avail_event is not None:
        return (f"{T.avail_event} {at(ob.avail_event)} is not in [{what} {at(old)}, {T.avail} {at(ob.avail_idx)}): "
                f"the driver owed no kick for these {T.entries} ({T.kick_event})")
    return T.kick_suppressed


def _device_side(ob: Observation, ep: Episode, seen: bool) -> tuple[Verdict, str, float]:
    """device_stalled / kick_missing / suppression_stuck on a queue whose
    buffers the device must consume: buffers outstanding and ``used_idx``
    still for the threshold. The device looked (``shadow_avail_idx`` covers
    the entries, or moved, or ``last_avail_idx`` moved, or kicks arrived):
    device_stalled. It did not: kick_missing if the device's suppression
    state required a kick (§2.7.10, §2.8.10) and none came;
    suppression_stuck if it did not."""
    a, u, la, sh = ob.avail_idx, ob.used_idx, ob.last_avail_idx, ob.shadow_avail_idx
    T, at = ob.terms, ob.at
    pending = ob.dist(u, a)
    dur = _for(ep, ob.t)
    kicks = ob.kicks - ep.kicks0 if seen else None
    kick_note = f"; {kicks} kicks received" if seen and kicks else ""
    if la is not None:
        held, waiting = ob.dist(u, la), ob.dist(la, a)
        if held and (waiting == 0 or la != ep.last_avail0):
            return (Verdict.DEVICE_STALLED,
                    f"the device took {held} buffers (last_avail_idx {at(la)}) and returned none for {dur} "
                    f"({T.used} {at(u)}, {T.avail} {at(a)}){kick_note}", ep.t0)
    else:
        waiting = pending
    old = sh if sh is not None else (la if la is not None else u)
    looked = sh is not None and (sh == a or sh != ep.shadow0)
    # Where the device's read position is unknown (QEMU's vhost queues), its avail_event
    # tells it: a device re-arming kicks writes there the avail_idx it last read (Linux
    # vhost_enable_notify, QEMU virtio_queue_set_notification; §2.7.10; packed: the
    # device's event off/wrap, vhost_enable_notify_packed, §2.8.10). Past old: it read
    # these entries.
    ae = ob.avail_event
    ae_read = (sh is None and ob.event_idx and ae is not None
               and 0 < ob.dist(old, ae) <= ob.dist(old, a))
    if looked or ae_read or (seen and kicks):
        read = (f"the device read avail_idx {sh}" if sh is not None else
                (f"the device read up to {at(ae)} ({T.avail_event})" if ob.packed else
                 f"the device read avail_idx {ae} (its avail_event)") if ae_read else "the device was kicked")
        return (Verdict.DEVICE_STALLED,
                f"{waiting} buffers available and not taken for {dur} ({T.avail} {at(a)}, "
                f"{'' if la is None else f'last_avail_idx {at(la)}, '}{T.used} {at(u)}): {read} but took none"
                f"{kick_note}", ep.t0)
    what = "shadow_avail_idx" if sh is not None else ("last_avail_idx" if la is not None else T.used)
    unseen = ob.dist(old, a)
    if not _kick_due(ob, old):
        return (Verdict.SUPPRESSION_STUCK,
                f"{unseen} {T.entries} wait past {what} {at(old)} for {dur} and the device does not poll: "
                f"{_suppression(ob, old, what)}", ep.t0)
    rule = (f"{T.avail_event} {at(ob.avail_event)} ({T.kick_event})" if ob.event_idx and ob.avail_event is not None
            else T.kick_flag)
    if not seen:
        return (Verdict.DEVICE_STALLED,
                f"{unseen} {T.entries} published past {what} {at(old)} under {rule} wait for {dur}; this source "
                f"sees no kicks: cannot tell kick_missing from device_stalled", ep.t0)
    if sh is None and ep.at_least:
        return (Verdict.DEVICE_STALLED,
                f"{unseen} {T.entries} published past {what} {at(old)} under {rule} wait for {dur}; no kick "
                f"while watching, and whether one came before cannot be told", ep.t0)
    return (Verdict.KICK_MISSING,
            f"{unseen} {T.entries} published past {what} {at(old)} under {rule} required a kick; none came in "
            f"{dur} ({T.avail} {at(a)})", ep.t0)


def _starved(ob: Observation, ep: Episode) -> tuple[Verdict | None, str, float | None]:
    """starved: a queue the device fills has no buffer for the threshold
    while the device has data for it: frames dropped for want of a buffer
    (``dropped``), or the device filled the last buffer when it began."""
    dur = _for(ep, ob.t)
    T, at = ob.terms, ob.at
    polls = f" ({T.calls_off})" if ob.calls_off else ""
    if ob.dropped is not None and ep.dropped0 is not None and ob.dropped > ep.dropped0:
        return (Verdict.STARVED,
                f"no buffer posted for {dur} ({T.avail} {at(ob.avail_idx)}) while {ob.dropped - ep.dropped0} "
                f"frames were dropped for want of one{polls}", ep.t0)
    if ep.filled:
        return (Verdict.STARVED,
                f"the device filled the last buffer ({T.used} {at(ob.used_idx)}) {dur} ago and the driver "
                f"posted none since ({T.avail} {at(ob.avail_idx)}){polls}", ep.t0)
    return None, "", None


def layout_mismatch(q: QueueEntry) -> str:
    """The evidence when the used ring sits where QEMU's legacy formula puts
    it instead of where §2.7 does (seeds: QEMU's misplaced used ring at align
    4): with EVENT_IDX the avail ring is ``4 + 2·size + 2`` bytes (``used_event``
    at its end), and a used ring at ``avail + 4 + 2·size`` overlaps
    ``used_event``. Read from the addresses a source gives (``extras``
    ``qemu`` or ``device_state``: ``avail``, ``used``); "" when they agree
    or are unknown."""
    if not q.event_idx or q.layout != "split":
        return ""
    for key in ("qemu", "device_state"):
        x = q.extras.get(key)
        if isinstance(x, dict) and isinstance(x.get("avail"), int) and isinstance(x.get("used"), int):
            gap = x["used"] - x["avail"]
            if gap == 4 + 2 * q.size:
                return (f"used ring at avail + {gap} bytes ({x['used']:#x}): QEMU's legacy formula at "
                        f"align <= 4; §2.7 puts it at avail + {gap + 2} or beyond, and used_event "
                        f"(avail + {gap}) overlaps used->flags")
            return ""
    return ""


# --- block queues: bad requests and I/O errors (VIRTIO 1.2 §5.2.6) -----------------------------------

#: Each bad-request kind a block back-end counts (``extras["blk"]["bad_requests"]``, the kinds of
#: inspector.devices.blk's BLK_BAD_REQUEST_KINDS): what the driver did, and the status it got.
BLK_BAD_MEANING: dict[str, tuple[str, str]] = {
    "header_short": ("header shorter than 16 bytes", "IOERR"),
    "status_missing": ("no device-writable status byte last", "no status: chain returned with used len 0"),
    "status_not_writable": ("status byte not device-writable", "no status: chain returned with used len 0"),
    "data_not_writable": ("IN with a device-readable data buffer", "IOERR"),
    "data_not_readable": ("OUT with a device-writable data buffer", "IOERR"),
    "out_of_range": ("sectors beyond the capacity", "IOERR"),
    "sector_overflow": ("sector arithmetic overflows", "IOERR"),
    "unaligned": ("data length not a multiple of 512", "IOERR"),
    "too_many_segments": ("more data segments than seg_max", "IOERR"),
    "segment_too_large": ("a segment over size_max", "IOERR"),
    "read_only": ("write, discard or write-zeroes to a read-only disk", "IOERR"),
    "unsupported": ("unknown request type", "UNSUPP"),
    "get_id_short": ("GET_ID buffer shorter than 20 bytes", "IOERR"),
    "discard_over_limit": ("discard over max_discard_sectors/seg", "IOERR"),
    "write_zeroes_over_limit": ("write-zeroes over max_write_zeroes_sectors/seg", "IOERR"),
    "discard_bad_segment": ("bad discard/write-zeroes segment (flags, or not a multiple of 16 bytes)",
                            "UNSUPP for unknown flags, else IOERR"),
}
#: The kind that is the device's, not the driver's: its host I/O failed.
BLK_IO_ERROR = "io_error"


def blk_bad_counts(q: QueueEntry) -> dict[str, int] | None:
    """A block queue's bad-request counters by kind (``extras["blk"]
    ["bad_requests"]``, int values only: the extras are a peer's JSON), or
    None when the queue has none."""
    blk = q.extras.get("blk")
    bad = blk.get("bad_requests") if type(blk) is dict else None
    if type(bad) is not dict:
        return None
    return {k: v for k, v in bad.items() if type(k) is str and type(v) is int}


@dataclass(slots=True)
class BlkWatch:
    """A block queue's bad-request counters when watching began (``base``)
    and when they first grew past them (``t_grew``, None: not yet)."""

    base: dict[str, int]
    t_grew: float | None = None


def blk_verdict(counts: dict[str, int], watch: BlkWatch, now: float) -> tuple[Verdict | None, str, float | None]:
    """``(verdict, evidence, since)`` of a block queue whose bad-request
    counters are ``counts`` now: ``io_error`` when the device's host I/O
    failed since watching began (the backing store's fault), else
    ``bad_requests`` naming each kind that grew, its meaning and the status
    the driver got (the driver's fault); ``(None, "", None)`` when nothing
    grew. A counter that went down (the back-end restarted) becomes the new
    base."""
    grown = {}
    for k, n in counts.items():
        b = watch.base.get(k, 0)
        if n < b:
            watch.base[k] = b = n
        if n > b:
            grown[k] = n - b
    if not grown:
        watch.t_grew = None
        return None, "", None
    if watch.t_grew is None:
        watch.t_grew = now
    io = grown.pop(BLK_IO_ERROR, 0)
    if io:
        evidence = (f"{io} request{'s' if io != 1 else ''} failed in the device's host I/O since watching began "
                    f"(bad_requests io_error {counts[BLK_IO_ERROR]}): the backing store (file or block device) "
                    f"returned errors and the driver got IOERR")
        if grown:
            evidence += f"; the driver also sent {sum(grown.values())} malformed"
        return Verdict.IO_ERROR, evidence, watch.t_grew
    kinds = "; ".join(f"{k} {n} ({BLK_BAD_MEANING[k][0]}: {BLK_BAD_MEANING[k][1]})" if k in BLK_BAD_MEANING
                      else f"{k} {n}" for k, n in sorted(grown.items(), key=lambda kv: -kv[1]))
    total = sum(grown.values())
    return (Verdict.BAD_REQUESTS,
            f"the driver sent {total} malformed request{'s' if total != 1 else ''} since watching began: {kinds}",
            watch.t_grew)
