"""Numbers from the specifications, each defined once, under the name the
spec and the kernel give it: :mod:`.virtio` (VIRTIO 1.2: feature bits, ring
flags, status bits, queue-size limits, device ids), :mod:`.vhost` (the
vhost-user protocol and the kernel's ``linux/vhost.h`` ioctls) and
:mod:`.tun` (``linux/if_tun.h`` and the interface ioctls a tap needs).

Feature names are bit numbers (``VIRTIO_RING_F_EVENT_IDX = 29``, as in
``include/uapi/linux/virtio_ring.h``); ring and descriptor flags are masks
(``VRING_DESC_F_NEXT = 1``, as in the spec's structures). A name is never
both. Nothing here imports anything of vqscope's.
"""
