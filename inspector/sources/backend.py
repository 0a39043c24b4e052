"""A vqscope back-end as a source, through its read-only introspection
socket. The protocol is described in inspector/introspect/__init__.py and
spoken by inspector/introspect/client.py; this module names the socket and
makes the client a source.
"""

from __future__ import annotations

import os

from ..errors import SnapshotFormatError, SourceError
from ..introspect.client import IntrospectionClient
from ..snapshot.codec import from_json
from ..snapshot.model import Snapshot
from .base import Source


def introspect_path(path: str) -> str:
    """Map a back-end's vhost-user socket path to its introspection socket
    (``PATH.introspect``); an introspection path is returned as is."""
    if path.endswith(".introspect") or not os.path.exists(path + ".introspect"):
        return path
    return path + ".introspect"


class BackendSource(IntrospectionClient, Source):
    """Client of a back-end's introspection endpoint as a source; reconnects
    lazily. ``chains`` False asks for snapshots without the in-flight chains
    (introspection op ``snapshot`` with ``"chains": false``). ``events``, ``events_lost``, ``messages`` and ``new_messages``
    are the client's (IntrospectionClient)."""

    has_events = True
    has_messages = True

    def __init__(self, path: str, timeout: float = 5.0, chains: bool = True):
        super().__init__(introspect_path(path), timeout)
        self.name = self.path
        self.chains = chains

    def snapshot(self) -> Snapshot:
        """The back-end's snapshot (its ``snapshot`` reply, parsed; without
        chains when the source was made with ``chains=False``); SourceError
        when it does not answer or breaks the Snapshot JSON contract."""
        reply = self.request("snapshot") if self.chains else self.request("snapshot", chains=False)
        try:
            return from_json(reply)
        except SnapshotFormatError as e:
            raise SourceError(f"back-end at {self.path} sent a malformed snapshot: {e}") from None

