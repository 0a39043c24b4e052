"""virtio-blk requests decoded from in-flight chains (VIRTIO 1.2 §5.2.6):
real requests written by the driver-side rings (split and packed, direct and
indirect, the header split across descriptors), hostile ones decoding as
``malformed`` naming the field, and the ``request`` member of the Snapshot
JSON through the codec."""

from __future__ import annotations

import ctypes
import os
import re
import struct

import pytest

from inspector.devices.base import QueueStats, VringConfig
from inspector.errors import SnapshotFormatError
from inspector.introspect.snapshot import queue_snapshot
from inspector.memory import GuestMemory
from inspector.memory.process import ProcessMemory, RamRange
from inspector.ring import decoder
from inspector.ring.blk_request import (BlkRequest, attach_requests, decode_requests, memory_reader,
                                        process_reader, request_from_dict)
from inspector.ring.driver import DriverRing
from inspector.ring.driver_packed import PackedDriverRing
from inspector.snapshot import codec
from inspector.snapshot.model import QueueEntry, Snapshot
from inspector.sources.qemu import DeviceState, QemuSource, QueueState
from inspector.spec.virtio import (VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                   VIRTIO_F_VERSION_1)

RING, DATA = 0x10000, 0x100000
SIZE = 16


def outhdr(t: int, sector: int) -> bytes:
    """struct virtio_blk_outhdr: le32 type, le32 reserved, le64 sector."""
    return struct.pack("<IIQ", t, 0, sector)


class Guest:
    """Guest memory with a ring (split or packed) and a data area the
    requests' buffers are carved from."""

    def __init__(self, packed: bool = False):
        self.mem = GuestMemory()
        self.mem.add(RING, bytearray(0x8000))
        self.data = bytearray(0x40000)
        self.mem.add(DATA, self.data)
        self.cursor = DATA
        self.packed = packed
        self.ring = PackedDriverRing(self.mem, RING, SIZE) if packed else DriverRing(self.mem, RING, SIZE)

    def buf(self, content: bytes | int) -> int:
        n = content if isinstance(content, int) else len(content)
        gpa = self.cursor
        self.cursor += (max(n, 1) + 15) & ~15
        if not isinstance(content, int):
            off = gpa - DATA
            self.data[off:off + n] = content
        return gpa

    def request(self, t: int, sector: int, data_len: int = 0, *, indirect: bool = False,
                split_header: bool = False) -> int:
        """A well-formed request: header (in two descriptors with
        ``split_header``), data (device-readable for OUT), status byte."""
        hdr = outhdr(t, sector)
        bufs = ([(self.buf(hdr[:6]), 6, False), (self.buf(hdr[6:]), 10, False)] if split_header
                else [(self.buf(hdr), 16, False)])
        if data_len:
            bufs.append((self.buf(data_len), data_len, t != VIRTIO_BLK_T_OUT))
        bufs.append((self.buf(1), 1, True))
        return self.chain(bufs, indirect=indirect)

    def chain(self, bufs, *, indirect: bool = False) -> int:
        if indirect:
            return self.ring.add_indirect_chain(self.buf(16 * len(bufs)), bufs)
        return self.ring.add_chain(bufs)

    def snapshot(self):
        self.ring.publish()
        r = self.ring
        if self.packed:
            return decoder.snapshot_packed(self.mem, SIZE, r.desc_addr, r.driver_event_addr, r.device_event_addr,
                                           next_used=0, used_wrap_counter=1, last_avail_idx=0,
                                           last_avail_wrap_counter=1)
        return decoder.snapshot_split(self.mem, SIZE, r.desc_addr, r.avail_addr, r.used_addr, 0)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_real_requests_decode(packed):
    g = Guest(packed)
    g.request(VIRTIO_BLK_T_OUT, 2048, 4096)
    g.request(VIRTIO_BLK_T_IN, 8, 512, indirect=True)
    g.request(VIRTIO_BLK_T_FLUSH, 0)
    g.request(VIRTIO_BLK_T_GET_ID, 0, 20, split_header=True)
    g.request(99, 7, 512)
    ring = attach_requests(g.snapshot(), memory_reader(g.mem))
    assert [c.request for c in ring.chains] == [
        BlkRequest("out", 2048, 4096), BlkRequest("in", 8, 512), BlkRequest("flush", 0, 0),
        BlkRequest("get_id", 0, 20), BlkRequest(99, 7, 512)]
    assert ring.chain(1).request == BlkRequest("in", 8, 512)
    assert ring.chain_dicts()[0]["request"] == {"type": "out", "sector": 2048, "data_len": 4096,
                                                "status": "pending"}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_hostile_chains_are_malformed_not_errors(packed):
    g = Guest(packed)
    hdr = outhdr(VIRTIO_BLK_T_OUT, 1)
    g.chain([(g.buf(hdr[:12]), 12, False), (g.buf(1), 1, True)])              # header 12 bytes
    g.chain([(g.buf(hdr), 16, False), (g.buf(512), 512, False)])              # no status descriptor
    g.chain([(0x7000_0000, 16, False), (g.buf(1), 1, True)])                  # header outside memory
    g.chain([(g.buf(1), 1, True)])                                            # only a status byte
    g.chain([(g.buf(hdr), 16, False), (g.buf(0), 0, True)])                   # status len 0
    ring = attach_requests(g.snapshot(), memory_reader(g.mem))
    reqs = [c.request for c in ring.chains]
    assert reqs[0].type is None and reqs[0].malformed.startswith("header: 12 device-readable bytes")
    assert reqs[1].type == "out" and reqs[1].data_len == 512 and "status: the last descriptor" in reqs[1].malformed
    assert reqs[2].malformed.startswith("header: at guest-physical 0x70000000 not readable")
    assert reqs[3].malformed.startswith("header: 0 device-readable bytes")
    assert reqs[4].malformed == "status: the last descriptor has len 0, no byte for the status"
    assert all(r.status == "pending" for r in reqs)


