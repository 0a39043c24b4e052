"""A vqscope back-end as a source, through its read-only introspection
socket. The protocol is described in inspector/introspect/__init__.py and
spoken by inspector/introspect/client.py; this module names the socket and
makes the client a source.
"""

from __future__ import annotations

import os

from ..introspect.client import IntrospectionClient


def introspect_path(path: str) -> str:
    """Map a back-end's vhost-user socket path to its introspection socket
    (``PATH.introspect``); an introspection path is returned as is."""
    if path.endswith(".introspect") or not os.path.exists(path + ".introspect"):
        return path
    return path + ".introspect"


class BackendSource(IntrospectionClient):
    """Client of a back-end's introspection endpoint; reconnects lazily.
    ``events``, ``events_lost``, ``messages`` and ``new_messages`` are the
    client's (IntrospectionClient)."""

    def __init__(self, path: str, timeout: float = 5.0):
        super().__init__(introspect_path(path), timeout)
        self.name = self.path

    def snapshot(self) -> dict:
        return self.request("snapshot")
