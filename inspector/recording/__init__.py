"""The recording file (``vqscope record -o FILE``, README.md "Recording"):
its SQLite schema, the encoding of snapshot deltas and packed event blocks,
and the read-only reader. The recorder (:mod:`inspector.record`) writes it;
the replay source (:mod:`inspector.sources.replay`) and the exporter read it
through :class:`Recording`. A file is input like any other: every part read
is checked, and a bad one is a :class:`RecordingError` naming it.

- :mod:`.schema`: the file's tables and format version.
- :mod:`.codec`: snapshot deltas and packed event blocks.
- :mod:`.reader`: :class:`Recording`, the read-only API.
"""

from .reader import Recording, RecordingError  # noqa: F401
from .schema import SCHEMA_VERSION  # noqa: F401
