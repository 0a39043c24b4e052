"""Where a packed vring resumes (inspector/vhost_user/packed_resume.py): the
SET_VRING_BASE given is kept when the ring agrees with it, else the vring
resumes at the device's used position the ring shows (VIRTIO 1.2 §2.8.9:
one used descriptor per buffer, written at next_used, the chain's other
slots skipped). Rings built by tests/support/packed_ringbuilder.py (the
driver writes the buffer id in every descriptor, as Linux does).
"""

from __future__ import annotations

import logging

import pytest

from inspector.datapath.packed_queue import decode_vring_base, encode_vring_base
from inspector.vhost_user.memory_table import MappedMemory
from inspector.vhost_user.packed_resume import resume_packed
from inspector.vhost_user.protocol import VRING_NOFD_MASK, Request, VringAddr, VringState
from inspector.vhost_user.transport import Message
from inspector.vhost_user.vrings import Vrings
from inspector.spec.virtio import VIRTIO_F_RING_PACKED
from tests.support.packed_ringbuilder import PackedRingBuilder
from tests.unit.test_vhost_user_packed import RecordingDevice


def _device_base(b: PackedRingBuilder) -> int:
    """The base a back-end that kept its positions hands back (GET_VRING_BASE)."""
    return encode_vring_base(b.last_avail, b.last_avail_wrap, b.next_used, b.used_wrap)


def _resume(b: PackedRingBuilder, base: int):
    return resume_packed(b.mem, b.size, *b.addrs, base)


def _serve(b: PackedRingBuilder, n: int, ids=None) -> list[int]:
    """The device takes the next ``n`` buffers (in ring order) and returns
    them in order, or as ``ids`` (out of order)."""
    taken = list(b.ndescs)[:n]
    b.device_take(sum(b.ndescs[i] for i in taken))
    b.device_use([(i, 0) for i in (ids if ids is not None else taken)])
    return taken


def _add(b: PackedRingBuilder, n: int, spec=((64, False),)) -> list[int]:
    """The driver makes ``n`` chains of ``spec`` available; their ids."""
    return [b.add_chain(spec) for _ in range(n)]


STALE = encode_vring_base(0, 1, 0, 1)   # what QEMU 7.2 sends after a crash: the first start's


def _assert_kept(b: PackedRingBuilder, base: int) -> None:
    r = _resume(b, base)
    assert not r.recovered and r.base == base and r.reason == "", r


def _assert_recovered(b: PackedRingBuilder, base: int, at: tuple[int, int], why: str) -> None:
    r = _resume(b, base)
    assert r.recovered, r
    assert decode_vring_base(r.base) == (*at, *at), r
    assert r.ring_used == at
    assert why in r.reason, r.reason
    assert f"next_used {decode_vring_base(base)[2:]}".replace(" ", "") in r.message().replace(" ", "")


def test_fresh_ring_keeps_initial_base():
    b = PackedRingBuilder(8)
    _assert_kept(b, STALE)                       # nothing written yet (all flags 0)
    _add(b, 5)
    _assert_kept(b, STALE)                       # buffers made available, none taken
    r = _resume(b, STALE)
    assert r.outstanding == 5 and r.next_avail == (5, 1)


def test_graceful_restart_keeps_the_devices_base():
    b = PackedRingBuilder(8)
    _add(b, 6)
    _serve(b, 4)
    _assert_kept(b, _device_base(b))
    b.device_take(1)                             # one taken, not returned: last_avail ahead of next_used
    _assert_kept(b, _device_base(b))
    _serve(b, 0)
    _add(b, 2)
    b.device_take(-1)
    _serve(b, 4)                                 # everything returned: the ring is empty
    assert b.num_free == 8
    _assert_kept(b, _device_base(b))
    # the 16-bit form (DPDK's vhost library): next_used = last_avail
    _assert_kept(b, b.next_used | b.used_wrap << 15)


def test_crash_with_stale_base_resumes_after_the_last_used_descriptor():
    # QEMU's reconnect case: RX stocked with single-descriptor buffers, the
    # device returned 10 and took 3 more when it was killed.
    b = PackedRingBuilder(16)
    _add(b, 16, ((1526, True),))
    _serve(b, 10)
    b.device_take(3)
    _assert_recovered(b, STALE, (10, 1), "desc[9] (wrap 1)")
    assert _resume(b, STALE).outstanding == 6    # 3 taken and 3 not: all taken again
    # a last_avail the ring cannot have: beyond the driver's next_avail
    _assert_recovered(b, encode_vring_base(3, 0, 10, 1), (10, 1), "beyond the driver's next_avail")


