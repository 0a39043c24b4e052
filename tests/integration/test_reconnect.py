"""SIGKILL and restart of ``vqscope serve`` under a running Linux guest.

QEMU's vhost-user socket is a client chardev with ``reconnect=1``: when the
back-end dies QEMU stops the vhost device (GET_VRING_BASE cannot be asked, so
it takes each ring's last_avail_idx from the used index it reads in guest
memory) and tries to connect again every second. A new ``vqscope serve`` on
the same socket path and tap name gets the whole handshake again, with
SET_VRING_BASE carrying those restored indices, and the guest's network works
again without a reboot. One VM boot for the whole test.

What is checked: the guest's pings before the kill and after the restart
(through the tap, so every frame crossed both virtqueues); the guest kernel's
log has no virtio ring error (Linux's virtio_ring reports a used id that is
not an outstanding head as "id N is not a head!" and marks the queue broken:
that is what a descriptor returned twice or a made-up one looks like); the new
back-end's SET_VRING_BASE of each vring equals the used index the old one had
published (nothing was in flight while the guest waited) and its rings run
with nothing stuck and no anomaly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from inspector.sources.backend import BackendSource

from tests.conftest import require, wait_for
from tests.support.peers import (
    Guest,
    PeerError,
    VqscopeNet,
    backend_kind,
    delete_link,
    guest_if_up,
    host_subnet,
    link_exists,
    require_guest,
    socket_dir,
    tap_name,
    tap_up,
    vq_rx,
    vq_tx,
)

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 240.0
HOST_TAP_MAC = "52:54:00:12:34:58"   # the same on both taps: the guest's ARP entry stays right


def _tap_up(tap: str, sub: str) -> None:
    """Give the back-end's (new) tap the host address and a fixed MAC."""
    tap_up(tap, sub, HOST_TAP_MAC)


def _queues(snap: dict) -> dict[int, dict]:
    return {q["index"]: q for q in snap["queues"]}


def _tx_settled(be) -> bool:
    q = _queues(be.snapshot())[vq_tx(0)]
    return q["last_avail_idx"] == q["used_idx"]


def _vring_bases(sock: str) -> dict[int, list[int]]:
    """``{vring: [num of each SET_VRING_BASE]}`` from the back-end's message log."""
    with BackendSource(sock) as src:
        msgs = src.messages()
    out: dict[int, list[int]] = {}
    for m in msgs:
        if m["request"] == "SET_VRING_BASE" and "error" not in m:
            out.setdefault(m["fields"]["index"], []).append(m["fields"]["num"])
    return out


