"""Probes on this host's kernel (root, BPF; no kprobes, no vhost-net):
the tracepoint and uprobe probes attach and count; against our own
back-end driven by dpdk-testpmd (virtio-user), the kicks and calls the
eventfd probe sees equal the back-end's own counters; ``probe --list``,
``--ebpf`` and a non-root run behave.

Each BPF program is compiled once per module (BCC compiles take seconds on
this busy machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import subprocess
import time

import pytest

from probes.attach import KernelInfo, NOT_ROOT, NO_KPROBES, has_bpf_privilege
from probes.eventfd import EventfdProbe
from probes.vhost_ioctl import NUMBERS, VhostIoctlProbe

from tests.conftest import ROOT, VQSCOPE, require, wait_for
from tests.support.peers import (
    DpdkTestpmd,
    VqscopeNet,
    find_testpmd,
    socket_dir,
    virtio_user_vdev,
    wait_counters,
)


def _bcc() -> bool:
    try:
        import bcc  # noqa: F401
        return True
    except ImportError:
        return False


def require_bpf() -> None:
    require(has_bpf_privilege(), "BPF needs root (CAP_BPF + CAP_PERFMON)")
    require(_bcc(), "BCC's Python binding is missing (python3-bpfcc; make deps)")


@pytest.fixture(scope="module")
def efd():
    """One attached eventfd probe (streaming) for the module."""
    require_bpf()
    p = EventfdProbe(stream=True)
    p.attach()
    yield p
    p.close()


@pytest.fixture(scope="module")
def ioctl_probe():
    require_bpf()
    p = VhostIoctlProbe(pids=[os.getpid()], stream=True)
    p.attach()
    yield p
    p.close()


def _totals(counters: dict, device: str) -> dict[str, int]:
    tot: dict[str, int] = {}
    for (dev, _q), c in counters.items():
        if dev == device:
            for k, v in c.items():
                tot[k] = tot.get(k, 0) + v
    return tot


@pytest.mark.timeout(120)
def test_tracepoints_and_uprobes_attach(efd, ioctl_probe):
    kinds = {(ap.kind, ap.wanted): ap for ap in efd.points}
    for tp in ("syscalls:sys_enter_write", "syscalls:sys_enter_read", "syscalls:sys_exit_read"):
        assert kinds[("tracepoint", tp)].status == "attached", kinds[("tracepoint", tp)]
    for sym in ("eventfd_write", "eventfd_read"):
        ap = kinds[("uprobe", sym)]
        assert ap.status == "attached" and ap.target.endswith(f":{sym}") and "libc" in ap.target
    if not KernelInfo.from_system().has_kprobes:
        assert kinds[("kprobe", "irqfd_wakeup")].reason == NO_KPROBES
    assert all(ap.status == "attached" for ap in ioctl_probe.points)


@pytest.mark.timeout(120)
def test_eventfd_counts_in_kernel_and_streams(efd):
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        efd.watch(os.getpid(), kick, "selftest", 0, "kick", side="driver")
        efd.watch(os.getpid(), call, "selftest", 0, "call", side="driver")
        efd.events()  # drop older events
        for _ in range(7):
            os.eventfd_write(kick, 1)          # a driver's kicks (libc eventfd_write -> write(2))
        os.write(call, struct.pack("<Q", 5))   # as if a device called: a plain write(2)
        assert os.eventfd_read(call) == 5      # the driver takes the call
        c = efd.counters()[("selftest", 0)]
        assert (c["kicks"], c["calls"], c["calls_read"]) == (7, 1, 5), c
        assert c["libc_eventfd_write"] == 7 and c["libc_eventfd_read"] == 1, c
        evs = [(e.kind, e.value) for e in efd.events() if e.device == "selftest"]
        # written, then read; a call's value is its used_idx (inspector.events), unknown to an eventfd
        assert evs == [("kick", 1)] * 7 + [("call", 0), ("call", 0)], evs
    finally:
        os.close(kick)
        os.close(call)
    assert efd.lost() == 0


@pytest.mark.timeout(120)
def test_eventfd_stream_events(efd):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        efd.watch(os.getpid(), fd, "streamtest", 3, "", side="device")
        efd.events()
        for i in range(1, 4):
            os.write(fd, struct.pack("<Q", i))      # a device's writes: calls
        evs = [e for e in efd.events() if e.device == "streamtest"]
        assert [(e.queue, e.kind, e.value) for e in evs] == [(3, "call", 0)] * 3
        assert efd.counters()[("streamtest", 3)]["calls"] == 3
        assert evs[0].time_ns <= evs[1].time_ns <= evs[2].time_ns
        assert abs(evs[0].time_ns - time.time_ns()) < 60e9  # realtime clock, not monotonic
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_vhost_ioctl_arguments_read_from_user_memory(ioctl_probe):
    """vhost ioctls on a non-vhost fd fail (ENOTTY) but the probe still reads
    their arguments from our memory; a failed one changes no state."""
    fd = os.eventfd(0)
    try:
        ioctl_probe.records()
        addr = bytearray(struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x3000, 0x2000, 0))
        with pytest.raises(OSError):
            fcntl.ioctl(fd, NUMBERS["VHOST_SET_VRING_ADDR"], addr)
        mem = bytearray(struct.pack("<II", 1, 0) + struct.pack("<4Q", 0, 1 << 20, 0x7f0000000000, 0))
        with pytest.raises(OSError):
            fcntl.ioctl(fd, NUMBERS["VHOST_SET_MEM_TABLE"], mem)
        recs = [r for r in ioctl_probe.records() if r.fd == fd]
        assert [(r.name, r.ret) for r in recs] == [("VHOST_SET_VRING_ADDR", -25), ("VHOST_SET_MEM_TABLE", -25)]
        assert recs[0].data == bytes(addr) and recs[1].data == bytes(mem)
        dev = ioctl_probe.devices()[(os.getpid(), fd)]
        assert dev.vrings == {} and len(dev.errors) == 2
    finally:
        os.close(fd)


@contextlib.contextmanager
def _backend_with_testpmd():
    """``(sock, be, fe)``: `vqscope serve` (VqscopeNet) at ``sock`` with
    dpdk-testpmd (virtio-user, one queue pair, not forwarding yet) on it,
    both vrings set up."""
    require(find_testpmd() is not None, "dpdk-testpmd is not installed (Debian 'dpdk'; make deps)")
    d = socket_dir()
    sock = f"{d}/vu.sock"
    try:
        with VqscopeNet(sock) as be, \
             DpdkTestpmd([virtio_user_vdev(sock, 1)], main_lcore=1, name="testpmd virtio_user") as fe:
            assert wait_for(lambda: len(be.snapshot()["queues"]) == 2, 30), be.tail()
            yield sock, be, fe
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _traffic_then_quiet(be, fe) -> tuple[dict, dict, object]:
    """Per-queue snapshot entries of back-end ``be`` before and after 3 s
    of testpmd ``fe`` forwarding, once the back-end's counters stopped
    moving (it drains its kick fds before it sleeps), and testpmd's stats."""
    time.sleep(0.5)
    before = {q["index"]: q for q in be.snapshot()["queues"]}
    fe.start(tx_first=4)
    time.sleep(3)
    st = fe.stop()
    wait_counters(be, {1: st.tx[(0, 0)]})
    prev = None
    for _ in range(40):
        cur = {q["index"]: (q["kicks"], q["calls"]) for q in be.snapshot()["queues"]}
        if cur == prev:
            break
        prev = cur
        time.sleep(0.5)
    after = {q["index"]: q for q in be.snapshot()["queues"]}
    assert st.tx[(0, 0)] > 0, fe.tail()
    return before, after, st


