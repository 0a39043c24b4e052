"""A snapshot JSON file as a source (recorded snapshots, tests)."""

from __future__ import annotations

from ..errors import SnapshotFormatError, SourceError
from ..snapshot.codec import loads
from ..snapshot.model import Snapshot
from .base import Source


class FileSource(Source):
    """Serves the snapshot stored in ``path`` (one Snapshot JSON object,
    README.md) on every call: the same Snapshot each time. Raises
    SourceError when the file cannot be read or breaks the contract."""

    def __init__(self, path: str):
        self.name = path
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise SourceError(f"cannot read snapshot file {path}: {e}") from e
        try:
            self._snap = loads(text)
        except SnapshotFormatError as e:
            raise SourceError(f"{path} is not a vqscope snapshot: {e}") from None

    def snapshot(self) -> Snapshot:
        return self._snap
