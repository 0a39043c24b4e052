"""A vqscope back-end as a source, through its read-only introspection socket.

Protocol (one Unix stream connection, newline-delimited JSON both ways): the
client sends ``{"op": "snapshot"}`` and receives one snapshot JSON object, or
``{"error": "..."}``. Other ops: ``{"op": "messages"}`` returns
``{"messages": [...]}``, the back-end's vhost-user message log. There is no
operation that writes anything.
"""

from __future__ import annotations

import json
import os
import socket

from ..errors import SourceError


def introspect_path(path: str) -> str:
    """Map a back-end's vhost-user socket path to its introspection socket
    (``PATH.introspect``); an introspection path is returned as is."""
    if path.endswith(".introspect") or not os.path.exists(path + ".introspect"):
        return path
    return path + ".introspect"


class BackendSource:
    """Client of a back-end's introspection endpoint; reconnects lazily."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = introspect_path(path)
        self.name = self.path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile = None

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise SourceError(f"cannot connect to the introspection socket {self.path}: {e.strerror}; "
                              f"is `vqscope serve` running?") from e
        self._sock = s
        self._rfile = s.makefile("rb")

    def request(self, op: str) -> dict:
        """Send ``{"op": op}`` and return the decoded reply."""
        if self._sock is None:
            self._connect()
        try:
            self._sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            line = self._rfile.readline()
        except OSError as e:
            self.close()
            raise SourceError(f"introspection socket {self.path}: {e}") from e
        if not line:
            self.close()
            raise SourceError(f"back-end at {self.path} closed the introspection connection")
        try:
            reply = json.loads(line)
        except ValueError as e:
            self.close()
            raise SourceError(f"back-end at {self.path} sent a malformed reply: {e}") from e
        if "error" in reply:
            raise SourceError(f"back-end at {self.path}: {reply['error']}")
        return reply

    def snapshot(self) -> dict:
        return self.request("snapshot")

    def messages(self) -> list[dict]:
        return self.request("messages")["messages"]

    def close(self) -> None:
        if self._sock is not None:
            self._rfile.close()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "BackendSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
