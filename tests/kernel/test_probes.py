"""The BCC probes watch the userspace vhost-net driver move real frames
through the guest kernel's vhost-net (runs in the VM only, see
conftest.py): what the probes report must equal what the driver did.

The probes are compiled and attached once for the module (BCC compiles are
slow under TCG), before the driver sets the device up, so the ioctl probe
sees every set-up ioctl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from inspector.tools.vhost_net_load import VHOST_NET_VQ_RX, VHOST_NET_VQ_TX, VhostNetDriver
from tests.conftest import require, wait_for

N_TX = 24
M_RX = 20


@dataclass
class Run:
    driver: VhostNetDriver
    vhost: object          # probes.vhost_net.VhostNetProbe
    eventfd: object        # probes.eventfd.EventfdProbe
    ioctl: object | None   # probes.vhost_ioctl.VhostIoctlProbe, when it exists


@pytest.fixture(scope="module")
def run():
    from probes.eventfd import EventfdProbe
    from probes.vhost_net import VhostNetProbe

    pid = os.getpid()
    probes = []
    try:
        vhost = VhostNetProbe(pids=[pid])
        probes.append(vhost)
        vhost.attach()
        evp = EventfdProbe(pids=[pid])
        probes.append(evp)
        evp.attach()
        ioctl = None
        try:
            from probes.vhost_ioctl import VhostIoctlProbe
        except ImportError:
            VhostIoctlProbe = None
        if VhostIoctlProbe is not None:
            ioctl = VhostIoctlProbe(pids=[pid])
            probes.append(ioctl)
            ioctl.attach()
        with VhostNetDriver(size=128) as drv:
            for s in drv.setups:
                name = f"vhost-net:{pid}:{drv.vhost_fd}"
                evp.watch(pid, s.kick_fd, name, s.index, "kick", side="driver")
                evp.watch(pid, s.call_fd, name, s.index, "call", side="driver")
            drv.send(N_TX)
            drv.receive(M_RX)
            yield Run(drv, vhost, evp, ioctl)
    finally:
        for p in probes:
            p.close()


def vq_of(run: Run, index: int):
    """The probe's VhostVqState of the driver's vring ``index`` (matched by
    the desc address the driver set)."""
    want = run.driver.setups[index].desc_user_addr
    states = [s for s in run.vhost.queue_states().values() if s.desc == want]
    assert len(states) == 1, f"vring {index}: {len(states)} probe states with desc {want:#x}"
    return states[0]


def test_vhost_net_handlers_attached(run):
    ok = {ap.wanted for ap in run.vhost.points if ap.ok}
    missing = {"handle_tx_kick", "handle_rx_kick", "vhost_add_used_and_signal_n"} - ok
    assert not missing, [ap.as_dict() for ap in run.vhost.points if ap.wanted in missing]


@pytest.mark.parametrize("index", [VHOST_NET_VQ_RX, VHOST_NET_VQ_TX])
def test_probe_sees_the_ring_the_driver_set(run, index):
    st = vq_of(run, index)
    s = run.driver.setups[index]
    assert (st.owner_pid, st.index, st.num) == (os.getpid(), index, s.num)
    assert (st.desc, st.avail, st.used) == (s.desc_user_addr, s.avail_user_addr, s.used_user_addr)


@pytest.mark.parametrize("index", [VHOST_NET_VQ_RX, VHOST_NET_VQ_TX])
def test_probe_kicks_equal_driver_kicks(run, index):
    st = vq_of(run, index)
    c = run.driver.counters[index]
    assert c.kicks == 1
    # the kick wakes vhost's poll on the kick eventfd (vhost_poll_wakeup) ...
    assert run.vhost.counters()[st.vq]["kicks"] == c.kicks
    # ... and is a write(2) on that eventfd by the driver
    name = f"vhost-net:{os.getpid()}:{run.driver.vhost_fd}"
    assert run.eventfd.counters()[(name, index)]["kicks"] == c.kicks


@pytest.mark.parametrize("index,expected", [(VHOST_NET_VQ_RX, M_RX), (VHOST_NET_VQ_TX, N_TX)])
def test_probe_used_entries_equal_frames(run, index, expected):
    st = vq_of(run, index)
    assert run.driver.counters[index].used == expected
    assert run.vhost.counters()[st.vq]["used_added"] == expected


@pytest.mark.parametrize("index", [VHOST_NET_VQ_RX, VHOST_NET_VQ_TX])
def test_vhost_last_used_idx_equals_used_idx_read(run, index):
    st = vq_of(run, index)
    c = run.driver.counters[index]
    assert st.last_used_idx == c.used_idx == run.driver.rings[index].used_idx
    # every buffer made available was consumed: vhost's last_avail_idx too
    assert st.last_avail_idx == run.driver.rings[index].avail_idx


def test_ioctl_probe_saw_the_setup(run):
    require(run.ioctl is not None, "probes.vhost_ioctl is not available yet")
    pid, fd = os.getpid(), run.driver.vhost_fd
    assert wait_for(lambda: (pid, fd) in run.ioctl.devices(), 5)
    dev = run.ioctl.devices()[(pid, fd)]
    assert dev.owner_set and dev.features == run.driver.features
    assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in dev.mem_table] == \
        run.driver.mem_table
    for s in run.driver.setups:
        vr = dev.vrings[s.index]
        assert (vr.num, vr.desc, vr.avail, vr.used, vr.base) == (
            s.num, s.desc_user_addr, s.avail_user_addr, s.used_user_addr, s.base)
        assert (vr.kick_fd, vr.call_fd, vr.backend_fd) == (s.kick_fd, s.call_fd, run.driver.tap_fd)


def test_tui_vhost_net_shows_both_vrings(run):
    """`vqscope tui --vhost-net PID` in the guest: the app, fed by the
    vhost-net source over the probes this module attached (no second
    compile), lists the driver's two vrings with vhost's indices, and
    enter opens a vring's screen."""
    from inspector.sources.vhost_net import VhostNetSource
    from tests.unit.test_tui import run_app
    from tests.unit.test_tui import wait_for as pilot_wait_for
    from tui.app import VqscopeApp
    from tui.screens.queue import QueueScreen
    from tui.widgets.queue_table import QueueTable

    pid = os.getpid()
    device = f"vhost-net:{pid}:{run.driver.vhost_fd}"
    with VhostNetSource(pid, probes=(run.vhost, run.ioctl)) as source:
        app = VqscopeApp(source, interval=0.2)

        async def body(pilot):
            await pilot_wait_for(pilot, lambda: app.snapshot is not None
                                 and len(app.snapshot.queues) == 2, timeout=30)
            await pilot.pause()
            qs = {q.index: q for q in app.snapshot.queues}
            assert {q.device for q in qs.values()} == {device}
            for index in (VHOST_NET_VQ_RX, VHOST_NET_VQ_TX):
                ring = run.driver.rings[index]
                assert qs[index].used_idx == ring.used_idx
                assert qs[index].extras["device_state"]["last_used_idx"] == ring.used_idx
            table = app.screen.query_one(QueueTable)
            assert table.row_count == 2
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, QueueScreen)
            assert app.screen.queue == (device, VHOST_NET_VQ_RX)

        run_app(app, body)
    # the probes were borrowed: still attached for the other tests
    assert run.vhost.queue_states()


