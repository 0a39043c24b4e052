"""Where a packed vring resumes: the SET_VRING_BASE a front-end gave, checked
against the ring in guest memory (VIRTIO 1.2 §2.8), read only.

Why. A split ring keeps the device's progress in guest memory (used->idx):
after a back-end crash QEMU sets last_avail_idx = used->idx and the new
back-end takes again the buffers the dead one took and did not return. A
packed ring has no such index, and QEMU 7.2 does not look for one
(virtio_queue_packed_restore_last_avail_idx does nothing): after a SIGKILL
under ``reconnect=1`` the new back-end gets the positions of the LAST VHOST
START, e.g. (0,1,0,1), while the device had written used descriptors far
past them. Starting there, the device reads used descriptors as nothing
available and writes its own where the driver does not look: the guest's
network dies.

What the ring shows (flags mode of the packed decoder,
:mod:`inspector.ring.reference_packed`): the driver's ``next_avail`` exactly
(the step in the AVAIL bits), and an estimate ``e`` of the device's
next_used: the slot after the last used descriptor (AVAIL == USED == its
round) before ``next_avail``, or ``next_avail - size`` when there is none
(every slot outstanding). Slots from ``e`` to ``next_avail`` are all
available.

The given base (``next_used`` with its wrap counter, and ``last_avail``) is
kept when the ring agrees with it:

- ``next_used == e``; or
- ``next_used`` is after ``e`` by the TAIL of the chain returned just
  before ``e`` (§2.8.9: one used descriptor per buffer, written over the
  chain's first slot, the device then skips the chain's other slots, which
  still look available): the slots from ``e`` to ``next_used`` carry the
  returned buffer's id with VRING_DESC_F_NEXT on all but the last, as a
  driver that writes the id in every descriptor of a chain (Linux) leaves
  them;
- and ``last_avail`` is between ``next_used`` and ``next_avail`` (the
  device cannot have taken what the driver has not made available).

Otherwise the base cannot be right (a used descriptor lies between the
given next_used and the driver's next_avail: the device wrote past it; it
is beyond the driver's next_avail; or it would leave outstanding buffers
unreturned) and the vring resumes at last_avail = next_used = ``e``: the
buffers the dead back-end took and did not return are taken again, as for
split rings. A device must write its used descriptors exactly where the
driver reads the next one (the driver's last_used, = the device's real
next_used once the driver collected what was returned): skipping one slot
too many leaves the driver waiting forever, one too few is healed after
one chain (the driver skips what it has already collected).

What is exact and what is an estimate:

- Chains of one slot (a single direct descriptor, or one
  VRING_DESC_F_INDIRECT descriptor), in any completion order: every slot
  the device passed holds a used descriptor, so ``e`` is exact, and so is
  the check of the given base. This is what a Linux guest's virtio_net
  produces when VIRTIO_RING_F_INDIRECT_DESC is negotiated (our net device
  offers it): TX buffers of more than one sg entry go indirect
  (virtqueue_use_indirect), RX mergeable buffers (VIRTIO_NET_F_MRG_RXBUF,
  offered) and small buffers are one descriptor each.
- Multi-slot chains returned in order: the last returned chain's tail looks
  available and cannot be told from a new chain made available after it
  (Linux reuses a returned buffer id first: its next chain, at the slot
  after, carries the same id). ``e`` does not skip the tail: the device
  takes it again as a chain and returns it, a chain the driver had already
  collected (its data processed once more), and is back at the driver's
  position after it. A given base at the end of that tail is kept; so is,
  wrongly, a stale base that lands exactly at the end of a new chain
  carrying the returned id (2·size - k slots of progress since it was
  current): the ring cannot tell the two apart.
- Multi-slot chains returned out of order: the slots skipped between used
  descriptors look available too; ``e`` again stops after the last used
  descriptor, and the chains after it are taken again.
- Nothing written since the ring was set up (all flags 0): ``e`` is (0, 1).

Never writes guest memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..datapath.packed_queue import decode_vring_base, encode_vring_base
from ..memory import GuestMemory
from ..ring.decoder import snapshot_packed
from ..ring.packed import packed_counter, packed_distance, packed_position
from ..spec.virtio import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT


@dataclass(frozen=True)
class PackedResume:
    """Where a packed vring resumes (:func:`resume_packed`).

    ``base``: the 32-bit vhost-user vring base to start from (the given one
    when ``recovered`` is False). ``given``, ``ring_used`` and
    ``next_avail``: (last_avail_idx, wrap, next_used, wrap) as given, the
    device's used position the ring shows (slot, wrap: the estimate of the
    module docstring) and the driver's (slot, wrap). ``reason``: why the
    given base cannot be right ("" when kept). ``outstanding``: descriptors
    (slots) from the resumed next_used to the driver's next_avail."""

    base: int
    recovered: bool
    given: tuple[int, int, int, int]
    ring_used: tuple[int, int]
    next_avail: tuple[int, int]
    outstanding: int
    reason: str = ""

    def message(self) -> str:
        """One log line: the given and the recovered positions and why."""
        la, law, nu, nuw = self.given
        return (f"SET_VRING_BASE gave last_avail ({la},{law}) next_used ({nu},{nuw}) but {self.reason}; "
                f"resuming at last_avail = next_used = {_fmt(self.ring_used)} where the ring shows the "
                f"device's next used descriptor (after the last used descriptor before the driver's "
                f"next_avail {_fmt(self.next_avail)}); the {self.outstanding} descriptor(s) outstanding "
                f"are taken again")


