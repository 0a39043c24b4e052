"""vhost-user plumbing of packed rings (VIRTIO_F_RING_PACKED acked): ring
sizes, alignment and areas (VIRTIO 1.2 §2.8.10.1), SET/GET_VRING_BASE in the
vhost-user spec's packed form, and the net device's offer (``serve net
--no-packed``). End to end against a real front-end: tests/integration/test_dpdk.py
(testpmd ``packed_vq=1``).
"""

from __future__ import annotations

import logging

import pytest

from inspector.cli import build_parser
from inspector.devices.base import Device, VringConfig
from inspector.devices.net import NetDevice
from inspector.memory import GuestMemory
from inspector.spec.virtio import VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED, has_feature
from inspector.tools.serve import make_server
from inspector.vhost_user.memory_table import MappedMemory
from inspector.vhost_user.protocol import ProtocolViolation, Request, VringAddr, VringState
from inspector.vhost_user.transport import Message
from inspector.vhost_user.vrings import Vrings, check_ring_mapped, check_ring_size

PACKED = 1 << VIRTIO_F_RING_PACKED
UVA = 0x7F0000000000


class RecordingDevice(Device):
    name = "rec"
    num_queues = 2

    def __init__(self):
        self.started: dict[int, VringConfig] = {}
        self.base = 0

    def start_queue(self, vring: VringConfig, mem: GuestMemory) -> None:
        self.started[vring.index] = vring

    def stop_queue(self, index: int) -> int:
        self.started.pop(index)
        return self.base


def _msg(req: Request) -> Message:
    return Message(int(req), 0, 0, b"")


def _vrings(features: int) -> tuple[Vrings, RecordingDevice]:
    dev = RecordingDevice()
    memory = MappedMemory(logging.getLogger("test"))
    memory.mem = GuestMemory()
    memory.mem.add(0, bytearray(1 << 16), uva=UVA)
    return Vrings(dev, memory, logging.getLogger("test"), features=lambda: features), dev


def test_packed_sizes_need_not_be_a_power_of_two():
    check_ring_size("SET_VRING_NUM", "num", 100, packed=True)
    with pytest.raises(ProtocolViolation, match="power of two"):
        check_ring_size("SET_VRING_NUM", "num", 100)
    with pytest.raises(ProtocolViolation, match=r"1 to 32768 \(VIRTIO 1.2 §2.8.10.1\)"):
        check_ring_size("SET_VRING_NUM", "num", 0, packed=True)


def test_packed_areas_are_16n_4_4_and_aligned_4():
    rings, _ = _vrings(PACKED)
    rings.set_num(_msg(Request.SET_VRING_NUM), VringState(0, 100))
    with pytest.raises(ProtocolViolation, match=r"4-byte aligned \(VIRTIO 1.2 §2.8.10.1\)"):
        rings.set_addr(_msg(Request.SET_VRING_ADDR), VringAddr(0, 0, UVA, UVA + 0x1000, UVA + 0x1002, 0))
    # the event suppression areas fit in the last 8 bytes of memory: 4 bytes each
    rings.set_addr(_msg(Request.SET_VRING_ADDR), VringAddr(0, 0, UVA, UVA + 0xFFFC, UVA + 0xFFF8, 0))
    v = rings.configs[0]
    assert v.packed
    check_ring_mapped("SET_VRING_ADDR", v, rings.memory.mem)
    v.packed = False  # as a split ring the same areas run past the end of memory
    with pytest.raises(ProtocolViolation, match="not mapped"):
        check_ring_mapped("SET_VRING_ADDR", v, rings.memory.mem)


def test_set_base_packed_form_and_get_base_answers_32_bits():
    rings, dev = _vrings(PACKED)
    rings.set_num(_msg(Request.SET_VRING_NUM), VringState(0, 64))
    base = 5 | 1 << 15 | 3 << 16 | 0 << 31
    rings.set_base(_msg(Request.SET_VRING_BASE), VringState(0, base))
    assert rings.configs[0].base == base
    with pytest.raises(ProtocolViolation, match="last avail index .* 70 is not below its size 64"):
        rings.set_base(_msg(Request.SET_VRING_BASE), VringState(0, 70))
    with pytest.raises(ProtocolViolation, match="used index .* 65 is not below its size 64"):
        rings.set_base(_msg(Request.SET_VRING_BASE), VringState(0, 65 << 16))
    # a started packed ring hands back the device's 32-bit base
    rings.set_addr(_msg(Request.SET_VRING_ADDR), VringAddr(0, 0, UVA, UVA + 0x400, UVA + 0x404, 0))
    rings._polling[0] = True
    rings.configs[0].enabled = True
    rings.maybe_start("SET_VRING_ENABLE", 0)
    assert 0 in dev.started
    dev.base = 0x8001_8002
    reply = rings.get_base(_msg(Request.GET_VRING_BASE), VringState(0, 0))
    assert VringState.unpack("GET_VRING_BASE", reply).num == 0x8001_8002


def test_split_base_stays_16_bits():
    rings, _ = _vrings(0)
    with pytest.raises(ProtocolViolation, match="16 bits"):
        rings.set_base(_msg(Request.SET_VRING_BASE), VringState(0, 1 << 16))


def test_net_offers_packed_and_in_order_unless_told_not_to():
    dev = NetDevice()
    f = dev.features()
    assert has_feature(f, VIRTIO_F_RING_PACKED) and has_feature(f, VIRTIO_F_IN_ORDER)
    dev.set_features(f)
    assert dev.ring_packed
    dev.set_features(f & ~PACKED)
    assert not dev.ring_packed
    assert not has_feature(NetDevice(packed=False).features(), VIRTIO_F_RING_PACKED)


@pytest.mark.parametrize("argv, offered", [([], True), (["--no-packed"], False)])
def test_serve_no_packed(tmp_path, argv, offered):
    args = build_parser().parse_args(["serve", "net", "--socket", str(tmp_path / "s"), *argv])
    assert args.packed is offered
    server = make_server(args)
    try:
        assert has_feature(server.device_factory().features(), VIRTIO_F_RING_PACKED) is offered
    finally:
        server.stop()
