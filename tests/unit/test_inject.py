"""Faults on purpose (inspector/faults.py) made by real peers.

The SPEC parser, then each fault end to end: vqscope's back-end (an
in-process VhostUserServer with the C data path) and its built-in front-end
over a real Unix socket, memfd memory and eventfds. Each test reads the
queue's numbers from the back-end's snapshot, as the doctor does:

- ``stall`` (device): kicks grow, shadow_avail_idx moves, used_idx does not;
  served again when the fault ends, without a new kick. On RX, frames are
  dropped and counted in ``dropped``.
- ``drop-calls`` (device): calls stop, used_idx moves, calls_dropped grows.
- ``withhold-kicks`` (driver): kicks stop, shadow_avail_idx stays behind
  avail_idx.
- ``stop-consuming`` RX (driver): RX dropped grows, TX still returned.

No absolute times are asserted: faults last seconds, the checks wait for
conditions.
"""

from __future__ import annotations

import os
import signal

import pytest

from inspector.cli import main
from inspector.devices.net import NetDevice
from inspector.errors import ArgumentError
from inspector.faults import DEVICE_FAULTS, DRIVER_FAULTS, Fault, parse_fault
from inspector.introspect.snapshot import backend_snapshot
from inspector.snapshot.model import QueueEntry
from inspector.spec.virtio import RING_EVENT_FLAGS_DESC
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.server import VhostUserServer
from tests.conftest import wait_for

FRAME = bytes.fromhex("0a0000000001" "525400123456" "88b5") + bytes(50)
RX, TX = 0, 1


# --- the SPEC parser ----------------------------------------------------------------

def test_parse_fault_forms():
    assert parse_fault("stall=1") == Fault("stall", 1)
    assert parse_fault("drop-calls=0,after=2.5") == Fault("drop-calls", 0, 2.5)
    assert parse_fault("withhold-kicks=3, for=1 ,after=0") == Fault("withhold-kicks", 3, 0.0, 1.0)
    f = parse_fault("stop-consuming=0,after=2,for=3")
    assert str(f) == "stop-consuming=0,after=2,for=3" and parse_fault(str(f)) == f
    assert (f.side, parse_fault("stall=0").side) == ("driver", "device")
    # active on [after, after + for), and when that changes
    assert [f.active(t) for t in (1.9, 2.0, 4.9, 5.0)] == [False, True, True, False]
    assert (f.next_change(0.5), f.next_change(3.0), f.next_change(6)) == (1.5, 2.0, None)
    assert parse_fault("stall=1").next_change(100) is None


@pytest.mark.parametrize("spec,names", [
    ("stal=1", "kind 'stal'"),
    ("stall", "VRING ''"),
    ("stall=x", "VRING 'x'"),
    ("stall=-1", "VRING '-1'"),
    ("stall=1,after=-2", "after='-2'"),
    ("stall=1,after=nan", "after='nan'"),
    ("stall=1,for=0", "for='0'"),
    ("stall=1,for=soon", "for='soon'"),
    ("stall=1,until=3", "option 'until=3'"),
    ("stall=1,after", "option 'after'"),
    ("stall=1,after=1,after=2", "after= is given twice"),
])
def test_parse_fault_names_the_bad_part(spec, names):
    with pytest.raises(ArgumentError) as e:
        parse_fault(spec)
    assert names in str(e.value) and repr(spec) in str(e.value)


def test_serve_refuses_bad_inject_with_usage_error(capsys, tmp_path):
    sock = str(tmp_path / "s.sock")
    for spec, names in (("stall=1,for=x", "for='x'"),
                        ("withhold-kicks=1", "withhold-kicks is a driver fault"),
                        ("stall=2", "vring 2 does not exist")):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(main(["serve", "net", "--socket", sock, "--inject", spec]))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert names in err and repr(spec) in err, err
    with pytest.raises(SystemExit) as e:
        main(["demo", "--headless", "--inject", "nap=0"])
    assert e.value.code == 2 and "kind 'nap'" in capsys.readouterr().err