def test_header_read_is_one_reader_call_of_16_bytes_per_chain():
    g = Guest()
    for i in range(4):
        g.request(VIRTIO_BLK_T_IN, i, 512, split_header=i % 2 == 1)
    calls = []
    base = memory_reader(g.mem)

    def read(ranges):
        calls.append(ranges)
        return base(ranges)
    decode_requests(g.snapshot(), read)
    assert len(calls) == 1 and sum(n for _, n in calls[0]) == 4 * 16


def test_net_ring_has_no_requests():
    g = Guest()
    g.request(VIRTIO_BLK_T_OUT, 0, 512)
    ring = g.snapshot()
    assert ring.requests is None and ring.chains[0].request is None and "request" not in ring.chain_dicts()[0]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_request_round_trips_through_the_codec(packed):
    g = Guest(packed)
    g.request(VIRTIO_BLK_T_OUT, 2048, 4096)
    g.chain([(g.buf(4), 4, False), (g.buf(1), 1, True)])
    ring = attach_requests(g.snapshot(), memory_reader(g.mem))
    q = QueueEntry(device="blk0", index=0, size=SIZE, features=0, event_idx=False,
                   device_type="block").fill_from_ring(ring)
    obj = codec.to_json(Snapshot(source="t", time=1.0, queues=[q]))
    assert obj["queues"][0]["chains"][0]["request"] == {"type": "out", "sector": 2048, "data_len": 4096,
                                                        "status": "pending"}
    back = codec.from_json(obj)
    assert [c.request for c in back.queues[0].chains] == [c.request for c in ring.chains]
    assert codec.to_json(back) == obj
    # Chain tuples (not columns) emit it too.
    q2 = QueueEntry(device="blk0", index=0, size=SIZE, features=0, event_idx=False, layout=q.layout,
                    chains=list(back.queues[0].chains))
    assert codec.queue_to_json(q2)["chains"] == obj["queues"][0]["chains"]


@pytest.mark.parametrize("bad, where", [
    ({"type": "out", "sector": 1, "data_len": 2}, "request has members"),
    ({"type": 1.5, "sector": 1, "data_len": 2, "status": "pending"}, "request.type is 1.5"),
    ({"type": "in", "sector": "x", "data_len": 2, "status": "pending"}, "request.sector is 'x'"),
    ({"type": "in", "sector": 1, "data_len": 2, "status": "done"}, "request.status is 'done'"),
    ({"type": "in", "sector": 1, "data_len": 2, "status": "ok", "malformed": 3}, "request.malformed is 3"),
    ([], "request is []"),
])
def test_codec_checks_the_request(bad, where):
    chain = {"head": 0, "descs": [], "out_bytes": 0, "in_bytes": 0, "request": bad}
    q = codec.queue_to_json(QueueEntry(device="blk0", index=0, size=SIZE, features=0, event_idx=False))
    q["chains"] = [chain]
    with pytest.raises(SnapshotFormatError, match=re.escape("queues[0].chains[0]." + where)):
        codec.from_json({"source": "t", "time": 1.0, "queues": [q]})


