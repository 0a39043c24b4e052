"""A Linux guest on packed virtqueues (VIRTIO 1.2 §2.8): QEMU's
``virtio-net-pci,...,packed=on`` on vhost-user to ``vqscope serve net --tap``.

One guest boot (tests/support/peers.py AttachVM, with ``packed=True``,
``tap=True``, ``reconnect=True``) for every test here, in order:

- the guest pings the host through the tap; the back-end's snapshot shows
  both vrings with ``"layout": "packed"``, positions the device gave
  (``"positions": "device"``) and advancing by at least the frames the guest
  sent and received, with no anomaly;
- the back-end is killed with SIGKILL and a new one started on the same
  socket and tap: QEMU (``reconnect=1``) connects again and the guest's
  network works on, as test_reconnect.py checks for split rings. QEMU keeps
  no copy of a packed ring's positions it could refresh from guest memory
  (virtio_queue_packed_restore_last_avail_idx does nothing: "We don't have
  a reference like avail idx in shared memory"), so the new back-end's
  SET_VRING_BASE carries the positions of the last vhost start; the back-end
  finds where the rings really are (inspector/vhost_user/packed_resume.py)
  and says so in one warning per vring. The test prints what QEMU sent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from inspector.datapath.packed_queue import decode_vring_base
from inspector.ring.packed import packed_counter, packed_distance
from tests.conftest import require, wait_for
from tests.integration.test_reconnect import _vring_bases
from tests.support.peers import AttachVM, PeerError, backend_kind, require_guest, vq_rx, vq_tx

pytestmark = pytest.mark.qemu

PINGS = 5


@pytest.fixture(scope="module")
def vm():
    require_guest("QEMU's vhost-user guest and the tap need root")
    require(backend_kind() == "vqscope", "the packed-ring tests read and restart vqscope serve")
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    with AttachVM(tap=True, reconnect=True, traffic=False, packed=True) as v:
        yield v


def _queues(snap: dict) -> dict[int, dict]:
    return {q["index"]: q for q in snap["queues"]}


def _used_counter(q: dict) -> int:
    return packed_counter(q["next_used"], q["used_wrap_counter"], q["size"])


def _ping(vm: AttachVM, n: int) -> tuple[int, int]:
    out = vm.command(f"ping {n}", timeout=120)
    m = re.search(r"VQS-PING sent=(\d+) received=(\d+)", out)
    assert m, f"no ping summary from the guest:\n{out}\n{vm.tail()}"
    return int(m.group(1)), int(m.group(2))


def _guest_errors(vm: AttachVM) -> str:
    """The guest kernel's virtio_ring complaints (a used id that is not
    outstanding, a broken queue), if any."""
    out = vm.command("dmesg")
    lines = out[out.index("VQS-DMESG-BEGIN"):out.index("VQS-DMESG-END")]
    return "\n".join(ln for ln in lines.splitlines()
                     if re.search(r"not a head|unexpected|out of range|is broken|bad", ln, re.I))


def _fmt_bases(bases: dict[int, list[int]]) -> dict[int, list[tuple[int, int, int, int]]]:
    """Each packed SET_VRING_BASE as (last_avail_idx, wrap, next_used, wrap)."""
    return {i: [decode_vring_base(n) for n in nums] for i, nums in bases.items()}


def _positions(qs: dict[int, dict]) -> dict[int, tuple]:
    return {i: (q.get("last_avail_idx"), q.get("last_avail_wrap_counter"), q.get("next_used"),
                q.get("used_wrap_counter"), q.get("next_avail"), q.get("avail_wrap_counter"), q.get("inflight"))
            for i, q in sorted(qs.items())}


def _check_packed(q: dict) -> None:
    assert q["layout"] == "packed", q
    for split_only in ("avail_idx", "used_idx", "avail_flags", "used_flags", "used_event", "avail_event"):
        assert q.get(split_only) is None, (split_only, q)
    assert q["positions"] == "device", q
    assert not q.get("anomalies"), q


@pytest.mark.timeout(600)
def test_guest_pings_through_tap_on_packed_rings(vm):
    try:
        before = _queues(vm.backend.snapshot())
        for i in (vq_rx(0), vq_tx(0)):
            _check_packed(before[i])
        sent, received = _ping(vm, PINGS)
        assert (sent, received) == (PINGS, PINGS), f"guest ping: {received} of {sent} replies\n{vm.tail()}"
        after = _queues(vm.backend.snapshot())
        print(f"packed rings before {[(i, q['next_used'], q['used_wrap_counter'], q['packets']) for i, q in sorted(before.items())]}"
              f" after {[(i, q['next_used'], q['used_wrap_counter'], q['packets']) for i, q in sorted(after.items())]}")
        for i in (vq_rx(0), vq_tx(0)):
            q, q0 = after[i], before[i]
            _check_packed(q)
            assert q["packets"] - q0["packets"] >= PINGS, (q0, q)
            # One used descriptor per frame at least: the device's used position moved that far.
            moved = packed_distance(_used_counter(q0), _used_counter(q), q["size"])
            assert moved >= PINGS, f"vring {i}: next_used moved {moved} slots for {PINGS} frames: {q0} -> {q}"
        # The guest keeps its RX ring stocked: buffers the device has not returned.
        assert after[vq_rx(0)]["inflight"] > 0, after[vq_rx(0)]
        assert not _guest_errors(vm)
    except PeerError as e:
        raise AssertionError(f"{e}\n{vm.tail()}") from None


@pytest.mark.timeout(600)
def test_sigkill_restart_guest_network_resumes_on_packed_rings(vm):
    try:
        assert _ping(vm, 2)[1] == 2, vm.tail()
        before = _queues(vm.backend.snapshot())
        old_bases = _vring_bases(vm.sock)
        proc = vm.backend.peer.proc
        os.kill(proc.pid, signal.SIGKILL)   # no GET_VRING_BASE, no cleanup
        proc.wait(30)
        try:
            vm.restart_backend()
        except PeerError as e:
            new = _queues(vm.backend.snapshot()) if vm.backend is not None else {}
            raise AssertionError(
                f"the new back-end's rings never held the guest's RX buffers: SET_VRING_BASE first session "
                f"{_fmt_bases(old_bases)}, after the restart {_fmt_bases(_vring_bases(vm.sock))}; device "
                f"positions before the kill {_positions(before)}, now {_positions(new)}\n{e}") from None
        bases = _vring_bases(vm.sock)
        sent, received = _ping(vm, 3)
        after = _queues(vm.backend.snapshot())
        errors = _guest_errors(vm)
        resumed = [ln for ln in vm.backend.peer.output.splitlines() if "SET_VRING_BASE gave" in ln]
        print(f"reconnect (packed): SET_VRING_BASE first session {_fmt_bases(old_bases)}, after the restart "
              f"{_fmt_bases(bases)}; positions before the kill {_positions(before)}, after {_positions(after)}; "
              f"the new back-end: {resumed}")
        assert received == 3, f"the guest's ping after the restart: {received} of {sent}\n{vm.tail()}"
        assert not errors, errors
        for i in (vq_rx(0), vq_tx(0)):
            q = after[i]
            _check_packed(q)
            assert q["packets"] >= 3, f"vring {i} moved nothing after the restart: {q}"
        # Every TX buffer the new back-end took it returns.
        assert wait_for(lambda: _queues(vm.backend.snapshot())[vq_tx(0)]["inflight"] == 0, 10, 0.2)
    except PeerError as e:
        raise AssertionError(f"{e}\n{vm.tail()}") from None