def test_device_and_front_end_take_only_their_faults(tmp_path):
    with pytest.raises(ArgumentError, match="not a device fault"):
        NetDevice(faults=[parse_fault("withhold-kicks=1")])
    with pytest.raises(ArgumentError, match="vring 5 does not exist"):
        NetDevice(faults=[parse_fault("stall=5")])
    assert set(DEVICE_FAULTS) | set(DRIVER_FAULTS) == {"stall", "drop-calls", "hold-io",
                                                       "withhold-kicks", "stop-consuming"}


# --- end to end -----------------------------------------------------------------------

def serve(tmp_path, *specs: str) -> VhostUserServer:
    faults = [parse_fault(s) for s in specs]
    return VhostUserServer(str(tmp_path / "vu.sock"),
                           lambda: NetDevice(queue_pairs=1, busy_poll_us=50, faults=faults),
                           snapshot_fn=backend_snapshot)


def frontend(srv: VhostUserServer, *specs: str, packed: bool = False) -> VhostUserFrontend:
    """The built-in front-end; split rings (the checks below read split
    fields) unless ``packed``."""
    return VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=2 << 20, event_idx=True,
                             mrg_rxbuf=True, faults=[parse_fault(s) for s in specs], packed=packed)


def queue(srv: VhostUserServer, index: int) -> QueueEntry:
    """The snapshot entry of vring ``index`` of the (one) connection."""
    snap = backend_snapshot(srv)
    return next(q for q in snap.queues if q.index == index)


def pump(fe: VhostUserFrontend, n: int = 16, timeout: float = 10.0) -> int:
    """Post n RX buffers, send n frames and count the echoes (collected by
    polling: no call is needed)."""
    fe.post_rx_buffers(0, n)
    sent = fe.send_frames(0, [FRAME] * n)
    got: list[bytes] = []

    def echoed() -> bool:
        fe.poll_tx_done(0)
        got.extend(fe.recv_frames(0))
        return len(got) >= sent

    wait_for(echoed, timeout)
    return len(got)


def device_sleeps(fe: VhostUserFrontend, index: int) -> bool:
    """The device asks for a kick at the driver's avail_idx (EVENT_IDX):
    it went idle and sleeps on the kick eventfd."""
    ring = fe.queues[index].ring
    return ring.avail_event == ring.avail_idx


@pytest.mark.timeout(60)
def test_stall_tx_counts_kicks_reads_avail_returns_nothing_then_resumes(tmp_path):
    with serve(tmp_path, "stall=1,for=4") as srv, frontend(srv) as fe:
        fe.post_rx_buffers(0, 32)
        assert fe.send_frames(0, [FRAME] * 8) == 8
        assert wait_for(lambda: queue(srv, TX).shadow_avail_idx == 8, timeout=10)
        q = queue(srv, TX)
        assert q.kicks >= 1 and q.used_idx == 0 and q.last_avail_idx == 0 and q.avail_idx == 8
        assert q.device_type == "net" and q.dropped is None
        assert q.extras["inject"] == {"faults": ["stall=1,for=4"], "active": ["stall=1,for=4"],
                                      "calls_dropped": 0}
        kicks = q.kicks
        # The stalled device asked for the next kick at what it read: the driver kicks again.
        assert fe.send_frames(0, [FRAME] * 8) == 8
        assert wait_for(lambda: queue(srv, TX).shadow_avail_idx == 16, timeout=10)
        q = queue(srv, TX)
        assert q.kicks > kicks and q.used_idx == 0 and fe.tx(0).kicks >= 2
        assert queue(srv, RX).used_idx == 0
        # The fault ends: served again without a new kick.
        kicks_sent = fe.tx(0).kicks
        assert wait_for(lambda: queue(srv, TX).used_idx == 16, timeout=20)
        assert fe.tx(0).kicks == kicks_sent
        assert wait_for(lambda: queue(srv, RX).used_idx == 16, timeout=10)
        assert queue(srv, TX).extras["inject"]["active"] == []
        assert len(fe.recv_frames(0)) == 16


