"""A snapshot JSON file as a source (recorded snapshots, tests)."""

from __future__ import annotations

import json

from ..errors import SourceError


class FileSource:
    """Serves the snapshot stored in ``path`` (a JSON object) on every call."""

    def __init__(self, path: str):
        self.name = path
        try:
            with open(path) as f:
                self._snap = json.load(f)
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot read snapshot file {path}: {e}") from e
        if not isinstance(self._snap, dict) or "queues" not in self._snap:
            raise SourceError(f"{path} is not a vqscope snapshot (no 'queues' field)")

    def snapshot(self) -> dict:
        return self._snap

    def close(self) -> None:
        pass

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
