"""Which side holds a queue's buffers while nothing happens, from the device
type and the queue index (VIRTIO 1.2 §5, each device's "Virtqueues").

- ``FILL``: the driver posts buffers for the device to fill when it has
  something (net receiveq, console receiveq, rng requestq, balloon statsq,
  scsi eventq, vsock rx/event, input eventq, iommu eventq). Buffers waiting
  there are normal.
- ``CONSUME``: the driver hands buffers over for the device to consume and
  return (net transmitq and controlq, blk requestq, scsi controlq/requestq,
  9p, console transmitq, fs, gpu, crypto, balloon inflate/deflate). Buffers
  waiting there must be taken and returned.
- ``UNKNOWN``: a device type vqscope does not know; rules that depend on the
  role say "cannot tell".
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A queue's role (module docstring)."""

    FILL = "fill"
    CONSUME = "consume"
    UNKNOWN = "unknown"


#: Device names as sources spell them (QEMU's QOM names, vqscope's) -> §5 type names.
_ALIASES = {"virtio-net": "net", "virtio-blk": "block", "blk": "block", "virtio-serial": "console",
            "serial": "console", "virtio-console": "console", "virtio-scsi": "scsi", "virtio-9p": "9p",
            "virtio-rng": "rng", "virtio-balloon": "balloon", "virtio-vsock": "vsock",
            "vhost-vsock": "vsock", "vhost-user-vsock": "vsock", "virtio-fs": "fs",
            "vhost-user-fs": "fs", "virtio-gpu": "gpu", "virtio-input": "input",
            "virtio-crypto": "crypto", "virtio-iommu": "iommu", "virtio-mem": "mem",
            "vhost-user-blk": "block", "vhost-user-net": "net"}


def device_type_of(name: str | None) -> str | None:
    """The §5 device type name (``net``, ``block`` ...) of a device name as a
    source gives it (``virtio-net``, ``virtio-blk``, ``net``), or None."""
    if not name:
        return None
    return _ALIASES.get(name, name)


def role_of(device_type: str | None, index: int, num_queues: int | None = None) -> Role:
    """The role of queue ``index`` of a device of ``device_type`` (§5 name or
    an alias, see :func:`device_type_of`); ``num_queues``: the device's queue
    count where known (a net device with an odd count has its controlq last,
    §5.1.2). UNKNOWN for an unknown type."""
    t = device_type_of(device_type)
    F, C = Role.FILL, Role.CONSUME
    if t == "net":
        if num_queues is not None and num_queues >= 3 and num_queues % 2 == 1 and index == num_queues - 1:
            return C                             # controlq (§5.1.2)
        return F if index % 2 == 0 else C        # receiveqN, transmitqN
    if t == "console":                           # receiveq/transmitq, control receiveq/transmitq, ports
        return F if index % 2 == 0 else C
    if t in ("block", "9p", "fs", "gpu", "crypto", "mem", "sound"):
        return C
    if t == "scsi":                              # controlq, eventq, requestq...
        return F if index == 1 else C
    if t == "rng":
        return F
    if t == "balloon":                           # inflateq, deflateq, statsq, free_page_vq, reporting_vq
        return F if index == 2 else C
    if t == "vsock":                             # rx, tx, event
        return C if index == 1 else F
    if t == "input":                             # eventq, statusq
        return F if index == 0 else C
    if t == "iommu":                             # requestq, eventq
        return F if index == 1 else C
    return Role.UNKNOWN