@pytest.mark.timeout(60)
def test_stall_rx_drops_frames_counts_kicks_tx_returned(tmp_path):
    with serve(tmp_path, "stall=0,for=3") as srv, frontend(srv) as fe:
        assert fe.post_rx_buffers(0, 8) == 8
        assert wait_for(lambda: queue(srv, RX).shadow_avail_idx == 8, timeout=10)
        assert fe.send_frames(0, [FRAME] * 5) == 5
        assert wait_for(lambda: queue(srv, TX).used_idx == 5, timeout=10)
        assert wait_for(lambda: queue(srv, RX).dropped == 5, timeout=10)
        rx = queue(srv, RX)
        assert rx.used_idx == 0 and rx.last_avail_idx == 0 and rx.kicks >= 1
        assert fe.poll_tx_done(0) == 5 and fe.recv_frames(0) == []
        # More RX buffers: the stalled device notices (asked for that kick) and takes none.
        assert fe.post_rx_buffers(0, 8) == 8
        assert wait_for(lambda: queue(srv, RX).shadow_avail_idx == 16, timeout=10)
        # After the fault, frames land in the buffers posted meanwhile.
        assert wait_for(lambda: queue(srv, RX).extras["inject"]["active"] == [], timeout=20)
        assert fe.send_frames(0, [FRAME] * 4) == 4
        assert wait_for(lambda: queue(srv, RX).used_idx == 4, timeout=10)
        assert queue(srv, RX).dropped == 5 and len(fe.recv_frames(0)) == 4


def _event_kinds(srv: VhostUserServer, index: int) -> list[str]:
    """Kinds of every event of vring ``index`` the server collected (it
    drains the device's logs every 50 ms)."""
    srv.drain_events()
    return [kind for _, _, q, kind, _ in srv.read_events(0, 1 << 20, binary=False)["events"] if q == index]


@pytest.mark.timeout(60)
def test_drop_calls_rx_loses_due_calls_used_moves(tmp_path):
    with serve(tmp_path, "drop-calls=0,for=3") as srv, frontend(srv) as fe:
        for _ in range(3):
            assert pump(fe, 8) == 8                # collected by polling, used_event re-armed
            assert not fe.wait_call(0, 0.1, which="rx")      # no call came on RX
        rx = queue(srv, RX)
        assert rx.used_idx == 24 and rx.calls == 0
        assert rx.extras["inject"]["calls_dropped"] >= 1
        assert "call" not in _event_kinds(srv, RX) and "call" in _event_kinds(srv, TX)
        assert queue(srv, TX).calls >= 1 and fe.rx(0).calls == 0
        # After the fault, calls come again.
        assert wait_for(lambda: queue(srv, RX).extras["inject"]["active"] == [], timeout=20)
        dropped = queue(srv, RX).extras["inject"]["calls_dropped"]
        fe.post_rx_buffers(0, 8)
        fe.send_frames(0, [FRAME] * 8)
        assert fe.wait_call(0, 10, which="rx")
        assert wait_for(lambda: queue(srv, RX).calls >= 1 and "call" in _event_kinds(srv, RX))
        assert queue(srv, RX).extras["inject"]["calls_dropped"] == dropped