@pytest.mark.dpdk
@pytest.mark.timeout(480)
def test_kicks_and_calls_equal_backend_counters(efd):
    """Our back-end under dpdk-testpmd (virtio-user): the eventfd probe's
    kicks (the counter values the back-end read from its kick fds) and calls
    (its writes to call fds) equal the back-end's own kicks/calls counters
    over the same period; the front-end's kick writes equal them too."""
    with _backend_with_testpmd() as (_sock, be, fe):
        be_pid, fe_pid = be.peer.proc.pid, fe.proc.pid
        be_dev, fe_dev = f"backend{be_pid}", f"testpmd{fe_pid}"
        assert efd.watch_process(be_pid, be_dev, side="device") >= 4   # kick+call per vring, dups
        assert efd.watch_process(fe_pid, fe_dev, side="driver") >= 2
        before, after, st = _traffic_then_quiet(be, fe)
        kicks = sum(after[i]["kicks"] - before[i]["kicks"] for i in after)
        calls = sum(after[i]["calls"] - before[i]["calls"] for i in after)
        got = _totals(efd.counters(), be_dev)
        fe_got = _totals(efd.counters(), fe_dev)
        print(f"back-end kicks={kicks} calls={calls}; probe back-end {got}; probe testpmd {fe_got}; "
              f"testpmd {st}")
        assert kicks + calls > 0, "no notification at all: the test measured nothing"
        assert got.get("kicks_read", 0) == kicks
        assert got.get("calls", 0) == calls
        assert fe_got.get("kicks", 0) == kicks      # every kick testpmd wrote, the back-end read


