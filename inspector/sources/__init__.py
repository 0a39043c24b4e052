"""Sources of queue state. Each is a :class:`~.base.Source` whose
``snapshot()`` returns a :class:`~inspector.snapshot.model.Snapshot`
(README.md, "Snapshot JSON"); no UI code lives here.

- ``backend``: a vqscope back-end, through its introspection socket.
- ``file``: a snapshot JSON file (one object), for tests and offline looks.
- ``qemu``: a running QEMU, through QMP and ``/proc/PID/mem``.
- ``vhost_net``: the kernel vhost-net queues of a process, through BCC
  probes and ``/proc/PID/mem``.
- ``replay``: a recording (``vqscope record``), at a movable time cursor.
"""

from __future__ import annotations

import argparse

from ..errors import SourceError, SourceGone  # noqa: F401  (SourceGone re-exported)
from .backend import BackendSource
from .base import Source
from .file import FileSource
from .qemu import QemuSource
from .replay import ReplaySource
from .vhost_net import VhostNetSource

__all__ = ["Source", "SourceError", "SourceGone", "open_source"]


def open_source(args: argparse.Namespace) -> Source:
    """The source the CLI arguments name (``--connect``, ``--qmp``, ``--file``
    or ``--replay`` with an optional ``--at``)."""
    if getattr(args, "replay", None):
        others = [f"--{o}".replace("_", "-") for o in ("connect", "qmp", "file", "pid", "vhost_net")
                  if getattr(args, o, None) is not None]
        if others:
            raise SourceError(f"--replay FILE plays a recording; it does not go with {', '.join(others)}")
        replay = ReplaySource(args.replay)
        if getattr(args, "at", None) is not None:
            try:
                replay.seek_spec(args.at)
            except BaseException:
                replay.close()
                raise
        return replay
    if getattr(args, "at", None) is not None:
        raise SourceError("--at goes with --replay FILE (a position in a recording)")
    if getattr(args, "pid", None) is not None and not getattr(args, "qmp", None):
        raise SourceError("--pid goes with --qmp SOCK (QEMU's pid when SO_PEERCRED cannot tell it)")
    if getattr(args, "qmp", None):
        return QemuSource(args.qmp, pid=args.pid)
    if getattr(args, "vhost_net", None) is not None:
        # One snapshot needs neither per-event records nor the ioctl probe
        # (it sees set-ups from now on): one BPF compile less.
        live = getattr(args, "command", None) != "snapshot"
        return VhostNetSource(args.vhost_net, stream=live, ioctl_probe=live)
    if getattr(args, "connect", None):
        return BackendSource(args.connect)
    if getattr(args, "file", None):
        return FileSource(args.file)
    raise SourceError("no source given: use --connect PATH (a vqscope back-end), --qmp SOCK (a running "
                      "QEMU's monitor), --vhost-net PID (a process's kernel vhost-net queues) or "
                      "--file SNAPSHOT.json")