@pytest.mark.timeout(60)
def test_withhold_kicks_tx_device_never_looks(tmp_path):
    with serve(tmp_path) as srv, frontend(srv) as fe:
        assert pump(fe) == 16
        assert wait_for(lambda: device_sleeps(fe, TX), timeout=10)
        before = queue(srv, TX)
        assert before.shadow_avail_idx == before.avail_idx == 16 and "inject" not in before.extras
        kicks_sent = fe.tx(0).kicks
        fe.set_faults([parse_fault("withhold-kicks=1")])
        fe.post_rx_buffers(0, 8)
        assert fe.send_frames(0, [FRAME] * 8) == 8
        assert fe.send_frames(0, [FRAME] * 4) == 4
        assert fe.tx(0).kicks == kicks_sent and fe.tx(0).kicks_withheld == 2
        assert not wait_for(lambda: queue(srv, TX).used_idx != 16, timeout=1.0)
        q = queue(srv, TX)
        assert q.avail_idx == 28 and q.shadow_avail_idx == 16 and q.last_avail_idx == 16
        assert q.kicks == before.kicks and q.used_idx == 16
        # The fault ends: the next publish kicks for everything withheld.
        fe.set_faults([])
        assert fe.send_frames(0, [FRAME]) == 1 and fe.tx(0).kicks == kicks_sent + 1
        assert wait_for(lambda: queue(srv, TX).used_idx == 29, timeout=10)


@pytest.mark.timeout(60)
def test_stop_consuming_rx_shows_on_rx_not_tx(tmp_path):
    with serve(tmp_path) as srv, frontend(srv) as fe:
        assert pump(fe) == 16
        fe.post_rx_buffers(0, 8)                    # 8 buffers left for the device to fill
        fe.set_faults([parse_fault("stop-consuming=0")])
        used_event = fe.rx(0).ring.used_event
        sent = 0
        for _ in range(3):
            assert fe.post_rx_buffers(0, 8) == 0   # no refill
            fe.poll_tx_done(0)
            sent += fe.send_frames(0, [FRAME] * 8)
            assert fe.recv_frames(0) == []        # no used collected
            assert not fe.wait_call(0, 0.05, which="rx")
        assert wait_for(lambda: queue(srv, TX).used_idx == 16 + sent, timeout=10)
        assert wait_for(lambda: queue(srv, RX).dropped == sent - 8, timeout=10)
        rx = queue(srv, RX)
        assert rx.used_idx == 24 and rx.avail_idx == 24 and rx.used_event == used_event
        assert fe.poll_tx_done(0) > 0               # TX is still collected