def test_request_from_dict_accepts_completed_statuses():
    assert request_from_dict({"type": "in", "sector": 1, "data_len": 512, "status": "ioerr"}).status == "ioerr"


# --- where chains are built for a block device ----------------------------------------------------

def _hva(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


@pytest.mark.parametrize("name, decoded", [("virtio-blk", True), ("virtio-net", False)])
def test_qemu_source_decodes_block_requests(name, decoded):
    """QEMU's queue of a virtio-blk device: the headers come from QEMU's
    memory (here this process's own, as test_qemu_entry does); a net
    device's chains are left alone."""
    g = Guest()
    g.request(VIRTIO_BLK_T_OUT, 2048, 4096)
    g.request(VIRTIO_BLK_T_IN, 16, 512, indirect=True)
    g.ring.publish()
    src = QemuSource.__new__(QemuSource)
    src.pid, src.qmp_path = os.getpid(), "/fake/qmp.sock"
    src._pmem = ProcessMemory(os.getpid())
    src._ram = [RamRange(r.gpa, r.size, _hva(r.buf)) for r in g.mem.regions]
    src.refresh_map = lambda force=False: False
    try:
        dev = DeviceState(path="/machine/peripheral/disk0/virtio-backend", name=name, device="disk0",
                          vhost_started=False, features=1 << VIRTIO_F_VERSION_1, num_vqs=1, broken=False)
        r = g.ring
        q = QueueState(index=0, num=SIZE, desc=r.desc_addr, avail=r.avail_addr, used=r.used_addr, vhost=False,
                       last_avail_idx=0, qemu_used_idx=0, signalled_used=0, shadow_avail_idx=2)
        entry, _dec = src._queue_entry(dev, q)
    finally:
        src._pmem.close()
    if decoded:
        assert [c.request for c in entry.chains] == [BlkRequest("out", 2048, 4096), BlkRequest("in", 16, 512)]
    else:
        assert [c.request for c in entry.chains] == [None, None]


def test_process_reader_names_what_it_cannot_read():
    g = Guest()
    pmem = ProcessMemory(os.getpid())
    try:
        read = process_reader(pmem, [RamRange(DATA, len(g.data), _hva(g.data)), RamRange(0x900000, 4096, 4096)])
        g.data[:16] = outhdr(VIRTIO_BLK_T_IN, 5)
        got = read([(DATA, 16), (0x500000, 16), (0x900000, 16)])
    finally:
        pmem.close()
    assert got[0] == outhdr(VIRTIO_BLK_T_IN, 5)
    assert got[1] == "16 bytes at guest-physical 0x500000 are not in one guest RAM range"
    assert got[2] == f"16 bytes at host virtual 0x1000 are not mapped in process {os.getpid()}"


@pytest.mark.parametrize("device_type", ["block", "net"])
def test_backend_snapshot_decodes_block_requests(device_type):
    """Our back-end's introspection (inspector.introspect.snapshot) of a
    block device's vring: chains carry their requests; a net device's do
    not."""
    g = Guest()
    g.request(VIRTIO_BLK_T_OUT, 64, 1024)
    g.ring.publish()
    r = g.ring
    vring = VringConfig(index=0, num=SIZE, desc_uva=r.desc_addr, avail_uva=r.avail_addr, used_uva=r.used_addr,
                        addr_set=True, started=True)
    entry = queue_snapshot("blk0", vring, g.mem, 1 << VIRTIO_F_VERSION_1, QueueStats(last_avail_idx=0),
                           device_type=device_type)
    want = BlkRequest("out", 64, 1024) if device_type == "block" else None
    assert [c.request for c in entry.chains] == [want]
    assert ("request" in codec.queue_to_json(entry)["chains"][0]) is (want is not None)
