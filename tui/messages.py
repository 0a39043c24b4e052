"""Messages the polling worker posts to the app (dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from inspector.snapshot.model import Snapshot


@dataclass
class SnapshotReceived(Message):
    """The source answered with a snapshot."""

    snapshot: Snapshot


@dataclass
class SourceGone(Message):
    """The source raised SourceError; ``reason`` is its message."""

    reason: str
