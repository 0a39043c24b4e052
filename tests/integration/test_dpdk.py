"""dpdk-testpmd as a real vhost-user front-end (virtio_user) against
``vqscope serve net --loopback``.

testpmd forwards in io mode (what it receives on queue q it sends back on
queue q) after injecting ``BURSTS`` bursts of 32 64-byte frames per queue
(``start tx_first``); the loopback back-end echoes every frame, so the frames
circulate until testpmd has counted ``MIN_PACKETS`` each way. Then testpmd
``stop`` prints exact per-queue counters, and the back-end's snapshot (taken
through ``vqscope snapshot --connect SOCK --json`` while testpmd is still
connected) must agree: the transmit virtqueue of pair p (index 2p+1) counted
exactly the frames testpmd sent on queue p, and the receive virtqueue (index
2p) delivered at least what testpmd received there, at most a ring's worth
more (frames testpmd had not polled when it stopped).

``VQSCOPE_PEER_BACKEND=dpdk`` runs the same tests against DPDK's own vhost
back-end instead (see tests/support/peers.py).
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import require
from tests.support.peers import (DpdkTestpmd, backend_kind, is_root, socket_dir, start_backend, find_testpmd,
                    virtio_user_vdev, vq_rx, vq_tx, wait_counters)

pytestmark = pytest.mark.dpdk

MIN_PACKETS = 100_000   # each way, over all queues
BURSTS = 4              # tx_first bursts of 32 frames per queue: 128 in flight, half a 256-entry ring
RUN_TIMEOUT = 240.0     # seconds to reach MIN_PACKETS
STALL_TIMEOUT = 30.0    # seconds without any counter moving: traffic has died
DEFAULT_RING = 256      # virtio_user's default queue_size


def _requirements() -> None:
    require(is_root(), "DPDK's virtio_user and vhost need root")
    require(find_testpmd() is not None, "dpdk-testpmd is not installed (Debian 'dpdk'; make deps)")


def _run_until(fe: DpdkTestpmd, be, minimum: int, timeout: float) -> tuple[int, int, float]:
    """Poll testpmd's port counters until both directions reach ``minimum``."""
    t0 = time.monotonic()
    rx = tx = 0
    moved, last = t0, (0, 0)
    while time.monotonic() - t0 < timeout:
        rx, tx = fe.port_stats()[0]
        if rx >= minimum and tx >= minimum:
            return rx, tx, time.monotonic() - t0
        if (rx, tx) != last:
            moved, last = time.monotonic(), (rx, tx)
        elif time.monotonic() - moved > STALL_TIMEOUT:
            break  # traffic stopped: no need to wait for the full timeout
        time.sleep(1.0)
    pytest.fail(f"testpmd counted rx={rx} tx={tx} after {time.monotonic() - t0:.0f} s "
                f"(no progress for {time.monotonic() - moved:.0f} s), wanted {minimum} each way\n"
                f"{fe.tail()}\n{be.tail()}")


@pytest.mark.timeout(480)
@pytest.mark.parametrize("queues,devargs,pmd_args,frame_len", [
    pytest.param(1, {}, [], 64, id="1q"),
    pytest.param(1, {"mrg_rxbuf": 0}, [], 64, id="1q-mrg_rxbuf0"),
    pytest.param(2, {}, [], 64, id="2q"),
    # 1464-byte frames sent as two segments: TX chains of header + 2 buffers.
    pytest.param(1, {}, ["--txpkts=64,1400", "--tx-offloads=0x8000"], 1464, id="1q-2seg-1464B"),
    # Packed rings (VIRTIO 1.2 §2.8): mrg_rxbuf 0/1 x in_order 0/1, and two queue pairs.
    pytest.param(1, {"packed_vq": 1}, [], 64, id="packed-1q"),
    pytest.param(1, {"packed_vq": 1, "mrg_rxbuf": 0}, [], 64, id="packed-1q-mrg_rxbuf0"),
    pytest.param(1, {"packed_vq": 1, "mrg_rxbuf": 0, "in_order": 1}, [], 64, id="packed-1q-mrg_rxbuf0-in_order"),
    pytest.param(2, {"packed_vq": 1, "in_order": 1}, [], 64, id="packed-2q-in_order"),
])
def test_testpmd_io_forward_counters_match_snapshot(queues: int, devargs: dict, pmd_args: list[str],
                                                    frame_len: int) -> None:
    _requirements()
    layout = "packed" if devargs.get("packed_vq") else "split"
    d = socket_dir()
    sock = f"{d}/vu.sock"
    try:
        with start_backend(sock, queues=queues) as be, \
             DpdkTestpmd([virtio_user_vdev(sock, queues, **devargs)], main_lcore=1, queues=queues,
                         extra=pmd_args, name="testpmd virtio_user front-end") as fe:
            fe.start(tx_first=BURSTS)
            rx, tx, secs = _run_until(fe, be, MIN_PACKETS, RUN_TIMEOUT)
            st = fe.stop()
            # The back-end may still be draining the TX rings: wait until it
            # has taken what testpmd sent and its counters stand still.
            counts = wait_counters(be, {vq_tx(p): st.tx[(0, p)] for p in range(queues)})
            snap = be.snapshot() if be.kind == "vqscope" else None
            print(f"[{backend_kind()}] {queues}q {devargs} {pmd_args}: rx={rx} tx={tx} in {secs:.1f} s "
                  f"(~{(rx + tx) / 2 / secs:,.0f} pps each way); testpmd {st}; back-end {counts}")

            assert sum(st.rx[(0, p)] for p in range(queues)) >= MIN_PACKETS
            assert sum(st.tx[(0, p)] for p in range(queues)) >= MIN_PACKETS
            # (testpmd's TX-dropped — frames it could not put on a full TX ring
            # — never reach the ring, so they are in neither count.)
            rings = {q["index"]: q["size"] for q in snap["queues"]} if snap else {}
            for p in range(queues):
                sent, got = st.tx[(0, p)], st.rx[(0, p)]
                taken, delivered = counts.get(vq_tx(p)), counts.get(vq_rx(p))
                assert sent > 0 and got > 0, f"queue pair {p} carried no traffic: {st}"
                assert taken == sent, (f"pair {p}: back-end's TX virtqueue {vq_tx(p)} counted {taken} "
                                       f"frames, testpmd sent {sent}")
                ring = rings.get(vq_rx(p), DEFAULT_RING)
                assert got <= delivered <= got + ring, (
                    f"pair {p}: back-end delivered {delivered} frames on RX virtqueue {vq_rx(p)}, "
                    f"testpmd received {got} (ring {ring})")
                assert delivered <= taken, f"pair {p}: loopback delivered {delivered} > taken {taken}"
            if snap is not None:
                by_index = {q["index"]: q for q in snap["queues"]}
                for p in range(queues):
                    for i in (vq_rx(p), vq_tx(p)):
                        q = by_index[i]
                        assert q["bytes"] >= frame_len * q["packets"], (
                            f"virtqueue {i}: {q['bytes']} bytes for {q['packets']} frames of {frame_len}")
                        assert q["layout"] == layout and q["size"] > 0
                        if layout == "packed":
                            # the device's own positions, and its ring moved on
                            assert q["positions"] == "device"
                            assert q["next_used"] is not None and q["used_wrap_counter"] in (0, 1)
    finally:
        shutil.rmtree(d, ignore_errors=True)
