"""Messages the polling worker posts to the app (dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from inspector.analysis import Diagnosis
from inspector.snapshot.model import QueueId, Snapshot


@dataclass
class SnapshotReceived(Message):
    """The source answered with a snapshot; ``diagnoses``: the analyzer's
    verdicts after it, or None when the snapshot is not new (same ``time``)."""

    snapshot: Snapshot
    diagnoses: dict[QueueId, Diagnosis] | None = None


@dataclass
class SourceGone(Message):
    """The source raised SourceError; ``reason`` is its message."""

    reason: str