def _pos(c: int, size: int) -> tuple[int, int]:
    return packed_position(c, size)


def _fmt(p: tuple[int, int]) -> str:
    """A position as the log writes it: (slot,wrap)."""
    return f"({p[0]},{p[1]})"


def _tail_of_returned(flags, ids, size: int, e: int, n: int) -> bool:
    """Are the ``n`` slots from counter ``e`` the tail of the chain whose
    used descriptor is at ``e - 1`` (its id in each, NEXT on all but the
    last, no INDIRECT: §2.8.7, an indirect descriptor is its chain's only one)?"""
    bid = ids[(e - 1) % size]
    for k in range(n):
        s = (e + k) % size
        f = flags[s]
        if ids[s] != bid or f & VRING_DESC_F_INDIRECT or bool(f & VRING_DESC_F_NEXT) != (k < n - 1):
            return False
    return True


def resume_packed(mem: GuestMemory, size: int, desc: int, driver_event: int, device_event: int,
                  base: int) -> PackedResume:
    """Check the vhost-user ``base`` (32-bit packed form, or the 16-bit form
    :func:`~inspector.datapath.packed_queue.decode_vring_base` reads) of the
    packed ring of ``size`` at guest-physical ``desc`` / ``driver_event`` /
    ``device_event`` against the ring (module docstring). Reads guest memory
    only. Raises what :func:`inspector.ring.decoder.snapshot_packed` raises
    (LayoutError, RingError, MemoryAccessError) when the ring cannot be
    read, ArgumentError when a given slot is not below ``size``."""
    given = decode_vring_base(base)
    la, law, nu, nuw = given
    snap = snapshot_packed(mem, size, desc, driver_event, device_event)   # "flags": nothing given
    na = packed_counter(snap.next_avail, snap.avail_wrap_counter, size)
    e = packed_counter(snap.next_used, snap.used_wrap_counter, size)
    span = packed_distance(e, na, size)        # slots outstanding from e (size: no used descriptor seen)
    cu, ca = packed_counter(nu, nuw, size), packed_counter(la, law, size)
    d = packed_distance(e, cu, size)
    behind = packed_distance(cu, na, size)     # given next_used to the driver's next_avail
    nav, ring_used = _pos(na, size), _pos(e, size)
    reason = ""
    if d == 0 or (0 < d <= span < size and _tail_of_returned(snap.ring_flags, snap.ring_id, size, e, d)):
        if packed_distance(cu, ca, size) > behind:
            reason = (f"its last_avail is beyond the driver's next_avail {_fmt(nav)}: "
                      f"the device cannot have taken buffers the driver has not made available")
    elif behind > size:
        reason = (f"it is not within a round behind the driver's next_avail {_fmt(nav)} "
                  f"(beyond it, or more than a round behind)")
    elif d > span:
        u = _pos(e - 1, size)
        reason = (f"desc[{u[0]}] (wrap {u[1]}) between it and the driver's next_avail {_fmt(nav)} is a "
                  f"used descriptor: the device wrote past it")
    else:
        reason = (f"the {d} slot(s) from {_fmt(ring_used)} to it are buffers the driver made available "
                  f"and no device returned (not the tail of a returned chain)")
    if not reason:
        return PackedResume(base, False, given, ring_used, nav, behind)
    return PackedResume(encode_vring_base(*ring_used, *ring_used), True, given, ring_used, nav, span,
                        reason)


__all__ = ["PackedResume", "resume_packed"]
