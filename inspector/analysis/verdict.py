"""The doctor's vocabulary: a queue's verdict, its severity and the
evidence, and their JSON (the one place a diagnosis becomes JSON or comes
back from it: ``vqscope doctor --json``, the recorder's verdict table, the
TUI reads the typed objects).

A :class:`Diagnosis` says, for one queue at one time, which :class:`Verdict`
holds, since when, and why in one sentence of numbers (``evidence``). The
rules that produce them are in :mod:`inspector.analysis.rules`; each
verdict's meaning is in :data:`MEANING`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from ..errors import SnapshotFormatError
from ..snapshot.model import QueueId


class Verdict(StrEnum):
    """What is wrong with a queue, if anything (README "Diagnosing a stuck
    queue"). Values are the JSON and CLI words."""

    HEALTHY = "healthy"
    IDLE = "idle"
    DEVICE_STALLED = "device_stalled"
    KICK_MISSING = "kick_missing"
    CALL_MISSING = "call_missing"
    DRIVER_STALLED = "driver_stalled"
    STARVED = "starved"
    SUPPRESSION_STUCK = "suppression_stuck"
    RING_BROKEN = "ring_broken"
    LAYOUT_MISMATCH = "layout_mismatch"
    BAD_REQUESTS = "bad_requests"
    IO_ERROR = "io_error"


class Severity(IntEnum):
    """How bad a verdict is: ``OK`` (nothing to do), ``WARNING`` (traffic
    suffers, may recover), ``ERROR`` (the queue will not move again by
    itself)."""

    OK = 0
    WARNING = 1
    ERROR = 2


#: One line per verdict: what it means (the README's table, ``doctor --help``).
MEANING: dict[Verdict, str] = {
    Verdict.HEALTHY: "buffers move: the device takes and returns them, the driver collects them",
    Verdict.IDLE: "nothing to do: no buffers waiting on a consuming queue, or a filling queue's "
                  "buffers wait for data (net RX, console RX: normal)",
    Verdict.DEVICE_STALLED: "the device holds buffers it was notified of (or polls for) and neither "
                            "takes nor returns them",
    Verdict.KICK_MISSING: "the driver published buffers whose publication required a kick under the "
                          "device's suppression state, and no kick came: the device never looked",
    Verdict.CALL_MISSING: "the device returned buffers whose return required a call under the "
                          "driver's suppression state, and sent none: the driver never looked",
    Verdict.DRIVER_STALLED: "the device returned buffers and called, and the driver does not "
                            "collect them (used_event and refills do not move)",
    Verdict.STARVED: "a filling queue has no buffers while the device has data for it",
    Verdict.SUPPRESSION_STUCK: "a suppression flag or event index is left where the other side "
                               "will never be notified again",
    Verdict.RING_BROKEN: "the ring breaks the spec (decoder anomaly) or the device marked it broken",
    Verdict.LAYOUT_MISMATCH: "the used ring is not where VIRTIO 1.2 §2.7 puts it (QEMU's legacy "
                             "formula at align <= 4)",
    Verdict.BAD_REQUESTS: "a block queue's driver sent malformed requests while watched (the device "
                          "counted them by kind and answered each with its status, §5.2.6)",
    Verdict.IO_ERROR: "a block device's host I/O failed while watched: its backing store (file or "
                      "block device) returned errors, the driver got VIRTIO_BLK_S_IOERR",
}

#: Each verdict's severity.
SEVERITY: dict[Verdict, Severity] = {
    Verdict.HEALTHY: Severity.OK, Verdict.IDLE: Severity.OK,
    Verdict.DEVICE_STALLED: Severity.ERROR, Verdict.KICK_MISSING: Severity.ERROR,
    Verdict.CALL_MISSING: Severity.ERROR, Verdict.DRIVER_STALLED: Severity.ERROR,
    Verdict.STARVED: Severity.WARNING, Verdict.SUPPRESSION_STUCK: Severity.ERROR,
    Verdict.RING_BROKEN: Severity.ERROR, Verdict.LAYOUT_MISMATCH: Severity.ERROR,
    Verdict.BAD_REQUESTS: Severity.WARNING, Verdict.IO_ERROR: Severity.ERROR,
}


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The verdict on one queue.

    ``device``/``index``: the queue (as in the snapshot); ``verdict``;
    ``since``: when the verdict started to hold, seconds since the epoch (for
    a state already present when watching began: the first snapshot's time,
    and ``evidence`` says "at least"); ``evidence``: one sentence with the
    numbers and the rule that fired (empty for healthy/idle queues);
    ``role``: ``"fill"`` (the driver posts buffers for the device to fill),
    ``"consume"`` (the device consumes the driver's buffers) or ``"unknown"``
    (inspector.analysis.roles); ``time``: the snapshot time it was made at.
    """

    device: str
    index: int
    verdict: Verdict
    since: float
    evidence: str = ""
    role: str = "unknown"
    time: float = 0.0

    @property
    def id(self) -> QueueId:
        """``(device, index)``."""
        return (self.device, self.index)

    @property
    def severity(self) -> Severity:
        """The verdict's :class:`Severity`."""
        return SEVERITY[self.verdict]

    @property
    def ok(self) -> bool:
        """True for healthy and idle queues."""
        return SEVERITY[self.verdict] is Severity.OK


def diagnosis_to_json(d: Diagnosis) -> dict[str, Any]:
    """``{"device", "index", "verdict", "severity", "since", "evidence",
    "role", "time"}``; ``severity`` as its lower-case name."""
    return {"device": d.device, "index": d.index, "verdict": d.verdict.value,
            "severity": d.severity.name.lower(), "since": d.since, "evidence": d.evidence,
            "role": d.role, "time": d.time}


_VERDICTS = {v.value: v for v in Verdict}


def diagnosis_from_json(obj: Any, where: str = "diagnosis") -> Diagnosis:
    """The Diagnosis of :func:`diagnosis_to_json`'s object; SnapshotFormatError
    naming the first member missing or of the wrong type (``severity`` is
    derived from the verdict and not checked)."""
    if type(obj) is not dict:
        raise SnapshotFormatError(f"{where} is {type(obj).__name__}, not an object")

    def get(key: str, types: tuple, what: str):
        v = obj.get(key)
        if type(v) not in types:
            raise SnapshotFormatError(f"{where}.{key} is {v!r:.60}, not {what}")
        return v

    verdict = _VERDICTS.get(get("verdict", (str,), "a string"))
    if verdict is None:
        raise SnapshotFormatError(f"{where}.verdict is {obj['verdict']!r:.60}, not one of "
                                  f"{', '.join(_VERDICTS)}")
    return Diagnosis(device=get("device", (str,), "a string"), index=get("index", (int,), "an int"),
                     verdict=verdict, since=float(get("since", (int, float), "a number")),
                     evidence=get("evidence", (str,), "a string"),
                     role=get("role", (str,), "a string"),
                     time=float(get("time", (int, float), "a number")))