@pytest.mark.dpdk
@pytest.mark.timeout(480)
def test_connect_counts_kicks_and_calls_per_queue(efd):
    """``vqscope probe --connect``'s way (probes/cli.py watch_backend): the
    back-end's snapshot names each vring's kick and call fds, found by
    eventfd-id in the back-end and in testpmd: per queue, the probe's
    kicks_read and calls equal that queue's own counters, testpmd's kick
    writes equal the kicks, and the rows are named as in the snapshot."""
    from probes.cli import watch_backend

    with _backend_with_testpmd() as (sock, be, fe):
        snap = be.snapshot()
        assert snap["pid"] == be.peer.proc.pid
        assert all(isinstance(q["backend"]["kick_fd"], int) and isinstance(q["backend"]["call_fd"], int)
                   for q in snap["queues"])
        n_be, n_fe = watch_backend(efd, sock, [fe.proc.pid])
        assert n_be >= 4 and n_fe >= 4            # kick + call of both vrings in each process
        base = {k: dict(v) for k, v in efd.counters().items()}
        before, after, _st = _traffic_then_quiet(be, fe)
        counters = efd.counters()
        dev = snap["queues"][0]["device"]
        for i, q in after.items():
            got = {k: v - base.get((dev, i), {}).get(k, 0) for k, v in counters.get((dev, i), {}).items()}
            kicks, calls = q["kicks"] - before[i]["kicks"], q["calls"] - before[i]["calls"]
            print(f"{dev} queue {i}: back-end kicks={kicks} calls={calls}; probe {got}")
            assert got.get("kicks_read", 0) == kicks, (i, got)
            assert got.get("calls", 0) == calls, (i, got)
            assert got.get("kicks", 0) == kicks, (i, got)    # testpmd's writes to that kick fd
        assert sum(q["kicks"] + q["calls"] - before[i]["kicks"] - before[i]["calls"]
                   for i, q in after.items()) > 0, "no notification at all: the test measured nothing"


@pytest.mark.dpdk
@pytest.mark.timeout(300)
def test_probe_cli_connect_names_rows_by_queue():
    """``vqscope probe --connect SOCK -p TESTPMD --json``: rows keyed as the
    snapshot names the queues (net1:1), the back-end's reads and testpmd's
    writes of the TX kick fd in one row."""
    require_bpf()
    with _backend_with_testpmd() as (sock, _be, fe):
        probe = subprocess.Popen([*VQSCOPE, "probe", "--json", "--probes", "eventfd", "--connect", sock,
                                  "-p", str(fe.proc.pid), "1", "6"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                                 env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        first = probe.stdout.readline()         # the probes are attached once the first sample is out
        assert first, probe.stderr.read()
        # While testpmd forwards, the back-end polls and never reads its kick
        # fd; it drains it when the traffic stops and it goes to sleep, so the
        # traffic stops well inside the probe's window.
        fe.start(tx_first=4)
        time.sleep(1.5)
        fe.stop()
        out, err = probe.communicate(timeout=60)
    assert probe.returncode == 0, err
    last = json.loads((first + out).splitlines()[-1])["eventfd"]["counters"]
    assert last["net1:1"]["kicks_read"] > 0 and last["net1:1"]["kicks"] > 0, last
    assert not any(k.startswith("pid") for k in last), last     # nothing watched as a whole process


def _vqscope(*args: str, user: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [*VQSCOPE, "probe", *args]
    if user:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


def test_probe_list_shows_kprobe_points_unavailable():
    r = _vqscope("--list", "--json")
    assert r.returncode == 0, r.stderr
    pts = json.loads(r.stdout)
    kp = [p for p in pts if p["kind"] in ("kprobe", "kretprobe")]
    assert {p["probe"] for p in pts} == {"vhost_net", "eventfd", "vhost_ioctl"}
    if not KernelInfo.from_system().has_kprobes:
        assert kp and all(p["status"] == "unavailable" and p["reason"] == NO_KPROBES for p in kp)
    txt = _vqscope("--list")
    assert txt.returncode == 0 and "handle_tx_kick" in txt.stdout
    assert max(len(line) for line in txt.stdout.splitlines()) < 80


def test_probe_ebpf_prints_c():
    r = _vqscope("--ebpf", "--probes", "eventfd,vhost_ioctl")
    assert r.returncode == 0, r.stderr
    assert "#define SYSCALL_ARGS_OFF" in r.stdout and "int tracepoint_sys_enter_ioctl(void *args)" in r.stdout


def test_probe_without_root_one_line_exit_2():
    require(os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root to drop to nobody (setpriv)")
    r = _vqscope("1", "1", user=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and NOT_ROOT in lines[0], r.stderr
    lst = _vqscope("--list", user=True)
    assert lst.returncode == 0 and "not root" in lst.stdout


@pytest.mark.timeout(180)
def test_probe_cli_json_interval():
    require_bpf()
    r = _vqscope("--json", "--probes", "vhost_ioctl", "0.2", "2")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 2 and "vhost_ioctl" in lines[0] and lines[0]["vhost_ioctl"]["lost"] == 0
    assert "Tracing... Ctrl-C to end." in r.stderr
