"""A Linux guest (Debian's kernel, booted by virtme-ng under QEMU/TCG) drives
``vqscope serve net`` through QEMU's vhost-user virtio-net-pci device.

The guest script finds the virtio-net interface by its MAC, configures it,
sends frames, prints markers (``VQS-...``) on stdout and then waits on stdin
(``read``) so the host can take the back-end's snapshot while the device is
still running. See tests/support/peers.py for the vng command line.

``VQSCOPE_PEER_BACKEND=dpdk`` runs the same tests against DPDK's own vhost
back-end (plus DPDK's ``net_tap`` for the tap test).
"""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import require
from tests.support.peers import (PEER_MAC, Guest, backend_kind, delete_link, find_testpmd, guest_if_up, host_subnet,
                    ip, link_stat, require_guest, socket_dir, start_backend, tap_name, vq_rx, vq_tx,
                    wait_path)

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 240.0   # TCG boot of Debian's kernel: ~25 s alone, much more on a busy 2-core host
PINGS = 20


def _requirements() -> None:
    require_guest("QEMU's vhost-user guest and the tap need root")
    if backend_kind() == "dpdk":
        require(find_testpmd() is not None, "dpdk-testpmd is not installed")


def _stats(out: str) -> dict[str, int]:
    m = re.search(r"^VQS-STATS (.*)$", out, re.M)
    assert m, "guest printed no VQS-STATS line"
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


@pytest.mark.timeout(420)
def test_guest_frames_echoed_by_loopback() -> None:
    """The guest sends PINGS ICMP echo requests to a static neighbour; the
    loopback back-end takes each from TX virtqueue 1 and delivers it, MACs
    swapped, on RX virtqueue 0, where the guest driver counts it."""
    _requirements()
    sub = host_subnet()
    script = guest_if_up(sub) + f"""ip neigh replace {sub}.1 lladdr {PEER_MAC} dev "$IF" nud permanent
tx0=$(st tx_packets); rx0=$(st rx_packets)
ping -c {PINGS} -i 0.05 -W 1 {sub}.1
sleep 1
echo "VQS-STATS tx=$(( $(st tx_packets) - tx0 )) rx=$(( $(st rx_packets) - rx0 )) tx_total=$(st tx_packets) rx_total=$(st rx_packets)"
ip -s link show "$IF"
echo VQS-READY
read x
"""
    d = socket_dir()
    sock = f"{d}/vu.sock"
    try:
        with start_backend(sock) as be, Guest(sock, script) as guest:
            guest.expect(r"^VQS-READY", BOOT_TIMEOUT)
            counts = be.queue_packets()          # while the device is live
            guest.release()
            rc = guest.finish()
            out = guest.output
            print(out[-1500:], f"\n[{backend_kind()}] back-end counters: {counts}")
            assert rc == 0, f"guest script exited with {rc}\n{guest.tail()}"
            g = _stats(out)
            assert g["tx"] >= PINGS, f"guest driver sent only {g['tx']} frames: {g}"
            assert g["rx"] >= PINGS, f"guest driver received only {g['rx']} echoed frames: {g}"
            assert counts[vq_tx(0)] >= max(PINGS, g["tx_total"]), \
                f"back-end's TX virtqueue 1 counted {counts[vq_tx(0)]} frames, guest sent {g}"
            assert counts[vq_rx(0)] >= max(PINGS, g["rx_total"]), \
                f"back-end's RX virtqueue 0 delivered {counts[vq_rx(0)]} frames, guest received {g}"
            assert counts[vq_rx(0)] <= counts[vq_tx(0)], "loopback delivered more than it took"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(420)
def test_guest_pings_host_through_tap() -> None:
    """With ``--tap``, the guest's ICMP echo requests reach the host's stack
    through the tap and the host's replies come back to the guest."""
    _requirements()
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    sub = host_subnet()
    tap = tap_name()
    script = guest_if_up(sub) + f"""echo VQS-UP
read go
ping -c 5 -i 0.2 -w 60 {sub}.1
echo "VQS-PING-RC=$?"
echo VQS-READY
read x
"""
    d = socket_dir()
    sock = f"{d}/vu.sock"
    try:
        with start_backend(sock, tap=tap) as be, Guest(sock, script) as guest:
            guest.expect(r"^VQS-UP", BOOT_TIMEOUT)
            wait_path(f"/sys/class/net/{tap}", 30)
            ip("addr", "add", f"{sub}.1/24", "dev", tap)
            ip("link", "set", tap, "up")
            guest.release()
            guest.expect(r"^VQS-READY", 120)
            counts = be.queue_packets()
            tap_rx, tap_tx = link_stat(tap, "rx_packets"), link_stat(tap, "tx_packets")
            guest.release()
            rc = guest.finish()
            out = guest.output
            print(out[-1500:], f"\n[{backend_kind()}] back-end counters: {counts}; "
                               f"tap {tap} rx={tap_rx} tx={tap_tx}")
            assert rc == 0, f"guest script exited with {rc}\n{guest.tail()}"
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert m, f"no ping summary in the guest's output\n{guest.tail()}"
            assert int(m.group(2)) == 5, f"guest got {m.group(2)} of 5 replies from {sub}.1: {m.group(0)}"
            assert "VQS-PING-RC=0" in out
            # Requests (and ARP) went guest -> TX virtqueue -> tap -> host;
            # replies host -> tap -> RX virtqueue -> guest.
            assert tap_rx >= 5 and tap_tx >= 5, f"tap {tap}: rx={tap_rx} tx={tap_tx}"
            assert counts[vq_tx(0)] >= 5 and counts[vq_rx(0)] >= 5, counts
            # Everything the back-end delivered to the guest came from the tap
            # (snapshot first, tap counters after: both only grow).
            assert counts[vq_rx(0)] <= tap_tx, f"RX virtqueue 0 delivered {counts[vq_rx(0)]} frames, " \
                                               f"the tap gave {tap_tx}"
    finally:
        delete_link(tap)  # only if the back-end left it behind
        shutil.rmtree(d, ignore_errors=True)