def test_withheld_tx_kicks_leave_vhost_behind(run):
    """``vqscope load vhost-net --withhold-kicks`` (VhostNetDriver.publish_tx
    with kick=False): TX entries published without the kick vhost asked for
    (no EVENT_IDX: VRING_USED_F_NO_NOTIFY is clear while it waits, VIRTIO
    1.2 §2.7.10). vhost never looks: the vhost-net source shows the ring's
    avail_idx ahead of shadow_avail_idx (vhost's vq->avail_idx) and
    last_avail_idx, no new kick and no used entry. Last in this module: the
    TX vring stays so."""
    import time

    from inspector.sources.vhost_net import VhostNetSource
    from inspector.spec.virtio import VRING_USED_F_NO_NOTIFY

    drv = run.driver
    ring = drv.rings[VHOST_NET_VQ_TX]
    device = f"vhost-net:{os.getpid()}:{drv.vhost_fd}"
    st = vq_of(run, VHOST_NET_VQ_TX)
    kicks = run.vhost.counters()[st.vq]["kicks"]
    assert not ring.used_flags & VRING_USED_F_NO_NOTIFY      # vhost waits for a kick
    assert len(drv.publish_tx(4, kick=False)) == 4 and drv.counters[VHOST_NET_VQ_TX].withheld == 4
    time.sleep(1)
    with VhostNetSource(os.getpid(), probes=(run.vhost, run.ioctl)) as source:
        q = source.snapshot().queue(device, VHOST_NET_VQ_TX)
    assert q is not None and q.device_type == "net"
    assert q.avail_idx == ring.avail_idx == st.avail_idx + 4
    assert q.shadow_avail_idx == q.last_avail_idx == ring.avail_idx - 4
    assert q.used_idx == ring.used_idx == ring.avail_idx - 4
    assert q.kicks == kicks
