"""Reading another process's memory read-only (inspector.memory.process),
and decoding rings that live there (inspector.ring.remote).

The rings live in a real child process (:class:`RingChild`): it builds them
in bytearrays of its own with tests/support/ringbuilder.py or inspector.ring.driver,
prints their guest-physical layout, the host virtual addresses of its "guest
RAM" and its own local decode as JSON, then waits on stdin. The parent reads
them with ProcessMemory + snapshot_remote_split and must get exactly the
child's local decode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inspector.errors import RingError, SourceError
from inspector.memory import process
from inspector.memory.process import (
    IOV_MAX,
    NoSuchProcessError,
    ProcessAccessError,
    ProcessExitedError,
    ProcessMemory,
    ProcessReadError,
    RamRange,
)
from inspector.ring import decoder, reference
from inspector.ring import remote as ring_remote
from inspector.ring.remote import snapshot_remote_split
from tests.conftest import ROOT, require, wait_for

IMPLS = {"c": decoder, "python": reference}

# An address no RAM range of the child holds, and an unmapped host address.
OUTSIDE_GPA = 0xDEAD_0000_0000
UNMAPPED_TABLE_GPA = 0x7000_0000

CHILD = r'''
import ctypes, json, sys
from inspector.ring import decoder
from inspector.ring.driver import DriverRing
from inspector.memory import GuestMemory
from tests.support.ringbuilder import RingBuilder

def hva(buf):
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))

def ring_entry(mem, size, addrs, last=None):
    local = decoder.snapshot_split(mem, size, *addrs, last)
    return {"size": size, "addrs": list(addrs), "last": last, "local": local.as_dict()}

scenario = sys.argv[1]
out = {"ram": [], "rings": [], "buffers": []}
keep = []
if scenario == "mixed":
    # Ring 0: direct and indirect chains, a buffer outside RAM, an indirect
    # table outside RAM, one at an unmapped gpa the parent may claim as RAM,
    # one chain used by the device. Ring 1: 256 entries, half in flight.
    rb = RingBuilder(16, ring_gpa=0x10000, data_gpa=0x200000, data_mem=0x40000)
    a = rb.add_chain([(12, False), (1514, True)])
    rb.add_indirect_chain([(10, False), (20, True), (30, True)])
    rb.add_chain([(64, False)])
    bad = rb.add_chain([(OUTSIDE_GPA, 64, False)])
    t_out = rb.add_indirect_chain([(8, False)])
    rb.set_desc(t_out, addr=OUTSIDE_GPA)
    t_unm = rb.add_indirect_chain([(8, False), (8, True)])
    rb.set_desc(t_unm, addr=UNMAPPED_TABLE_GPA)
    rb.add_indirect_chain([(100, False), (200, True)])
    rb.publish()
    rb.device_use([(a, 1526)])
    rb2 = RingBuilder(256, ring_gpa=0x1000000, data_gpa=0x2000000, data_mem=0x100000)
    heads = []
    for k in range(136):
        if k % 4 == 3:
            heads.append(rb2.add_indirect_chain([(12, False), (1514, False), (64, True)]))
        else:
            heads.append(rb2.add_chain([(12, False), (1514, True)]))
    rb2.publish()
    rb2.device_use([(h, 0) for h in heads[:8]])
    for b in (rb, rb2):
        for r in b.mem.regions:
            out["ram"].append([r.gpa, r.size, hva(r.buf)])
        keep.append(b)
    out["rings"].append(ring_entry(rb.mem, 16, rb.addrs))
    out["rings"].append(ring_entry(rb.mem, 16, rb.addrs, last=(rb.ring.avail_idx - 3) & 0xFFFF))
    out["rings"].append(ring_entry(rb2.mem, 256, rb2.addrs))
    out["buffers"] = [[hva(rb.data_buf), len(rb.data_buf)], [hva(rb.ring_buf), len(rb.ring_buf)]]
    out["data_sample"] = bytes(rb.ring_buf[:64]).hex()
elif scenario == "bench":
    # nq queues of 256 in one RAM block, as a virtio-net VM with nq/2 queue
    # pairs: RX (even) one 1526-byte writable buffer per chain (mergeable
    # buffers), TX (odd) an indirect table of header + linear part + page
    # fragment; half of each ring in flight. Tables "slab": packed 64 bytes
    # apart in shuffled order, as Linux's kmalloc-64 gives them;
    # "scattered": each next to its buffers, 8 KiB apart (worst case for
    # the second read: one page and one region per table).
    import random
    nq, size, qbytes, data_per_q = int(sys.argv[2]), 256, 0x3000, 0x200000
    layout = sys.argv[3] if len(sys.argv) > 3 else "slab"
    base = 0x100000
    ram = bytearray(nq * qbytes + nq * data_per_q)
    mem = GuestMemory()
    mem.add(base, ram)
    keep.append(ram)
    out["ram"].append([base, len(ram), hva(ram)])
    for q in range(nq):
        ring = DriverRing(mem, base + q * qbytes, size, 4096)
        data = base + nq * qbytes + q * data_per_q
        cur = data + 0x10000
        slots = list(range(size // 2))
        random.Random(q).shuffle(slots)
        for k in range(size // 2):
            if q % 2 == 0:
                ring.add_chain([(cur, 1526, True)])
                cur += 2048
            else:
                table = data + 64 * slots[k] if layout == "slab" else cur
                ring.add_indirect_chain(table, [(cur + 64, 12, False), (cur + 128, 1000, False),
                                                (cur + 2048, 3000, False)])
                cur += 8192
        ring.publish()
        keep.append(ring)
        out["rings"].append(ring_entry(mem, size, (ring.desc_addr, ring.avail_addr,
                                                   ring.used_addr)))
print(json.dumps(out), flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        break
'''.replace("OUTSIDE_GPA", hex(OUTSIDE_GPA)).replace("UNMAPPED_TABLE_GPA", hex(UNMAPPED_TABLE_GPA))


class RingChild:
    """A child process holding rings (scenario ``mixed`` or ``bench``);
    ``info`` is its JSON (``ram``: [gpa, size, hva] triples, ``rings``:
    size, addrs, last, local decode)."""

    def __init__(self, scenario: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, scenario, *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"ring child {scenario} failed (exit {self.proc.returncode})")
        self.info = json.loads(line)
        self.ram = [RamRange(*r) for r in self.info["ram"]]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def quit(self, reap: bool = True) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        if reap:
            self.proc.wait(10)

    def __enter__(self) -> RingChild:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def mixed():
    with RingChild("mixed") as child:
        yield child


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def remote(pmem, ram, ring, impl=decoder):
    return snapshot_remote_split(pmem, ram, ring["size"], *ring["addrs"], ring["last"], impl=impl)


def kinds(d: dict) -> list[str]:
    return [a["kind"] for a in d["anomalies"]]


# --- decoding rings of another process ---------------------------------------------

def test_remote_decode_equals_the_local_decode(mixed, impl):
    """Direct and indirect chains (the indirect ones need the second pass),
    a buffer outside RAM (addr_out_of_range), an indirect table outside RAM,
    with and without last_avail_idx, and a 256-entry ring half in flight."""
    with ProcessMemory(mixed.pid) as pm:
        for ring in mixed.info["rings"]:
            before = pm.syscalls
            got = remote(pm, mixed.ram, ring, impl).as_dict()
            assert got == ring["local"]
            assert pm.syscalls - before == 2  # areas, then all indirect tables
    local = mixed.info["rings"][0]["local"]
    assert {"addr_out_of_range", "indirect_out_of_range"} <= set(kinds(local))
    assert "indirect_not_read" not in kinds(local)
    assert any(len(c["descs"]) == 3 for c in local["chains"])  # the indirect chain


@pytest.mark.parametrize("layout", ["slab", "scattered"])
def test_one_read_per_refresh_two_with_indirect_tables(layout):
    """The three ring areas come in one process_vm_readv; all the indirect
    tables of a refresh in one more (bench scenario: queue 0 has only direct
    chains, queue 1 only indirect ones, 128 in flight each, tables packed
    or scattered)."""
    with RingChild("bench", "2", layout) as child, ProcessMemory(child.pid) as pm:
        direct, indirect = child.info["rings"]
        for ring, reads in ((direct, 1), (indirect, 2)):
            before = pm.syscalls
            s = remote(pm, child.ram, ring)
            assert pm.syscalls - before == reads
            assert s.as_dict() == ring["local"] and s.n_chains == 128 and not s.anomalies


def test_table_spans():
    """Tables are deduplicated, sorted, merged when less than SPAN_GAP apart
    inside one RAM range, and bounded by the byte budget."""
    ram = [RamRange(0x1000, 0x10000, 0x7F0000001000), RamRange(0x11000, 0x1000, 0x5000)]
    t = [(0x2000, 48), (0x1000, 32), (0x2000, 48), (0x2010, 16), (0x9000, 64),
         (0x10FF0, 16), (0x11000, 16), (0xDEAD0000, 16)]
    assert ring_remote.table_spans(t, ram, 1 << 20) == [
        (0x1000, 0x1030, 0x7F0000001000),   # 0x1000+32 and 0x2000+48 (gap < 4096)
        (0x9000, 64, 0x7F0000009000),
        (0x10FF0, 16, 0x7F0000010FF0),      # not merged across RAM ranges
        (0x11000, 16, 0x5000)]              # 0xDEAD0000: not RAM, left out
    assert ring_remote.table_spans(t, ram, 0x1030) == [(0x1000, 0x1030, 0x7F0000001000)]
    assert ring_remote.table_spans(t, ram, 0x20) == [(0x1000, 32, 0x7F0000001000)]
    assert ring_remote.table_spans(t, ram, 1 << 20, gap=0) == [
        (0x1000, 32, 0x7F0000001000), (0x2000, 48, 0x7F0000002000),
        (0x9000, 64, 0x7F0000009000), (0x10FF0, 16, 0x7F0000010FF0), (0x11000, 16, 0x5000)]


def test_table_in_ram_but_unmapped_keeps_indirect_not_read(mixed):
    """A RAM map claiming a range the process has not mapped: the ring areas
    still decode; the table there cannot be read in the second pass and its
    chain keeps ``indirect_not_read`` (every other chain is intact)."""
    ring = mixed.info["rings"][0]
    ram = [*mixed.ram, RamRange(UNMAPPED_TABLE_GPA, 0x1000, 0x1000)]
    with ProcessMemory(mixed.pid) as pm:
        got = remote(pm, ram, ring).as_dict()
    local = ring["local"]
    assert kinds(got) == ["indirect_not_read" if k == "indirect_out_of_range"
                          and f"0x{UNMAPPED_TABLE_GPA:x}" in a["detail"] else k
                          for k, a in zip(kinds(local), local["anomalies"])]
    assert got["chains"] == local["chains"]


def test_ring_area_outside_ram_is_a_ring_error(mixed):
    ring = mixed.info["rings"][0]
    desc, avail, used = ring["addrs"]
    with ProcessMemory(mixed.pid) as pm:
        with pytest.raises(RingError, match="device area \\(used ring\\) at guest-physical"):
            snapshot_remote_split(pm, mixed.ram, 16, desc, avail, OUTSIDE_GPA, None)
        # the last bytes of the used ring one past the end of its RAM range
        short = [RamRange(r.gpa, r.size, r.hva) if not r.gpa <= used < r.gpa + r.size
                 else RamRange(r.gpa, used + 4 - r.gpa, r.hva) for r in mixed.ram]
        with pytest.raises(RingError, match="not inside one guest RAM range"):
            snapshot_remote_split(pm, short, 16, desc, avail, used, None)


def test_ring_area_unmapped_in_the_process_is_a_read_error(mixed):
    ring = mixed.info["rings"][0]
    desc, avail, used = ring["addrs"]
    ram = [RamRange(0x10000, 0x10000, 0x2000)]  # gpa of ring 0, at an unmapped hva
    with ProcessMemory(mixed.pid) as pm:
        # the first range read is the driver area (avail)
        with pytest.raises(ProcessReadError, match=f"at host virtual address {0x2000 + avail - 0x10000:#x}"):
            snapshot_remote_split(pm, ram, 16, desc, avail, used, None)


# --- ProcessMemory ---------------------------------------------------------------------

def test_mem_fd_is_read_only_and_close_on_exec(mixed):
    with ProcessMemory(mixed.pid) as pm:
        fd = pm.mem_fd
        assert os.readlink(f"/proc/self/fd/{fd}") == f"/proc/{mixed.pid}/mem"
        with open(f"/proc/self/fdinfo/{fd}") as f:
            flags = int(next(ln for ln in f if ln.startswith("flags:")).split()[1], 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        assert flags & os.O_CLOEXEC
    assert pm.closed and pm.mem_fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_module_cannot_write():
    """No write access anywhere: neither a writable open nor the write twin
    of process_vm_readv."""
    src = open(process.__file__, encoding="utf-8").read()
    for word in ("O_RDWR", "O_WRONLY", "process_vm_writev", "pwrite", "os.write"):
        assert word not in src


def test_readv_gathers_in_one_call(mixed):
    (data_hva, _), (ring_hva, _) = mixed.info["buffers"]
    with ProcessMemory(mixed.pid) as pm:
        before = pm.syscalls
        got = pm.readv([(ring_hva, 64), (data_hva, 16), (ring_hva, 0), (ring_hva + 8, 8)])
        assert pm.syscalls - before == 1
        assert got[0].hex() == mixed.info["data_sample"] and got[2] == b""
        assert got[3] == got[0][8:16] and len(got[1]) == 16
        assert pm.readv([]) == []


def test_readv_splits_at_iov_max(mixed):
    (_, _), (ring_hva, _) = mixed.info["buffers"]
    ranges = [(ring_hva + (k % 8) * 8, 8) for k in range(2 * IOV_MAX + 5)]
    with ProcessMemory(mixed.pid) as pm:
        before = pm.syscalls
        got = pm.readv(ranges)
        assert pm.syscalls - before == 3
        sample = bytes.fromhex(mixed.info["data_sample"])
        assert got == [sample[(k % 8) * 8:(k % 8) * 8 + 8] for k in range(len(ranges))]


def test_readv_names_the_unmapped_address(mixed):
    (_, _), (ring_hva, _) = mixed.info["buffers"]
    with ProcessMemory(mixed.pid) as pm:
        with pytest.raises(ProcessReadError, match="host virtual address 0x1000 ") as e:
            pm.readv([(0x1000, 16)])
        assert e.value.addr == 0x1000
        # the second range fails after the first was read (a partial read)
        with pytest.raises(ProcessReadError, match="host virtual address 0x3000 ") as e:
            pm.readv([(ring_hva, 64), (0x3000, 8), (ring_hva, 8)])
        assert e.value.addr == 0x3000
        buf, offs, failed = pm.gather_partial([(ring_hva, 8), (0x3000, 8), (ring_hva, 8)])
        assert failed == {1} and buf[:8] == buf[16:24] and offs == [0, 8, 16]
        with pytest.raises(ProcessReadError, match="not a user-space address range"):
            pm.readv([(2**64 - 8, 16)])


def test_pread_fallback_reads_the_same(mixed):
    (data_hva, _), (ring_hva, _) = mixed.info["buffers"]
    ranges = [(ring_hva, 64), (data_hva, 32)]
    with ProcessMemory(mixed.pid) as pm, ProcessMemory(mixed.pid, use_pread=True) as pp:
        assert pp.readv(ranges) == pm.readv(ranges)
        with pytest.raises(ProcessReadError, match="0x1000 "):
            pp.readv([(0x1000, 16)])
        ring = mixed.info["rings"][0]
        assert remote(pp, mixed.ram, ring).as_dict() == ring["local"]


def _fake_readv(err):
    import ctypes

    def fake(*args):
        ctypes.set_errno(err)
        return -1
    return fake


def test_enosys_falls_back_to_pread(mixed, monkeypatch):
    import errno
    monkeypatch.setattr(process, "_process_vm_readv", _fake_readv(errno.ENOSYS))
    (_, _), (ring_hva, _) = mixed.info["buffers"]
    with ProcessMemory(mixed.pid) as pm:
        assert pm.readv([(ring_hva, 64)])[0].hex() == mixed.info["data_sample"]
        assert pm.use_pread


def test_eperm_from_process_vm_readv_names_cap_sys_ptrace(mixed, monkeypatch):
    import errno
    monkeypatch.setattr(process, "_process_vm_readv", _fake_readv(errno.EPERM))
    with ProcessMemory(mixed.pid) as pm:
        with pytest.raises(ProcessAccessError, match="CAP_SYS_PTRACE") as e:
            pm.readv([(0x1000, 8)])
        assert "kernel.yama.ptrace_scope" in str(e.value)


def test_no_such_process():
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(NoSuchProcessError, match=f"no process with pid {dead.pid}"):
        ProcessMemory(dead.pid)
    for bad in (0, -1, "1"):
        with pytest.raises(NoSuchProcessError):
            ProcessMemory(bad)
    assert issubclass(NoSuchProcessError, SourceError)


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_process_exits_while_attached(reap):
    """QEMU exits: the next refresh raises ProcessExitedError ("the VM is
    gone"), a SourceError callers can tell apart, whether the process has
    been reaped or is a zombie."""
    with RingChild("bench", "1") as child:
        ring = child.info["rings"][0]
        pm = ProcessMemory(child.pid)
        assert remote(pm, child.ram, ring).as_dict() == ring["local"]
        child.quit(reap=reap)
        if not reap:
            assert wait_for(lambda: open(f"/proc/{child.pid}/stat").read().split(") ")[1][0]
                            == "Z")
        with pytest.raises(ProcessExitedError, match="exited while attached") as e:
            remote(pm, child.ram, ring)
        assert e.value.pid == child.pid and isinstance(e.value, SourceError)
        with pytest.raises(ProcessExitedError):
            pm.readv([(child.ram[0].hva, 8)])
        pm.close()


PERM_CHILD = r'''
import sys
from inspector.errors import SourceError
from inspector.memory.process import ProcessAccessError, ProcessMemory
try:
    ProcessMemory(int(sys.argv[1]))
except ProcessAccessError as e:
    print("ProcessAccessError:", e)
except SourceError as e:
    print("other:", type(e).__name__, e)
else:
    print("no error")
'''


def _drop_to_nobody():
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def test_permission_error_names_cap_sys_ptrace():
    """An unprivileged user (nobody) may not read pid 1: the error names
    CAP_SYS_PTRACE and kernel.yama.ptrace_scope (with its value when Yama
    is active)."""
    require(os.geteuid() == 0, "needs root to drop to the nobody user")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PERM_CHILD, "1"], cwd="/", env=env,
                       preexec_fn=_drop_to_nobody, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith("ProcessAccessError: no permission to read the memory of process 1")
    assert "CAP_SYS_PTRACE" in out and "kernel.yama.ptrace_scope" in out
    if os.path.exists(process.YAMA_PTRACE_SCOPE):
        value = open(process.YAMA_PTRACE_SCOPE).read().strip()
        assert f"kernel.yama.ptrace_scope is {value} " in out


class RacingMemory(ProcessMemory):
    """This process's own memory, read as a remote one; ``between()`` runs
    right after the first read of a refresh (the guest moving on)."""

    def __init__(self, between):
        super().__init__(os.getpid())
        self.between = between
        self.reads = 0

    def gather(self, ranges):
        got = super().gather(ranges)
        self.reads += 1
        if self.reads == 1:
            self.between()
        return got


@pytest.mark.parametrize("returned", [True, False], ids=["returned", "in-flight"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_table_reused_after_its_chain_returned_is_not_blamed(returned, impl):
    """Between the read of the ring areas and the read of the indirect
    tables the device returns a chain and the driver frees its table, whose
    memory is reused (garbage). That is not the driver's fault: the chain
    keeps indirect_not_read, no addr_out_of_range. The same garbage in the
    table of a chain still in flight is the driver's: reported."""
    import ctypes

    from tests.support.ringbuilder import RingBuilder

    rb = RingBuilder(16, ring_gpa=0x10000, data_gpa=0x200000, data_mem=0x40000)
    kept = rb.add_indirect_chain([(10, False), (20, True)])
    victim = rb.add_indirect_chain([(10, False), (20, True)])
    rb.publish()

    def between():
        if returned:
            rb.device_use([(victim, 20)])
        rb.set_table_entry(victim, 0, addr=0x8D6F921B19BF64AB, len=4096)

    ram = [RamRange(r.gpa, r.size, ctypes.addressof((ctypes.c_char * len(r.buf)).from_buffer(r.buf)))
           for r in rb.mem.regions]
    with RacingMemory(between) as pm:
        snap = snapshot_remote_split(pm, ram, 16, *rb.addrs, None, impl=IMPLS[impl]).as_dict()
    assert pm.reads == 1          # the tables and the device area came in the one read after
    by_head = {c["head"]: c for c in snap["chains"]}
    assert len(by_head[kept]["descs"]) == 2          # the other chain's table was read
    if returned:
        assert kinds(snap) == ["indirect_not_read"], snap["anomalies"]
        assert f"head {victim}" in snap["anomalies"][0]["detail"] or \
            len(by_head[victim]["descs"]) == 1
    else:
        assert "addr_out_of_range" in kinds(snap) and "indirect_not_read" not in kinds(snap)


def test_returned_tables_turned_over_ring_trusts_no_table():
    used = bytearray(6 + 8 * 4)
    after = bytearray(used)
    after[2:4] = (4).to_bytes(2, "little")          # the whole 4-entry used ring rewritten
    assert ring_remote.returned_heads(used, after, 4) is None
    after[2:4] = (1).to_bytes(2, "little")          # head 9 >= size: a hostile id, no chain
    after[4:8] = (9).to_bytes(4, "little")
    assert ring_remote.returned_heads(used, after, 4) == {9}
    assert ring_remote.returned_tables(bytes(64), 4, {9}) == []


class MidReadMemory(ProcessMemory):
    """This process's own memory; ``between()`` runs inside the first read
    of a refresh, after its first ``after`` ranges (the guest moving on
    while process_vm_readv copies)."""

    def __init__(self, between, after: int):
        super().__init__(os.getpid())
        self.between, self.after, self.reads = between, after, 0

    def gather(self, ranges):
        self.reads += 1
        if self.reads > 1:
            return super().gather(ranges)
        b1, o1 = super().gather(ranges[:self.after])
        self.between()
        b2, o2 = super().gather(ranges[self.after:])
        return b1 + b2, o1 + [len(b1) + o for o in o2]


@pytest.mark.parametrize("returned", [True, False], ids=["returned", "in-flight"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_descriptor_reused_after_its_chain_returned_is_not_blamed(returned, impl):
    """The descriptor table is read after the avail and used rings; between
    them the device returns a chain and the driver reuses its descriptor
    (an address outside guest RAM, as half-written garbage would be). Not
    the driver's fault: no anomaly for that head. The same write to a
    chain still in flight is reported."""
    import ctypes

    from tests.support.ringbuilder import RingBuilder

    rb = RingBuilder(16, ring_gpa=0x10000, data_gpa=0x200000, data_mem=0x40000)
    kept = rb.add_chain([(64, False), (64, True)])
    victim = rb.add_chain([(64, False)])
    rb.publish()

    def between():
        if returned:
            rb.device_use([(victim, 0)])
        rb.set_desc(victim, addr=0x8D6F921B19BF64AB)

    ram = [RamRange(r.gpa, r.size, ctypes.addressof((ctypes.c_char * len(r.buf)).from_buffer(r.buf)))
           for r in rb.mem.regions]
    with MidReadMemory(between, after=2) as pm:     # after the avail and used rings
        snap = snapshot_remote_split(pm, ram, 16, *rb.addrs, None, impl=IMPLS[impl]).as_dict()
    assert [c["head"] for c in snap["chains"]] == [kept, victim]     # as the avail/used read had them
    assert len(snap["chains"][0]["descs"]) == 2
    if returned:
        assert snap["anomalies"] == [], snap["anomalies"]
    else:
        assert [a["kind"] for a in snap["anomalies"]] == ["addr_out_of_range"]
        assert snap["anomalies"][0]["detail"].endswith(f"(head {victim})")


def test_forget_returned_keeps_other_heads_and_global_anomalies():
    from inspector.ring.anomalies import Anomaly, AnomalyKind as K
    from inspector.ring.snapshot import RingSnapshot

    snap = RingSnapshot.__new__(RingSnapshot)
    zero, loop5 = Anomaly(K.ZERO_LEN, "desc[3].len = 0 (head 3)", 3), Anomaly(K.LOOP, "x", 5)
    loop3 = Anomaly(K.LOOP, "chain from head 3 is longer than the descriptor table (size 8): loop", 3)
    unread = Anomaly(K.INDIRECT_NOT_READ, "t (head 3)", 3)
    truncated = Anomaly(K.TRUNCATED, "at most 4096 descriptors: chain of avail->ring[1] (head 3) ...")
    jump = Anomaly(K.AVAIL_IDX_JUMP, "avail->idx 40 is 40 ahead of used->idx 0")
    snap.anomalies = [zero, loop5, loop3, unread, truncated, jump]
    ring_remote.forget_returned(snap, {3})
    assert snap.anomalies == [loop5, unread, truncated, jump]
    ring_remote.forget_returned(snap, set())
    assert snap.anomalies == [loop5, unread, truncated, jump]
    ring_remote.forget_returned(snap, None)
    assert snap.anomalies == [unread, truncated, jump]


@pytest.mark.parametrize("returned", [True, False], ids=["returned", "in-flight"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_loop_of_a_chain_returned_during_the_read_is_dropped(returned, impl):
    """As above, but the driver's reuse makes the returned chain's
    descriptor point at itself: the walk of the copy finds a ``loop``, whose
    detail names the head only as "chain from head N". Not the driver's
    fault: dropped (by the anomaly's head, not its text). The same loop in a
    chain still in flight is reported, with its head."""
    import ctypes

    from inspector.ring.anomalies import AnomalyKind

    from tests.support.ringbuilder import RingBuilder

    rb = RingBuilder(16, ring_gpa=0x10000, data_gpa=0x200000, data_mem=0x40000)
    kept = rb.add_chain([(64, False), (64, True)])
    victim = rb.add_chain([(64, False)])
    rb.publish()

    def between():
        if returned:
            rb.device_use([(victim, 0)])
        rb.make_loop(victim)

    ram = [RamRange(r.gpa, r.size, ctypes.addressof((ctypes.c_char * len(r.buf)).from_buffer(r.buf)))
           for r in rb.mem.regions]
    with MidReadMemory(between, after=2) as pm:     # after the avail and used rings
        snap = snapshot_remote_split(pm, ram, 16, *rb.addrs, None, impl=IMPLS[impl])
    assert snap.chain_head.tolist() == [kept, victim]
    if returned:
        assert snap.anomalies == [], snap.anomalies
    else:
        assert [(a.kind, a.head) for a in snap.anomalies] == [(AnomalyKind.LOOP, victim)]
        assert snap.anomalies[0].detail.startswith(f"chain from head {victim} ")


def test_last_avail_older_than_the_read_is_not_decoded_from():
    """A device's last_avail_idx behind this read's used_idx (QMP or a
    probe answered before the device moved on): decoded without it, the
    chains are the in-flight ones and the result says None; one between
    used and avail is kept."""
    import ctypes

    from tests.support.ringbuilder import RingBuilder

    rb = RingBuilder(8)
    heads = [rb.add_chain(((64, False),)) for _ in range(3)]
    rb.publish()
    rb.device_use([(heads[0], 0)])                 # used_idx 1, avail_idx 3
    ram = [RamRange(r.gpa, r.size, ctypes.addressof((ctypes.c_char * len(r.buf)).from_buffer(r.buf)))
           for r in rb.mem.regions]
    with ProcessMemory(os.getpid()) as pm:
        stale = snapshot_remote_split(pm, ram, 8, *rb.addrs, 0)
        kept = snapshot_remote_split(pm, ram, 8, *rb.addrs, 2)
    assert stale.last_avail_idx is None and [c.head for c in stale.chains] == heads[1:]
    assert kept.last_avail_idx == 2 and [c.head for c in kept.chains] == heads[2:]
