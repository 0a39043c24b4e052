"""Untrusted plain state of a QEMU's virtio devices and queues, as QMP's
``x-query-virtio-status`` and the per-queue commands report it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...spec import vhost, virtio

#: Feature names as QEMU 7.2's x-query-virtio-status prints them ("NAME:
#: description") -> bit (linux/virtio_*.h, linux/vhost.h). Names are unique
#: across device types; bits are not. Anything QEMU does not name is in
#: ``unknown-dev-features`` already, as bits.
FEATURE_BITS: dict[str, int] = {
    **virtio.FEATURE_BITS,
    "VHOST_F_LOG_ALL": vhost.VHOST_F_LOG_ALL,
    "VHOST_USER_F_PROTOCOL_FEATURES": vhost.VHOST_USER_F_PROTOCOL_FEATURES,
}


def features_mask(decoded: dict | None) -> tuple[int, list[str]]:
    """A VirtioDeviceFeatures object of x-query-virtio-status (``transports``
    and ``dev-features``: lists of "NAME: description"; ``unknown-dev-features``:
    an int) as a bit mask, plus the names this table does not know."""
    if not decoded:
        return 0, []
    mask = int(decoded.get("unknown-dev-features", 0))
    unknown = []
    for s in [*decoded.get("transports", []), *decoded.get("dev-features", [])]:
        name = s.split(":", 1)[0].strip()
        bit = FEATURE_BITS.get(name)
        if bit is None:
            unknown.append(name)
        else:
            mask |= 1 << bit
    return mask, unknown


def short_name(path: str, name: str) -> str:
    """The device's name in the snapshot: the id the user gave it
    (``/machine/peripheral/ID/virtio-backend``), else the virtio name and the
    anonymous path's tail (``virtio-serial:device[3]``)."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[-1] == "virtio-backend":
        parts = parts[:-1]
    if len(parts) >= 3 and parts[-2] == "peripheral":
        return parts[-1]
    return f"{name}:{parts[-1]}" if parts else name


@dataclass
class DeviceState:
    """What x-query-virtio and x-query-virtio-status say about a device."""

    path: str
    name: str
    device: str
    vhost_started: bool
    features: int
    num_vqs: int
    broken: bool
    unknown_features: list[str] = field(default_factory=list)
    vhost_nvqs: int | None = None
    vhost_vq_index: int | None = None
    statuses: tuple[str, ...] = ()

    @property
    def signature(self) -> tuple:
        """What, when it changes, makes every cached queue of the device
        stale (a reset, a driver (re)load, vhost starting or stopping)."""
        return (self.vhost_started, self.features, self.num_vqs, self.statuses)


@dataclass
class QueueState:
    """Untrusted plain state of one queue as QMP reported it."""

    index: int
    num: int
    desc: int            # guest-physical
    avail: int
    used: int
    vhost: bool
    last_avail_idx: int | None = None     # QEMU's, for a queue it services
    shadow_avail_idx: int | None = None   # avail->idx as QEMU last read it, likewise
    qemu_used_idx: int | None = None
    signalled_used: int | None = None
    inuse: int | None = None              # buffers QEMU popped and has not returned, likewise
    desc_hva: int | None = None
    avail_hva: int | None = None
    used_hva: int | None = None
    kick: int | None = None
    call: int | None = None

    def qemu_dict(self, path: str) -> dict[str, Any]:
        d: dict[str, Any] = {"path": path, "vhost": self.vhost,
                             "desc": self.desc, "avail": self.avail, "used": self.used}
        if self.vhost:
            d.update(desc_hva=self.desc_hva, avail_hva=self.avail_hva, used_hva=self.used_hva,
                     kick=self.kick, call=self.call)
        else:
            d.update(used_idx=self.qemu_used_idx, signalled_used=self.signalled_used)
        return d


def device_state(path: str, name: str, st: dict) -> DeviceState:
    """Plain state from an x-query-virtio-status reply."""
    features, unknown = features_mask(st.get("guest-features"))
    vdev = st.get("vhost-dev") or {}
    return DeviceState(path=path, name=name, device=short_name(path, name),
                       vhost_started=bool(st.get("vhost-started")), features=features,
                       num_vqs=int(st.get("num-vqs", 0)), broken=bool(st.get("broken")),
                       unknown_features=unknown, vhost_nvqs=vdev.get("nvqs"),
                       vhost_vq_index=vdev.get("vq-index"),
                       statuses=tuple((st.get("status") or {}).get("statuses", ())))


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def queue_state(dev: DeviceState, index: int, reply: dict) -> QueueState | None:
    """Plain state from the reply of :func:`queue_command` for ``dev``;
    None when the queue is not set up (size 0 or no addresses)."""
    if dev.vhost_started:
        q = QueueState(index=index, num=int(reply["num"]), desc=int(reply["desc-phys"]),
                       avail=int(reply["avail-phys"]), used=int(reply["used-phys"]), vhost=True,
                       desc_hva=int(reply["desc"]), avail_hva=int(reply["avail"]),
                       used_hva=int(reply["used"]), kick=reply.get("kick"), call=reply.get("call"))
    else:
        q = QueueState(index=index, num=int(reply["vring-num"]), desc=int(reply["vring-desc"]),
                       avail=int(reply["vring-avail"]), used=int(reply["vring-used"]), vhost=False,
                       last_avail_idx=int(reply["last-avail-idx"]), qemu_used_idx=int(reply["used-idx"]),
                       signalled_used=reply.get("signalled-used"), inuse=_opt_int(reply.get("inuse")),
                       shadow_avail_idx=_opt_int(reply.get("shadow-avail-idx")))
    if q.num == 0 or not (q.desc and q.avail and q.used):
        return None
    return q
