"""The C/Python status seam (inspector/_cffi.py).

Two status families that never mix: the decoder's ``VQD_SNAP_*``
(csrc/vqd_decode.h, plus VQD_SNAP_E_FAULT of csrc/vqd_guard.h), turned into
exceptions by ``snapshot_error``, and the data path's negative ``VQD_E_*``
(csrc/vqd_vq.h), turned into exceptions by ``check``. Only inspector/_cffi.py
imports the compiled module. A SIGBUS under either family's guarded entry
points is an exception naming the guest-physical address, never a status of
the other family or a value taken for a result.
"""

from __future__ import annotations

import ast
import errno
import mmap
import os
import subprocess
import sys

import pytest

from inspector import _cffi
from inspector._cffi import check, lib, snapshot_error
from inspector.datapath.net import NetScratch, net_tap_rx
from inspector.datapath.queue import DeviceQueue
from inspector.errors import ArgumentError, MemoryAccessError, RingError
from inspector.memory import GuestMemory
from inspector.ring import decoder
from inspector.ring.driver import DriverRing
from tests.conftest import ROOT

GPA = 0x100000
UVA = 0x7F0000000000
MEM_SIZE = 1 << 20
FAR = GPA + MEM_SIZE - 0x4000   # a ring in the half that truncate_half() takes away
DATA = GPA + 0x10000


def _family(prefix: str) -> dict[str, int]:
    return {n: getattr(lib, n) for n in dir(lib) if n.startswith(prefix)}


def test_status_families_are_apart():
    snap = _family("VQD_SNAP_E_") | {"VQD_SNAP_OK": lib.VQD_SNAP_OK}
    data = _family("VQD_E_") | {"VQD_OK": lib.VQD_OK}
    assert "VQD_SNAP_E_FAULT" in snap and len(set(snap.values())) == len(snap)
    assert len(set(data.values())) == len(data)
    assert all(v >= 0 for v in snap.values())
    assert all(v < 0 for n, v in data.items() if n != "VQD_OK")


def test_only_cffi_imports_the_compiled_module():
    importers = []
    for path in sorted((ROOT / "inspector").rglob("*.py")) + sorted((ROOT / "probes").rglob("*.py")) \
            + sorted((ROOT / "tui").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            if any(n == "_vqd" or n.endswith("._vqd") or n.endswith("._vqd.lib") or n.endswith("._vqd.ffi")
                   for n in names):
                importers.append(str(path.relative_to(ROOT)))
    assert importers == ["inspector/_cffi.py"]


def test_check_maps_each_data_path_status():
    assert check(3, "x") == 3
    with pytest.raises(RingError, match="x: queue is broken: why"):
        check(lib.VQD_E_BROKEN, "x", "why")
    with pytest.raises(ArgumentError, match="too small"):
        check(lib.VQD_E_NOSPACE, "x")
    with pytest.raises(ArgumentError, match="invalid argument"):
        check(lib.VQD_E_INVAL, "x")
    with pytest.raises(OSError) as ei:
        check(lib.VQD_E_IO, "tap", err=errno.EIO)
    assert ei.value.errno == errno.EIO


def test_snapshot_fault_status_is_a_memory_access_error():
    mem = GuestMemory()
    mem.add(GPA, bytearray(0x1000))
    e = snapshot_error(lib.VQD_SNAP_E_FAULT, mem, 8, None, 64)
    assert isinstance(e, MemoryAccessError) and "SIGBUS decoding the ring" in str(e)


@pytest.fixture
def memfd_mem():
    """A GuestMemory over a memfd, and a function that truncates its upper half."""
    fd = os.memfd_create("vqscope-status-test")
    os.ftruncate(fd, MEM_SIZE)
    m = mmap.mmap(fd, MEM_SIZE)
    mem = GuestMemory()
    mem.add(GPA, m, uva=UVA)
    _cffi.install_sigbus_guard()  # on top of any handler installed since import (pytest's faulthandler)
    yield mem, lambda: os.ftruncate(fd, MEM_SIZE // 2)
    os.close(fd)


def test_snapshot_of_truncated_memory_raises_memory_access_error(memfd_mem):
    mem, truncate_half = memfd_mem
    drv = DriverRing(mem, FAR, 8)
    drv.add_chain([(DATA, 16, False)])
    drv.publish()
    assert decoder.snapshot_split(mem, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0).avail_idx == 1
    truncate_half()
    # the decoder reads the driver area's header first
    with pytest.raises(MemoryAccessError, match=r"SIGBUS decoding the ring at guest-physical 0x%x" % drv.avail_addr):
        decoder.snapshot_split(mem, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)


def test_snapshot_guard_survives_a_handler_installed_after_import(tmp_path):
    """A SIGBUS handler installed after the module (faulthandler here) does
    not take the decoder's fault: each snapshot puts the guard back on top.
    In a child: without that, the fault would kill it."""
    code = f"""
import faulthandler, mmap, os
from inspector.errors import MemoryAccessError
from inspector.memory import GuestMemory
from inspector.ring import decoder
from inspector.ring.driver import DriverRing
fd = os.memfd_create("vqscope-guard-test")
os.ftruncate(fd, {MEM_SIZE})
mem = GuestMemory()
mem.add({GPA}, mmap.mmap(fd, {MEM_SIZE}))
drv = DriverRing(mem, {FAR}, 8)
faulthandler.enable()   # SIGBUS now goes to faulthandler's handler
os.ftruncate(fd, {MEM_SIZE // 2})
try:
    decoder.snapshot_split(mem, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)
except MemoryAccessError as e:
    print("guarded:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and "guarded: SIGBUS decoding the ring" in r.stdout, (r.returncode, r.stderr)


def test_should_notify_on_truncated_ring_raises_and_breaks_the_queue(memfd_mem):
    """vqd_vq_should_notify faults reading avail->flags (§2.7.10, no
    EVENT_IDX): a RingError naming that address (it used to come back as
    VQD_E_BROKEN, -1, taken for "notify")."""
    mem, truncate_half = memfd_mem
    drv = DriverRing(mem, FAR, 8)
    dev = DeviceQueue(mem, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, gpa=True)
    try:
        assert dev.should_notify() is True
        truncate_half()
        with pytest.raises(RingError, match="SIGBUS at guest-physical 0x%x" % drv.avail_addr):
            dev.should_notify()
        assert "memfd truncated" in dev.broken
    finally:
        dev.release()


def test_tap_read_error_is_an_oserror_with_its_errno(tmp_path):
    mem = GuestMemory()
    mem.add(GPA, bytearray(MEM_SIZE), uva=UVA)
    drv = DriverRing(mem, GPA, 8)
    drv.add_chain([(DATA, 2048, True)])
    drv.publish()
    rx = DeviceQueue(mem, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, gpa=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)   # read(2) on it: EISDIR
    try:
        with pytest.raises(OSError) as ei:
            net_tap_rx(rx, fd, NetScratch(), 12, False)
        assert ei.value.errno == errno.EISDIR and "tap receive" in str(ei.value)
        assert rx.broken is None
    finally:
        os.close(fd)
        rx.release()
