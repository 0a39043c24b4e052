"""The C/Python seam: the only importer of the compiled module
``inspector._vqd`` (built from inspector/csrc by inspector/_build_vqd.py),
and the one place where C statuses become exceptions.

Two status families, never mixed:

- the decoder's ``VQD_SNAP_*`` (``vqd_snapshot``): :func:`snapshot_error`;
- the data path's negative ``VQD_E_*`` (every ``vqd_vq_*``, ``vqd_net_*``,
  ``vqd_evlog_*`` and ``vqd_inflight_*`` entry point): :func:`check`.

Every negative status a C entry point returns goes through one of the two
(inspector/ring/decoder.py maps the three area statuses to the area's own
error first); no other module imports ``inspector._vqd``.

SIGBUS: every C entry point that touches guest memory runs under a
sigsetjmp guard (csrc/vqd_guard.c), so memory a front-end truncates after
SET_MEM_TABLE breaks the queue (its reason names the guest-physical address)
or fails the snapshot, instead of killing the process. The handler is
installed when this module is imported and re-checked whenever a
DeviceQueue starts (a handler installed later, e.g. by faulthandler, is
chained to for faults outside the guarded sections).
"""

from __future__ import annotations

import os

from ._vqd import ffi, lib
from .errors import ArgumentError, InspectorError, LayoutError, MemoryAccessError, RingError

__all__ = ["ffi", "lib", "install_sigbus_guard", "memory_fault_error", "check", "snapshot_error"]


def install_sigbus_guard() -> None:
    """Install (or put back on top) the process-wide SIGBUS handler of the
    guarded C sections; idempotent. Raises OSError if sigaction fails."""
    rc = lib.vqd_guard_install()
    if rc < 0:
        raise OSError(-rc, f"cannot install the SIGBUS guard: {os.strerror(-rc)}")


install_sigbus_guard()


def _check_spec_copies() -> None:
    """The C copies of spec numbers (csrc/vqd_blk_spec.h) must equal
    inspector/spec/virtio.py's, where they live under their spec names."""
    from .spec import virtio
    names = [n for n in dir(lib) if n.startswith("VIRTIO_BLK_")]
    wrong = [f"{n}: C {getattr(lib, n)}, spec {getattr(virtio, n, None)}" for n in names
             if getattr(virtio, n, None) != getattr(lib, n)]
    if not names or wrong:
        raise ImportError(f"csrc/vqd_blk_spec.h disagrees with inspector/spec/virtio.py: {wrong or 'no numbers'}")


_check_spec_copies()


def memory_fault_error(what: str, mem, host_addr: int) -> MemoryAccessError:
    """The error for a SIGBUS at ``host_addr`` while ``what`` (a guarded C
    call over ``mem``, a GuestMemory), naming the guest-physical address and
    its region."""
    where = f"host address {host_addr:#x}"
    for r in mem:
        if r.buf is None:
            continue
        try:
            fb = ffi.from_buffer(r.buf)
        except TypeError:
            continue
        base = int(ffi.cast("uintptr_t", fb)) + r.buf_offset
        ffi.release(fb)
        if base <= host_addr < base + r.size:
            where = f"guest-physical {r.gpa + host_addr - base:#x} (region {r.gpa:#x}+{r.size:#x})"
            break
    return MemoryAccessError(
        f"SIGBUS {what} at {where}: the front-end shrank the memory behind the region after "
        f"SET_MEM_TABLE (ftruncate of its memfd?); nothing there can be read until it sends a "
        f"new memory table")


def check(rc: int, what: str, broken: str | None = None, err: int | None = None) -> int:
    """``rc`` if it is a count (>= 0); else the exception of its ``VQD_E_*``
    status (csrc/vqd_vq.h): RingError (queue broken, with ``broken`` as the
    reason, or an unknown status), ArgumentError (iovec array too small,
    invalid argument), OSError with errno ``err`` (VQD_E_IO: a tap read or
    write of the net fast paths failed)."""
    if rc >= 0:
        return rc
    if rc == lib.VQD_E_BROKEN:
        raise RingError(f"{what}: queue is broken: {broken or 'see the peer queue'}")
    if rc == lib.VQD_E_NOSPACE:
        raise ArgumentError(f"{what}: the iovec array is too small for the next chain")
    if rc == lib.VQD_E_INVAL:
        raise ArgumentError(f"{what}: invalid argument")
    if rc == lib.VQD_E_IO and err is not None:
        raise OSError(err, f"{what}: {os.strerror(err)}")
    raise RingError(f"{what}: status {rc}")


def snapshot_error(rc: int, mem, size: int, last_avail_idx: int | None,
                   max_descs: int) -> InspectorError:
    """The exception of a ``vqd_snapshot_guarded`` status (the ``VQD_SNAP_*``
    family: csrc/vqd_decode.h) other than VQD_SNAP_OK and the area statuses
    (the decoder names the area itself): MemoryAccessError for a SIGBUS (VQD_SNAP_E_FAULT), LayoutError
    for a bad size, else InspectorError with the status."""
    if rc == lib.VQD_SNAP_E_FAULT:
        return memory_fault_error("decoding the ring", mem, lib.vqd_guard_fault_addr())
    if rc == lib.VQD_SNAP_E_SIZE:
        return LayoutError(f"queue size {size} is invalid (VIRTIO 1.2 §2.7)")
    return InspectorError(f"vqd_snapshot failed with status {rc} (size {size}, "
                          f"last_avail_idx {last_avail_idx}, max_descs {max_descs})")