def test_full_ring_stale_base_inside_outstanding_buffers():
    # Every slot outstanding: no used descriptor anywhere, the slot at the
    # stale base IS available for its wrap counter, yet the device is a
    # round behind it.
    b = PackedRingBuilder(8)
    _add(b, 8)
    _serve(b, 8)
    _add(b, 8)
    _serve(b, 3)
    _add(b, 3)
    assert (b.next_used, b.used_wrap) == (3, 0) and b.num_free == 0
    _assert_kept(b, _device_base(b))
    _assert_recovered(b, STALE, (3, 0), "5 slot(s) from (3,0) to it are buffers the driver made available")


def test_wraps_many_rounds():
    b = PackedRingBuilder(5)                     # not a power of two
    for _ in range(18):                          # three rounds and 3 slots
        b.add_chain()
        _serve(b, 1)
    b.add_chain()
    b.add_chain()
    assert (b.next_used, b.used_wrap) == (3, 0)
    _assert_kept(b, _device_base(b))
    for given in (STALE, encode_vring_base(2, 0, 2, 0), encode_vring_base(3, 1, 3, 1)):
        r = _resume(b, given)
        assert r.recovered and decode_vring_base(r.base) == (3, 0, 3, 0), (given, r)


def test_multi_slot_chains_in_order():
    b = PackedRingBuilder(8)
    b.add_chain(((64, False), (64, False), (64, False)))
    b.add_chain(((64, False), (64, True)))
    b.add_chain()
    _serve(b, 2)                                 # used at slot 0 (3 slots) and slot 3 (2 slots)
    assert (b.next_used, b.used_wrap) == (5, 1)
    # the given base after the last returned chain's tail (slot 4) agrees with the ring
    _assert_kept(b, _device_base(b))
    # a stale one: the estimate stops after the last used descriptor (slot 3):
    # slot 4, the tail of the chain returned there, is taken again (documented)
    _assert_recovered(b, STALE, (4, 1), "desc[3] (wrap 1)")
    # a base past the tail, over a chain nobody returned, is not kept
    _assert_recovered(b, encode_vring_base(6, 1, 6, 1), (4, 1), "not the tail of a returned chain")


def test_multi_slot_chain_crossing_the_end_of_the_ring():
    b = PackedRingBuilder(6)
    _add(b, 4)
    _serve(b, 4)
    b.add_chain(((64, False), (64, False), (64, False)))   # slots 4, 5, 0 (wrap 0)
    _serve(b, 1)
    assert (b.next_used, b.used_wrap) == (1, 0)
    _assert_kept(b, _device_base(b))
    _assert_recovered(b, STALE, (5, 1), "not within a round behind")


def test_indirect_chains_are_one_slot_exact():
    b = PackedRingBuilder(8)
    for _ in range(5):
        b.add_indirect_chain()
    _serve(b, 3)
    _assert_kept(b, _device_base(b))
    _assert_recovered(b, STALE, (3, 1), "desc[2] (wrap 1)")


def test_out_of_order_single_slot_chains_exact():
    b = PackedRingBuilder(8)
    ids = _add(b, 6)
    b.device_take(4)
    b.device_use([(ids[2], 0), (ids[0], 0), (ids[3], 0)])   # ids[1] taken, not returned
    assert (b.next_used, b.used_wrap) == (3, 1)
    _assert_kept(b, _device_base(b))
    _assert_recovered(b, STALE, (3, 1), "desc[2] (wrap 1)")


def test_out_of_order_multi_slot_chains_are_an_estimate():
    # A (3 slots at 0-2) and B (slot 3) returned B first: used B at slot 0,
    # used A at slot 1, slots 2 and 3 skipped (they look available).
    b = PackedRingBuilder(8)
    a = b.add_chain(((64, False), (64, False), (64, False)))
    bb = b.add_chain()
    b.add_chain()
    b.device_take(4)
    b.device_use([(bb, 0), (a, 0)])
    assert (b.next_used, b.used_wrap) == (4, 1)
    r = _resume(b, _device_base(b))
    # the flags cannot tell slots 2-3 from outstanding buffers: resumed at 2
    assert r.recovered and r.ring_used == (2, 1), r


