"""Headless recording of any source to an SQLite file, reading it back,
exporting it (issue 5).

- :mod:`.schema`: the file's tables (README.md, "Recording").
- :mod:`.codec`: snapshot deltas and packed event blocks.
- :mod:`.writer`: :class:`RecordingWriter`, one transaction per interval.
- :mod:`.reader`: :class:`Recording`, the read-only API (replay, export).
- :mod:`.recorder`: the ``vqscope record`` loop (signals, progress, limits).
- :mod:`.export`: ``vqscope export`` to Chrome Trace Event Format or JSON lines.
"""

from .reader import Recording, RecordingError  # noqa: F401
from .schema import SCHEMA_VERSION  # noqa: F401
from .writer import DiskFullError, RecordError, RecordingWriter  # noqa: F401
