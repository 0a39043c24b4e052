"""QMP for the QEMU source: a synchronous client on a private event loop
thread, and the choice of the one per-queue command that is side-effect free
for the device (:func:`queue_command`).

A vhost device's queue must never be asked with
``x-query-virtio-queue-status`` (QEMU then calls vhost_get_vring_base, which
for vhost-user sends GET_VRING_BASE and stops the ring), and
``x-query-virtio-queue-element`` can mark a device broken on a bad ``next``:
:class:`QmpChannel` refuses both by name (:data:`VHOST_UNSAFE`), except the
first through :func:`queue_command` for a queue QEMU services itself.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

from ...errors import InspectorError, SourceError, SourceGone

#: Commands that must never reach a device whose vhost has started (see the
#: module docstring); x-query-virtio-queue-element is never sent at all.
VHOST_UNSAFE = frozenset({"x-query-virtio-queue-status", "x-query-virtio-queue-element"})
QUEUE_STATUS = "x-query-virtio-queue-status"
VHOST_QUEUE_STATUS = "x-query-virtio-vhost-queue-status"


def queue_command(vhost_started: bool) -> str:
    """The one QMP command that gives a queue's addresses and indices. This
    choice is the only place a per-queue command name comes from."""
    return VHOST_QUEUE_STATUS if vhost_started else QUEUE_STATUS


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a Unix socket (SO_PEERCRED)."""
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return pid


class QmpChannel:
    """A synchronous QMP client (qemu.qmp's QMPClient) on a private event
    loop thread; callable from any thread, one command at a time."""

    def __init__(self, path: str, timeout: float = 5.0):
        from qemu.qmp import QMPClient  # a dependency only of this source

        self.path = path
        self.timeout = timeout
        self.pid: int | None = None
        self.greeting: dict | None = None
        self._lock = threading.Lock()
        self._closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise SourceError(f"QMP socket {path} does not exist; start QEMU with "
                              f"-qmp unix:{path},server=on,wait=off") from None
        except OSError as e:
            sock.close()
            why = "nothing listens there (QEMU exited?)" if isinstance(e, ConnectionRefusedError) \
                else e.strerror or str(e)
            raise SourceError(f"cannot connect to the QMP socket {path}: {why}") from None
        self.pid = peer_pid(sock)
        sock.setblocking(False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vqscope-qmp", daemon=True)
        self._thread.start()
        self._client = self._run(self._make(QMPClient), timeout)
        try:
            self._run(self._client.connect(sock), timeout)
        except BaseException as e:
            self._stop_loop()
            sock.close()
            if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
                raise SourceError(
                    f"{path}: no QMP greeting within {timeout:g} s — not a QEMU monitor, or another "
                    f"client holds it (QEMU serves one client per -qmp socket; add another "
                    f"-qmp unix:PATH,server=on,wait=off)") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"{path} is not a QEMU QMP monitor: {first}") from None
        if self._client.greeting is not None:
            self.greeting = self._client.greeting._asdict()

    @staticmethod
    async def _make(cls):
        client = cls("vqscope")
        client.await_greeting = True
        client.negotiate = True
        return client

    def _run(self, coro, timeout: float | None):
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def execute(self, cmd: str, args: dict | None = None, *, vhost_started: bool | None = None) -> Any:
        """Run ``cmd``; QMP errors become :class:`QmpCommandError`, a lost
        connection :class:`SourceGone`. A command of :data:`VHOST_UNSAFE`
        needs ``vhost_started=False`` (the caller read it from
        x-query-virtio-status), or it is refused before it is sent."""
        res = self.execute_many([(cmd, args, vhost_started)])[0]
        if isinstance(res, QmpCommandError):
            raise res
        return res

    def execute_many(self, calls: list[tuple[str, dict | None, bool | None]]) -> list[Any]:
        """Run ``calls`` — ``(cmd, args, vhost_started)`` as for
        :meth:`execute` — pipelined on the one connection (QMP matches
        replies by id); one result per call, a :class:`QmpCommandError` in
        place of a command QEMU refused. Raises like :meth:`execute` for
        everything else."""
        from qemu.qmp import ExecuteError, QMPError  # as in __init__: only this source needs qemu.qmp

        for cmd, args, vhost_started in calls:
            if cmd in VHOST_UNSAFE and vhost_started is not False:
                raise InspectorError(f"refusing {cmd} {args}: only for a device whose vhost has not "
                                     f"started (it would stop a vhost ring)")
        if self._closed:
            raise SourceGone(f"QMP connection to {self.path} is closed")

        async def run_all():
            return await asyncio.gather(*(self._client.execute(c, a) for c, a, _ in calls),
                                        return_exceptions=True)

        with self._lock:
            try:
                results = self._run(run_all(), self.timeout + 0.01 * len(calls))
            except (asyncio.TimeoutError, TimeoutError):
                raise SourceError(f"QEMU at {self.path} did not answer {calls[0][0]} (and "
                                  f"{len(calls) - 1} more) within {self.timeout:g} s") from None
        out = []
        for (cmd, _, _), r in zip(calls, results):
            if isinstance(r, ExecuteError):
                r = QmpCommandError(cmd, r.error_class, str(r))
            elif isinstance(r, (QMPError, OSError, EOFError)):
                raise SourceGone(f"QEMU at {self.path} went away ({type(r).__name__}: {r})")
            elif isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    def hmp(self, command_line: str) -> str:
        return self.execute("human-monitor-command", {"command-line": command_line})

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.disconnect(), self.timeout)
        except BaseException:  # noqa: BLE001 - a dead peer is closed enough
            pass
        self._stop_loop()


class QmpCommandError(SourceError):
    """QEMU answered a command with an error."""

    def __init__(self, cmd: str, error_class: str, desc: str):
        super().__init__(f"QMP {cmd}: {error_class}: {desc}")
        self.cmd = cmd
        self.error_class = error_class
        self.desc = desc