def test_linux_reuses_a_returned_id_at_the_next_slot():
    # Linux frees ids last in, first out: the chain after a returned one
    # carries its id. One slot each: the stale base is recovered exactly and
    # the new chain is outstanding, not taken for the returned one's tail.
    b = PackedRingBuilder(8)
    x = b.add_chain()
    _serve(b, 1)
    b.free_ids.remove(x)
    b._write_chain([(b.alloc(64), 64, 0)], x)
    assert b.read_desc(1)[2] == x
    _assert_recovered(b, STALE, (1, 1), "desc[0] (wrap 1)")
    _assert_kept(b, _device_base(b))
    # The ambiguity the module docstring names: a base one slot further, as
    # if the returned chain had a tail at slot 1, is kept (a stale base lands
    # there only after 2 * size - 1 slots of progress since it was current).
    _assert_kept(b, encode_vring_base(2, 1, 2, 1))


class _Logs(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


MSG = Message(int(Request.SET_VRING_NUM), 0, 0, b"")


def _vrings_on(b: PackedRingBuilder, name: str) -> tuple[Vrings, RecordingDevice, _Logs]:
    """Vrings of a recording device over ``b``'s memory (uva = gpa), packed
    acked, vring 0 of size ``b.size`` at ``b``'s ring, polled; not started."""
    logger = logging.getLogger(f"test.packed_resume.{name}")
    logs = _Logs()
    logger.addHandler(logs)
    dev = RecordingDevice()
    memory = MappedMemory(logger)
    memory.mem = b.mem
    rings = Vrings(dev, memory, logger, features=lambda: 1 << VIRTIO_F_RING_PACKED)
    rings.set_num(MSG, VringState(0, b.size))
    rings.set_addr(MSG, VringAddr(0, 0, *b.addrs, 0))
    rings.set_kick(MSG, VRING_NOFD_MASK)
    rings.configs[0].enabled = True
    return rings, dev, logs


@pytest.mark.parametrize("stale", [True, False])
def test_vrings_start_checks_the_packed_base(stale):
    b = PackedRingBuilder(16)
    _add(b, 16, ((1526, True),))
    _serve(b, 10)
    rings, dev, logs = _vrings_on(b, str(stale))
    rings.set_base(MSG, VringState(0, STALE if stale else _device_base(b)))   # starts it
    started = dev.started[0]
    warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
    assert decode_vring_base(started.base) == (10, 1, 10, 1)
    if stale:
        assert len(warnings) == 1, warnings
        assert "vring 0 (packed): SET_VRING_BASE gave last_avail (0,1) next_used (0,1)" in warnings[0]
        assert "resuming at last_avail = next_used = (10,1)" in warnings[0]
    else:
        assert warnings == []


def test_resume_never_writes_guest_memory():
    b = PackedRingBuilder(8)
    _add(b, 8)
    _serve(b, 5)
    before = bytes(b.ring_buf), bytes(b.data_buf)
    _resume(b, STALE)
    assert (bytes(b.ring_buf), bytes(b.data_buf)) == before


def test_vrings_keep_their_own_base_across_a_restart():
    # The ring of test_out_of_order_multi_slot_chains_are_an_estimate: the
    # flags alone would resume at slot 2; the base this connection's device
    # handed back when it stopped is its own knowledge, and kept.
    b = PackedRingBuilder(8)
    a = b.add_chain(((64, False), (64, False), (64, False)))
    bb = b.add_chain()
    b.device_take(4)
    b.device_use([(bb, 0), (a, 0)])
    rings, dev, logs = _vrings_on(b, "own")
    dev.base = _device_base(b)
    rings.maybe_start("SET_VRING_ENABLE", 0)            # (0,1,0,1) given: recovered to (2,1)
    assert decode_vring_base(dev.started[0].base) == (2, 1, 2, 1)
    assert len(logs.records) == 1
    rings.get_base(MSG, VringState(0, 0))               # stops: the device says (4,1,4,1)
    rings.set_num(MSG, VringState(0, 8))
    rings.set_base(MSG, VringState(0, dev.base))        # as QEMU hands it back
    rings.set_addr(MSG, VringAddr(0, 0, *b.addrs, 0))
    rings.set_kick(MSG, VRING_NOFD_MASK)                # starts it
    assert dev.started[0].base == dev.base and len(logs.records) == 1
