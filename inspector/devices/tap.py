"""Linux tap devices for virtio-net's ``--tap`` mode (``linux/if_tun.h``)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from ..errors import InspectorError
from ..spec.tun import (DEV_TUN, IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_UP, IFNAMSIZ, SIOCGIFFLAGS,
                        SIOCSIFFLAGS, TUNSETIFF)


def open_tap(name: str | None, queues: int = 1) -> tuple[str, list[int]]:
    """Open (creating if needed) tap ``name`` with ``queues`` non-blocking fds
    and set it up; returns the kernel's name and the fds."""
    flags = IFF_TAP | IFF_NO_PI | (IFF_MULTI_QUEUE if queues > 1 else 0)
    req = (name or "").encode()
    if len(req) >= IFNAMSIZ:
        raise InspectorError(f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes (IFNAMSIZ)")
    fds: list[int] = []
    try:
        for _ in range(queues):
            try:
                fd = os.open(DEV_TUN, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise InspectorError(f"cannot open {DEV_TUN}: {e.strerror} (needs root or "
                                     f"CAP_NET_ADMIN, and the tun module)") from e
            fds.append(fd)
            try:
                res = fcntl.ioctl(fd, TUNSETIFF, struct.pack(f"{IFNAMSIZ}sH22x", req, flags))
            except OSError as e:
                raise InspectorError(f"cannot attach tap {name or '(new)'}: {e.strerror}") from e
            req = res[:16].rstrip(b"\0")
        ifname = req.decode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            cur = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack(f"{IFNAMSIZ}sH22x", req, 0))
            iflags = struct.unpack_from(f"{IFNAMSIZ}sH", cur)[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(f"{IFNAMSIZ}sH22x", req, iflags | IFF_UP))
        return ifname, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
