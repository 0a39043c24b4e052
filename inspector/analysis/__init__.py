"""The Analyzer stage (README "Architecture"): from a source's snapshots and
events over time, a verdict per queue with its evidence.

- :mod:`.verdict`: :class:`Verdict`, :class:`Severity`, :class:`Diagnosis`
  and their JSON.
- :mod:`.roles`: which side of a queue holds buffers while it is idle, from
  the device type (VIRTIO 1.2 §5).
- :mod:`.notify`: the notification-suppression arithmetic of §2.7.7 and
  §2.7.10 (``vring_need_event``), modulo 2^16.
- :mod:`.rules` and :mod:`.analyzer`: the rules, and the :class:`Analyzer`
  that keeps a bounded window per queue and applies them.
"""

from .analyzer import Analyzer, Thresholds, verdict_timeline
from .roles import Role, role_of
from .verdict import MEANING, Diagnosis, Severity, Verdict, diagnosis_from_json, diagnosis_to_json

__all__ = ["Analyzer", "Diagnosis", "MEANING", "Role", "Severity", "Thresholds", "Verdict",
           "diagnosis_from_json", "diagnosis_to_json", "role_of", "verdict_timeline"]
