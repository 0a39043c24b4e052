"""The device's status byte, its config space and the back-end → front-end
channel of one vhost-user connection: SET/GET_STATUS
(VHOST_USER_PROTOCOL_F_STATUS), GET/SET_CONFIG (F_CONFIG) and
SET_BACKEND_REQ_FD (F_BACKEND_REQ) with the CONFIG_CHANGE_MSG it carries.

A device whose queue breaks calls the hook :meth:`DeviceControl.needs_reset_hook`
(installed as ``Device.on_needs_reset``): from then on GET_STATUS shows
VIRTIO_CONFIG_S_NEEDS_RESET (VIRTIO 1.2 §2.1.2) and the front-end gets a
CONFIG_CHANGE_MSG, the configuration change notification that goes with it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

from ..devices.base import Device
from ..errors import InspectorError, RequestRefused
from ..spec.vhost import VERSION, VHOST_IOTLB_MISS
from ..spec.virtio import VIRTIO_CONFIG_S_NEEDS_RESET
from .protocol import BackendRequest, ConfigPayload, IotlbMsg, ProtocolFeature, ProtocolViolation, pack_u64
from .transport import Message, encode_message, send_message
from .vrings import close_fd


class DeviceControl:
    """Status, config and back-end channel of a connection to ``device``.
    ``negotiated()`` returns the connection's protocol features.

    ``device_status``: the driver's status byte (SET_STATUS, without
    NEEDS_RESET); ``needs_reset``: why the device needs a reset (a queue
    broke), or None; ``backend_req_fd``: the SET_BACKEND_REQ_FD socket, or
    None (owned: closed by close())."""

    def __init__(self, device: Device, negotiated: Callable[[], int], logger: logging.Logger,
                 conn_id: int = 0):
        self.device = device
        self.negotiated = negotiated
        self.logger = logger
        self.id = conn_id
        self.device_status = 0
        self.needs_reset: str | None = None
        self.backend_req_fd: int | None = None
        self.closed = False
        self._send_lock = threading.Lock()   # data path threads send misses on the channel too

    # --- status ---------------------------------------------------------------
    def _check_status_negotiated(self, name: str) -> None:
        features = self.negotiated()
        if not features & ProtocolFeature.STATUS:
            raise ProtocolViolation(name, "protocol_features", features,
                                    "STATUS (bit 16) was not negotiated")

    def set_status(self, msg: Message, status: int) -> None:
        """The driver's device status (VIRTIO 1.2 §2.1); 0 is a reset, which
        clears NEEDS_RESET (the rings are set up again before they restart)."""
        self._check_status_negotiated(msg.name)
        if status > 0xFF:
            raise ProtocolViolation(msg.name, "status", status, "the device status is 8 bits (VIRTIO 1.2 §2.1)")
        self.device_status = status & ~VIRTIO_CONFIG_S_NEEDS_RESET
        if status == 0:
            self.needs_reset = None

    def get_status(self, msg: Message, _: None) -> bytes:
        self._check_status_negotiated(msg.name)
        return pack_u64(self.device_status | (VIRTIO_CONFIG_S_NEEDS_RESET if self.needs_reset else 0))

    def reset(self) -> None:
        """RESET_OWNER / RESET_DEVICE: status 0, no reset needed any more."""
        self.device_status, self.needs_reset = 0, None

    def needs_reset_hook(self, reason: str) -> None:
        """The device's ``on_needs_reset`` (any thread): a queue broke.
        GET_STATUS shows DEVICE_NEEDS_RESET from now on and, with
        BACKEND_REQ and CONFIG, the front-end gets a CONFIG_CHANGE_MSG."""
        first = self.needs_reset is None
        self.needs_reset = reason
        if first and not self.closed:
            try:
                self.send_config_change()
            except OSError:
                pass

    # --- config space -------------------------------------------------------------
    def get_config(self, msg: Message, cfg: ConfigPayload) -> bytes:
        try:
            data = bytes(self.device.get_config(cfg.offset, cfg.size))
            if len(data) != cfg.size:
                raise InspectorError(f"device returned {len(data)} bytes for {cfg.size}")
        except Exception as e:
            # libvhost-user: a reply of size 0 tells the front-end it failed.
            self.logger.warning("connection %d: GET_CONFIG offset=%d size=%d failed: %s",
                                self.id, cfg.offset, cfg.size, e)
            return b""
        return ConfigPayload(cfg.offset, cfg.size, cfg.flags, data).pack()

    def set_config(self, msg: Message, cfg: ConfigPayload) -> None:
        """SET_CONFIG; RequestRefused (a non-zero REPLY_ACK, the connection
        lives on) when the device refuses the write."""
        try:
            self.device.set_config(cfg.offset, cfg.payload)
        except Exception as e:
            raise RequestRefused(f"SET_CONFIG: offset={cfg.offset} size={cfg.size}: "
                                 f"the device refused: {e}") from None

    # --- back-end → front-end -----------------------------------------------------
    def set_backend_req_fd(self, msg: Message, _: None) -> None:
        with self._send_lock:
            close_fd(self.backend_req_fd)
            self.backend_req_fd = msg.take_fd()

    def send_config_change(self) -> bool:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG on
        the SET_BACKEND_REQ_FD channel); False when there is no channel or
        CONFIG was not negotiated."""
        if self.backend_req_fd is None or not self.negotiated() & ProtocolFeature.CONFIG:
            return False
        s = socket.socket(fileno=os.dup(self.backend_req_fd))
        try:
            send_message(s, BackendRequest.CONFIG_CHANGE_MSG, ConfigPayload(0, 0, 0).pack())
        except OSError:
            return False
        finally:
            s.close()
        return True

    def send_iotlb_miss(self, iova: int, perm: int) -> bool:
        """Ask the front-end for the translation of ``iova`` (BACKEND_IOTLB_MSG,
        VHOST_IOTLB_MISS, ``perm`` VHOST_ACCESS_*; vhost-user "IOMMU
        support"). Called from the data path threads: never blocks (a full
        channel loses the miss, which is asked again). False when there is
        no channel, BACKEND_REQ was not negotiated or the send failed."""
        if self.closed or self.backend_req_fd is None or not self.negotiated() & ProtocolFeature.BACKEND_REQ:
            return False
        payload = IotlbMsg(iova, 0, 0, perm, VHOST_IOTLB_MISS).pack()
        with self._send_lock:
            fd = self.backend_req_fd
            if fd is None:
                return False
            s = socket.socket(fileno=os.dup(fd))
            try:
                data = encode_message(BackendRequest.IOTLB_MSG, payload, flags=VERSION)
                sent = s.send(data, socket.MSG_DONTWAIT)
                if sent < len(data):   # 44 bytes: practically never; finish it rather than cut the stream
                    s.sendall(data[sent:])
            except OSError as e:
                self.logger.info("connection %d: IOTLB miss for %#x not sent: %s", self.id, iova, e)
                return False
            finally:
                s.close()
        return True

    def close(self) -> None:
        self.closed = True
        with self._send_lock:
            self.backend_req_fd = close_fd(self.backend_req_fd)
