"""Headless recording of any source to an SQLite file, and its export: the
recording sink. The file format and its reader are
:mod:`inspector.recording` (below the sources, which replay it).

- :mod:`.writer`: :class:`RecordingWriter`, one transaction per interval.
- :mod:`.recorder`: the ``vqscope record`` loop (signals, progress, limits).
- :mod:`.export`: ``vqscope export`` to Chrome Trace Event Format or JSON lines.
"""

from ..recording import SCHEMA_VERSION, Recording, RecordingError  # noqa: F401
from .writer import DiskFullError, RecordError, RecordingWriter  # noqa: F401
