"""inspector.ring.remote.snapshot_remote_packed over this process's own
memory (process_vm_readv of our pid): a packed ring built with
tests/support/packed_ringbuilder.py is read back through the RAM map and
equals the local decode; positions older than the ring fall back to the
flags; indirect tables outside the ring areas are read in the second pass."""

from __future__ import annotations

import ctypes
import os

import pytest

from inspector.errors import RingError
from inspector.memory.process import ProcessMemory, RamRange
from inspector.ring import decoder, reference_packed
from inspector.ring.remote import snapshot_remote_packed
from tests.support.packed_ringbuilder import PackedRingBuilder

IMPLS = {"c": decoder, "python": reference_packed}


def hva(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


@pytest.fixture
def pmem():
    m = ProcessMemory(os.getpid())
    yield m
    m.close()


def ram_of(rb: PackedRingBuilder) -> list[RamRange]:
    return [RamRange(gpa=r.gpa, size=r.size, hva=hva(r.buf)) for r in rb.mem.regions]


@pytest.mark.parametrize("name", sorted(IMPLS))
@pytest.mark.parametrize("mode", ["device", "derived", "flags"])
def test_remote_equals_local(pmem, name, mode):
    impl = IMPLS[name]
    rb = PackedRingBuilder(16)
    ids = [rb.add_chain([(64, False), (64, True)]), rb.add_indirect_chain([(32, False)] * 3), rb.add_chain()]
    rb.device_take(3)
    rb.device_use([(ids[0], 64)])
    rb.add_indirect_chain()
    local = rb.snapshot(impl, mode)
    remote = snapshot_remote_packed(pmem, ram_of(rb), rb.size, *rb.addrs, impl=impl, **rb.positions(mode))
    assert remote.as_dict() == local.as_dict()
    assert not any(a.kind.value == "indirect_not_read" for a in remote.anomalies)
    assert remote.positions == mode


def test_positions_older_than_the_ring_fall_back_to_flags(pmem):
    rb = PackedRingBuilder(8)
    a, b = rb.add_chain(), rb.add_chain()
    rb.device_take(2)
    old = rb.positions("derived")
    rb.device_use([(a, 0), (b, 0)])     # after "QMP" answered
    s = snapshot_remote_packed(pmem, ram_of(rb), 8, *rb.addrs, **old)
    assert s.positions == "flags" and s.last_avail_idx is None and s.anomalies == []
    assert (s.next_used, s.next_avail, s.inflight) == (2, 2, 0)


def test_area_outside_ram(pmem):
    rb = PackedRingBuilder(8)
    with pytest.raises(RingError, match="driver area"):
        snapshot_remote_packed(pmem, ram_of(rb), 8, rb.desc, 0xDEAD_0000, rb.device_event)
