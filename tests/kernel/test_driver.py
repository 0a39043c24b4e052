"""The userspace vhost-net driver against the real vhost-net of the guest
kernel: frames go through the real handle_tx / handle_rx (runs in the VM
only, see conftest.py)."""

from __future__ import annotations

import os

import pytest

from inspector.tools.vhost_net_load import (
    VHOST_NET_VQ_RX,
    VHOST_NET_VQ_TX,
    VHOST_SET_VRING_NUM,
    VHOST_VRING_STATE,
    VhostNetDriver,
    VhostNetError,
)

N_TX = 16
M_RX = 12


@pytest.fixture(scope="module")
def driver():
    with VhostNetDriver(size=64) as drv:
        yield drv


def test_tx_frames_reach_the_tap(driver):
    frames = driver.send(N_TX)
    assert len(frames) == N_TX
    c = driver.counters[VHOST_NET_VQ_TX]
    assert (c.kicks, c.used, c.used_idx) == (1, N_TX, N_TX)
    assert c.calls >= 1  # vhost signals the call eventfd after adding used entries


def test_rx_frames_land_in_buffers(driver):
    frames = driver.receive(M_RX)
    assert len(frames) == M_RX
    c = driver.counters[VHOST_NET_VQ_RX]
    assert (c.kicks, c.used, c.used_idx) == (1, M_RX, M_RX)


def test_vring_base_is_the_used_count(driver):
    # VHOST_GET_VRING_BASE returns vhost's last_avail_idx: every buffer made
    # available was taken (and returned) by now.
    assert driver.vring_base(VHOST_NET_VQ_TX) == driver.counters[VHOST_NET_VQ_TX].used_idx
    assert driver.vring_base(VHOST_NET_VQ_RX) == driver.counters[VHOST_NET_VQ_RX].used_idx


def test_failed_ioctl_names_ioctl_and_errno(driver):
    # vhost refuses to resize a vring whose back-end is set (EBUSY).
    with pytest.raises(VhostNetError, match=r"VHOST_SET_VRING_NUM .*errno \d+"):
        driver._ioctl(driver.vhost_fd, VHOST_SET_VRING_NUM, VHOST_VRING_STATE.pack(0, 32),
                      "VHOST_SET_VRING_NUM")


def test_close_releases_fds_and_tap():
    before = set(os.listdir("/proc/self/fd"))
    drv = VhostNetDriver(size=8)
    tap = drv.tap
    assert os.path.exists(f"/sys/class/net/{tap}")
    drv.send(2)
    drv.close()
    drv.close()  # idempotent
    assert set(os.listdir("/proc/self/fd")) == before
    assert not os.path.exists(f"/sys/class/net/{tap}")  # a non-persistent tap goes with its fd
