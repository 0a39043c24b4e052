"""Tap devices: ``include/uapi/linux/if_tun.h`` and the interface ioctls
of ``include/uapi/linux/sockios.h`` / ``if.h`` that opening a tap needs."""

from __future__ import annotations

from .ioctl import _IOW

IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

TUNSETIFF = _IOW(ord("T"), 202, 4)
TUNSETVNETHDRSZ = _IOW(ord("T"), 216, 4)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914

DEV_TUN = "/dev/net/tun"