# --- the commands ------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_serve_process_stalls_tx_and_says_so(tmp_path):
    """`vqscope serve net --inject stall=1` in its own process, read through
    its introspection socket as the doctor reads it (BackendSource)."""
    import subprocess

    from inspector.sources.backend import BackendSource
    from tests.conftest import ROOT, VQSCOPE

    sock = str(tmp_path / "vq.sock")
    proc = subprocess.Popen(VQSCOPE + ["serve", "net", "--socket", sock, "--inject", "stall=1"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: os.path.exists(sock + ".introspect") or proc.poll() is not None, 20)
        assert proc.poll() is None
        with VhostUserFrontend(sock, event_idx=True, mrg_rxbuf=True, packed=False) as fe, \
                BackendSource(sock) as src:
            fe.post_rx_buffers(0, 8)
            assert fe.send_frames(0, [FRAME] * 4) == 4

            def tx():
                return next(q for q in src.snapshot().queues if q.index == TX)

            assert wait_for(lambda: tx().shadow_avail_idx == 4, 20)
            q = tx()
            assert (q.avail_idx, q.last_avail_idx, q.used_idx) == (4, 0, 0) and q.kicks >= 1
            assert q.device_type == "net" and q.extras["inject"]["active"] == ["stall=1"]
            rx = next(q for q in src.snapshot().queues if q.index == RX)
            assert rx.dropped == 0 and rx.used_idx == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        proc.stderr.close()
    assert "faults on purpose: stall=1" in err and "vring 1: faults on purpose in force now: stall" in err, err


@pytest.mark.timeout(90)
def test_demo_stop_consuming_rx_drops_on_rx():
    import json
    import subprocess

    from tests.conftest import ROOT, VQSCOPE

    out = subprocess.run(VQSCOPE + ["demo", "--headless", "--duration", "2", "--json", "--split",
                                    "--inject", "stop-consuming=0,after=0.5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    qs = {q["index"]: q for q in json.loads(out.stdout)["queues"]}
    rx, tx = qs[RX], qs[TX]
    assert rx["dropped"] > 0 and "dropped" not in tx
    assert rx["used_event"] != rx["used_idx"]                # the driver stopped collecting
    assert tx["used_idx"] > rx["used_idx"] and tx["anomalies"] == rx["anomalies"] == []


def test_load_vhost_net_refuses_bad_withhold_before_opening_anything():
    from argparse import Namespace

    from inspector.tools.vhost_net_load import VhostNetError, load_main

    base = dict(size=64, tap="vqs%d", tx=1, rx=1, hold=10.0, every=0.0)
    with pytest.raises(VhostNetError, match="--withhold-kicks 65"):
        load_main(Namespace(**base, withhold_kicks=65, withhold_after=0.0))
    with pytest.raises(VhostNetError, match="--withhold-after 10"):
        load_main(Namespace(**base, withhold_kicks=4, withhold_after=10.0))


# --- the driver faults on packed rings (VIRTIO 1.2 §2.8) ------------------------------------------
def packed_device_sleeps(fe: VhostUserFrontend, index: int) -> bool:
    """The device asks for a kick at the driver's next slot (DESC at
    next_avail / avail_wrap_counter, §2.8.10): it went idle."""
    ring = fe.queues[index].ring
    flags, off, wrap = ring.device_event
    return flags == RING_EVENT_FLAGS_DESC and (off, wrap) == (ring.next_avail, ring.avail_wrap_counter)


@pytest.mark.timeout(60)
def test_withhold_kicks_on_a_packed_tx_ring(tmp_path):
    with serve(tmp_path) as srv, frontend(srv, packed=True) as fe:
        assert fe.packed and pump(fe) == 16
        assert wait_for(lambda: packed_device_sleeps(fe, TX), timeout=10)
        before = queue(srv, TX)
        assert before.layout == "packed" and before.next_used == 16
        kicks_sent = fe.tx(0).kicks
        fe.set_faults([parse_fault("withhold-kicks=1")])
        fe.post_rx_buffers(0, 8)
        assert fe.send_frames(0, [FRAME] * 8) == 8
        assert fe.send_frames(0, [FRAME] * 4) == 4
        assert fe.tx(0).kicks == kicks_sent and fe.tx(0).kicks_withheld == 2
        assert not wait_for(lambda: queue(srv, TX).next_used != 16, timeout=1.0)
        q = queue(srv, TX)
        assert q.next_avail == 28 and q.last_avail_idx == 16 and q.kicks == before.kicks
        fe.set_faults([])
        assert fe.send_frames(0, [FRAME]) == 1 and fe.tx(0).kicks == kicks_sent + 1
        assert wait_for(lambda: queue(srv, TX).next_used == 29, timeout=10)


@pytest.mark.timeout(60)
def test_stop_consuming_on_a_packed_rx_ring(tmp_path):
    with serve(tmp_path) as srv, frontend(srv, packed=True) as fe:
        assert fe.packed and pump(fe) == 16
        fe.post_rx_buffers(0, 8)                    # 8 buffers left for the device to fill
        fe.set_faults([parse_fault("stop-consuming=0")])
        driver_event = fe.rx(0).ring.driver_event
        sent = 0
        for _ in range(3):
            assert fe.post_rx_buffers(0, 8) == 0   # no refill
            fe.poll_tx_done(0)
            sent += fe.send_frames(0, [FRAME] * 8)
            assert fe.recv_frames(0) == []        # no used collected
            assert not fe.wait_call(0, 0.05, which="rx")
        assert wait_for(lambda: queue(srv, TX).next_used == 16 + sent, timeout=10)
        assert wait_for(lambda: queue(srv, RX).dropped == sent - 8, timeout=10)
        rx = queue(srv, RX)
        assert rx.next_used == 24 and rx.next_avail == 24 and fe.rx(0).ring.driver_event == driver_event
        assert fe.poll_tx_done(0) > 0               # TX is still collected
