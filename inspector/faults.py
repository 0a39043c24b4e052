"""Faults on purpose: the ``--inject SPEC`` of ``vqscope serve`` and ``vqscope demo``.

Each fault imitates a real bug on one vring, so that a diagnosis tool (and a
driver or device developer) can be tested against a real peer doing the
wrong thing, not against hand-made numbers. ``SPEC`` is
``KIND=VRING[,after=S][,for=S]``: vring index ``VRING`` (net: ``2k`` is
receiveq k, ``2k+1`` transmitq k, VIRTIO 1.2 §5.1.2), from ``after`` seconds
after the vring starts (default 0) for ``for`` seconds (default: for ever).

Device side (vqscope's back-end, inspector/devices/net.py and the C data
path of inspector/csrc/vqd_vq.c):

- ``stall``: the device stops serving the vring. It still drains and counts
  its kicks and reads ``avail->idx`` when kicked (its ``shadow_avail_idx``
  moves, and it asks for the next kick at that index, as Linux
  ``vhost_enable_notify`` does), but takes no chain and returns nothing.
  Frames meant for a stalled receive vring are dropped (counted in
  ``dropped``). When the fault ends the vring is served again at once.
- ``drop-calls``: used buffer notifications are decided as ever (§2.7.10:
  ``VRING_AVAIL_F_NO_INTERRUPT`` or ``used_event``; ``signalled_used``
  moves as in the kernel's ``vhost_notify``), but a call that is due is not
  written to the call eventfd, not counted in ``calls`` and not logged: a
  lost interrupt. It is counted in ``calls_dropped`` (snapshot extras
  ``inject``, for people).
- ``hold-io`` (virtio-blk, inspector/devices/blk.py): the device takes
  requests from the vring as ever but submits none of them to the disk
  until the fault ends: they stay in flight (snapshot extras
  ``blk.in_flight``), as behind a hung disk. A back-end killed meanwhile
  leaves them in the inflight area for the next one to complete.

Which device makes which: virtio-net ``stall`` and ``drop-calls``
(:data:`NET_FAULTS`), virtio-blk ``hold-io`` and ``drop-calls``
(:data:`BLK_FAULTS`).

Driver side (vqscope's built-in front-end, inspector/vhost_user/net_driver.py):

- ``withhold-kicks``: the driver publishes available entries as ever but
  never writes the kick eventfd, even when the device asked for a kick
  (§2.7.10 / §2.7.13.4). When the fault ends, the next publish kicks if any
  withheld kick was due.
- ``stop-consuming``: the driver stops processing the vring: no used entries
  collected, no ``used_event`` moved, no RX buffers refilled, its call
  eventfd not read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ArgumentError

#: Faults the device (vqscope's back-end) makes, and which device makes which.
NET_FAULTS = ("stall", "drop-calls")
BLK_FAULTS = ("hold-io", "drop-calls")
DEVICE_FAULTS = ("stall", "drop-calls", "hold-io")
#: Faults the driver (vqscope's built-in front-end) makes.
DRIVER_FAULTS = ("withhold-kicks", "stop-consuming")
FAULT_KINDS = DEVICE_FAULTS + DRIVER_FAULTS

#: What ``--inject`` takes, for help texts.
SPEC_FORMS = "KIND=VRING[,after=S][,for=S]"


@dataclass(frozen=True)
class Fault:
    """One fault on vring ``vring``: ``kind`` (one of :data:`FAULT_KINDS`),
    active from ``after`` seconds after the vring starts for ``duration``
    seconds (None: for ever). Parse one with :func:`parse_fault`."""

    kind: str
    vring: int
    after: float = 0.0
    duration: float | None = None

    @property
    def side(self) -> str:
        """``"device"`` or ``"driver"``: who makes this fault."""
        return "device" if self.kind in DEVICE_FAULTS else "driver"

    def active(self, elapsed: float) -> bool:
        """Is the fault on ``elapsed`` seconds after its vring started?"""
        if elapsed < self.after:
            return False
        return self.duration is None or elapsed < self.after + self.duration

    def next_change(self, elapsed: float) -> float | None:
        """Seconds from ``elapsed`` until :meth:`active` changes (0 < result),
        or None when it never will again."""
        if elapsed < self.after:
            return self.after - elapsed
        if self.duration is not None and elapsed < self.after + self.duration:
            return self.after + self.duration - elapsed
        return None

    def __str__(self) -> str:
        s = f"{self.kind}={self.vring}"
        if self.after:
            s += f",after={self.after:g}"
        if self.duration is not None:
            s += f",for={self.duration:g}"
        return s


def _seconds(spec: str, name: str, text: str, positive: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ArgumentError(f"fault {spec!r}: {name}={text!r} is invalid: give seconds "
                            f"{'> 0' if positive else '>= 0'}")
    return v


def parse_fault(spec: str, kinds: tuple[str, ...] = FAULT_KINDS) -> Fault:
    """The :class:`Fault` that ``spec`` (``KIND=VRING[,after=S][,for=S]``)
    names, ``KIND`` one of ``kinds``. Raises ArgumentError naming the part
    that is wrong (kind, vring, option or seconds)."""
    parts = [p.strip() for p in spec.split(",")]
    kind, eq, vring = parts[0].partition("=")
    kind = kind.strip()
    if kind not in FAULT_KINDS:
        raise ArgumentError(f"fault {spec!r}: kind {kind!r} is unknown: use one of "
                            f"{', '.join(kinds)} ({SPEC_FORMS})")
    if kind not in kinds:
        maker = ("a driver fault, made by vqscope's built-in front-end (vqscope demo --inject)"
                 if kind in DRIVER_FAULTS else
                 f"a device fault of another device (virtio-net: {', '.join(NET_FAULTS)}; "
                 f"virtio-blk: {', '.join(BLK_FAULTS)})")
        raise ArgumentError(f"fault {spec!r}: {kind} is {maker}; here use one of {', '.join(kinds)}")
    vring = vring.strip()
    if not eq or not vring.isdigit():
        raise ArgumentError(f"fault {spec!r}: VRING {vring!r} is not a vring index (an integer >= 0): "
                            f"write {kind}=VRING[,after=S][,for=S]")
    opts: dict[str, float] = {}
    for p in parts[1:]:
        name, eq, value = p.partition("=")
        name = name.strip()
        if name not in ("after", "for") or not eq:
            raise ArgumentError(f"fault {spec!r}: option {p!r} is unknown: use after=SECONDS or "
                                f"for=SECONDS")
        if name in opts:
            raise ArgumentError(f"fault {spec!r}: {name}= is given twice")
        opts[name] = _seconds(spec, name, value.strip(), positive=name == "for")
    return Fault(kind, int(vring), opts.get("after", 0.0), opts.get("for"))


def check_vrings(faults, num_vrings: int, what: str) -> None:
    """Raise ArgumentError when a fault names a vring at or beyond
    ``num_vrings`` (``what``: the device, for the message)."""
    for f in faults:
        if f.vring >= num_vrings:
            raise ArgumentError(f"fault {str(f)!r}: vring {f.vring} does not exist: {what} has "
                                f"vrings 0 to {num_vrings - 1}")


__all__ = ["BLK_FAULTS", "DEVICE_FAULTS", "DRIVER_FAULTS", "NET_FAULTS", "FAULT_KINDS", "SPEC_FORMS", "Fault", "check_vrings",
           "parse_fault"]