@pytest.mark.timeout(900)
def test_sigkill_restart_guest_network_resumes() -> None:
    require_guest("QEMU's vhost-user guest and the tap need root")
    require(backend_kind() == "vqscope", "this test kills and restarts vqscope serve itself")
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    sub, tap = host_subnet(), tap_name()
    script = guest_if_up(sub) + f"""echo VQS-UP
read go
ping -c 3 -i 0.2 -w 60 {sub}.1
echo "VQS-PING1-RC=$?"
echo "VQS-STATS1 tx=$(st tx_packets) rx=$(st rx_packets)"
echo VQS-PHASE1
read go
t0=$(date +%s.%N)
ping -c 3 -i 0.5 -w 180 {sub}.1
echo "VQS-PING2-RC=$?"
echo "VQS-PING2-SECONDS=$(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo ?)"
echo "VQS-STATS2 tx=$(st tx_packets) rx=$(st rx_packets) carrier_changes=$(cat /sys/class/net/$IF/carrier_changes)"
echo VQS-DMESG-BEGIN
dmesg | grep -i -E "virtio|vhost|not a head|unexpected" | grep -v -i -E "virtio_blk|9pnet|virtiofs|console"
echo VQS-DMESG-END
echo VQS-READY
read x
"""
    d = socket_dir()
    sock = f"{d}/vu.sock"
    be1 = be2 = guest = None
    try:
        be1 = VqscopeNet(sock, tap=tap)
        guest = Guest(sock, script, chardev_opts=",reconnect=1")
        guest.expect(r"^VQS-UP", BOOT_TIMEOUT)
        _tap_up(tap, sub)
        guest.release()
        guest.expect(r"^VQS-PHASE1", 120)
        assert "VQS-PING1-RC=0" in guest.output, guest.tail()
        time.sleep(1)  # let the last frames settle: nothing in flight at the kill
        before = _queues(be1.snapshot())
        assert before[vq_tx(0)]["packets"] >= 3 and before[vq_rx(0)]["packets"] >= 3, before

        # SIGKILL: no GET_VRING_BASE, no cleanup; the tap goes with the process.
        t_kill = time.monotonic()
        os.kill(be1.peer.proc.pid, signal.SIGKILL)
        be1.peer.proc.wait(30)
        be1.close()
        for _ in range(300):
            if not link_exists(tap):
                break
            time.sleep(0.1)
        assert not link_exists(tap), f"tap {tap} outlived its back-end"
        for p in (sock, sock + ".introspect"):   # stale files: wait_path must see the new ones
            if os.path.exists(p):
                os.unlink(p)

        be2 = VqscopeNet(sock, tap=tap)
        _tap_up(tap, sub)
        be2.peer.wait_for(r"front-end connected", 60)
        t_conn = time.monotonic()
        guest.release()
        guest.expect(r"^VQS-READY", 240)
        t_ping = time.monotonic()
        after = _queues(be2.snapshot())
        # Every TX buffer the new back-end took it returns (a snapshot can
        # catch the worker mid-burst: ask again for a few seconds).
        tx_settled = wait_for(lambda: _tx_settled(be2), 10, 0.2)
        bases = _vring_bases(sock)
        guest.release()
        rc = guest.finish()
        out = guest.output
        print(out[-2500:])
        print(f"reconnect: QEMU connected {t_conn - t_kill:.1f} s after the SIGKILL; the guest's "
              f"second ping finished {t_ping - t_kill:.1f} s after it; SET_VRING_BASE {bases}; "
              f"before {[(i, q['used_idx'], q['last_avail_idx']) for i, q in sorted(before.items())]}; "
              f"after {[(i, q['used_idx'], q['last_avail_idx'], q['packets']) for i, q in sorted(after.items())]}")
        assert rc == 0, f"guest script exited with {rc}\n{guest.tail()}"
        assert "VQS-PING2-RC=0" in out, f"the guest's ping failed after the restart\n{guest.tail()}\n{be2.tail()}"
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out[out.index("VQS-PHASE1"):])
        assert m and int(m.group(2)) == 3, f"second ping: {m and m.group(0)}"
        dmesg = out[out.index("VQS-DMESG-BEGIN"):out.index("VQS-DMESG-END")]
        assert not re.search(r"not a head|unexpected|id \d+ out of range|is broken|bad", dmesg, re.IGNORECASE), dmesg

        # The new session started where the old one had left the rings:
        # QEMU sent the used index it read in guest memory.
        for vq in (vq_rx(0), vq_tx(0)):
            assert vq in bases, f"no SET_VRING_BASE for vring {vq} in the new session: {bases}"
            base = bases[vq][-1]
            was = before[vq]["used_idx"]
            assert 0 <= (base - was) & 0xFFFF < 64, \
                f"vring {vq}: SET_VRING_BASE {base} but the old back-end had published used_idx {was}"
            q = after[vq]
            assert q["packets"] >= 3, f"vring {vq} moved nothing after the restart: {q}"
            assert not q.get("broken"), q
            assert not q.get("anomalies"), q
        assert tx_settled, f"TX vring: last_avail_idx and used_idx never met: {after[vq_tx(0)]}"
    except PeerError as e:
        tails = "\n".join(p.tail() for p in (guest, be1, be2) if p is not None)
        raise AssertionError(f"{e}\n{tails}") from None
    finally:
        if guest is not None:
            guest.close()
        for be in (be1, be2):
            if be is not None:
                be.close()
        delete_link(tap)
        shutil.rmtree(d, ignore_errors=True)
