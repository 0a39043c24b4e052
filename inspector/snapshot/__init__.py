"""The typed snapshot model (:mod:`.model`) and its JSON (:mod:`.codec`).

Sources build :class:`Snapshot` objects; the TUI, ``vqscope snapshot`` and
the recorder read them; :func:`to_json` / :func:`from_json` are the only
way to and from the Snapshot JSON of README.md.
"""

from .codec import dumps, from_json, loads, queue_from_json, queue_to_json, to_json
from .model import Anomaly, AnomalyKind, BackendFds, Chain, Descriptor, QueueEntry, QueueId, Skipped, Snapshot

__all__ = ["Anomaly", "AnomalyKind", "BackendFds", "Chain", "Descriptor", "QueueEntry", "QueueId", "Skipped",
           "Snapshot", "dumps", "from_json", "loads", "queue_from_json", "queue_to_json", "to_json"]
