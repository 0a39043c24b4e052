"""``vqscope doctor`` against real peers (README "Diagnosing a stuck queue").

Two halves, each with real peers only, never hand-made snapshots:

- No false alarm: every healthy peer gives only ``healthy``/``idle`` and exit
  status 0 — dpdk-testpmd (virtio-user) looping frames through ``vqscope
  serve net`` for 10 s; the built-in front-end (``vqscope demo``) and a
  recording of it replayed; a QEMU guest (one virtme-ng boot for the module)
  at rest and under ping, with its virtio-net on ``-netdev user``, its
  virtio-blk disk, its vhost-user NIC on our back-end and virtme-ng's own 9p
  and virtio-serial devices, through both ``--qmp`` and ``--connect``.
- Faults on purpose (``--inject``, inspector/faults.py), each named on the
  faulted queue and not on its pair, with evidence, exit status 1: the
  guest's TX vring stalled under a restarted ``serve`` (QEMU reconnects),
  clearing when the stall ends; the guest's RX calls dropped while the host
  pings it; the built-in front-end withholding TX kicks and not consuming RX;
  testpmd against a stalled TX vring beside a healthy queue pair. (The
  vhost-net half, ``load vhost-net --withhold-kicks`` and ``doctor
  --vhost-net``, runs in the kernel VM: tests/kernel/test_doctor.py.)

Faulted runs use ``--stall-after 1`` and watch a few seconds; the healthy
ones use the doctor's defaults (``--duration 5``, stall after 2 s), as a
user would. No absolute time is asserted: a fault's end is waited for in the
back-end's snapshot (``extras.inject.active``).

Every run's final per-queue verdicts are tallied and printed at the end of
the module (``pytest -s``), with the false-alarm count over the healthy runs,
and each fault's doctor output is printed as a transcript; with
``VQSCOPE_DOCTOR_TRANSCRIPTS=FILE`` the transcripts are also written there
(Markdown).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, VQSCOPE, require, wait_for
from tests.support.peers import (AttachVM, DpdkTestpmd, Peer, PeerError, VqscopeNet, find_testpmd, is_root,
                                 require_guest, socket_dir, virtio_user_vdev, vq_rx, vq_tx, wait_path)

OK = ("healthy", "idle")
STALL = ["--stall-after", "1"]
FAULT_WATCH = "5"       # seconds a faulted run watches
VM_FAULT_WATCH = "6"    # in the guest: --qmp takes ~2 s more to start, and should see the fault begin
STALL_AFTER, STALL_FOR = 4, 10  # the guest's TX stall, from the vring's start (before restart_backend returns)
TRANSCRIPTS_ENV = "VQSCOPE_DOCTOR_TRANSCRIPTS"

PROBLEM_LINE = re.compile(r"^(?P<device>\S+) q(?P<index>\d+) (?P<verdict>[a-z_]+) since \S+ \(-?[\d.]+ s\) — "
                          r"(?P<evidence>.*)$", re.M)
SUMMARY_LINE = re.compile(r"^(?:no problem|\d+ problems?): (?P<queues>\d+) queues of .* over [\d.]+ s "
                          r"\((?P<counts>[^)]*)\)(?:; .*)?$", re.M)


# ------------------------------------------------------------------ running the doctor

@dataclass
class DoctorRun:
    """One finished ``vqscope doctor``: its arguments (after ``doctor``),
    exit status and output, and what the output says."""

    args: list[str]
    rc: int
    out: str
    err: str

    @property
    def is_json(self) -> bool:
        return "--json" in self.args

    @property
    def command(self) -> str:
        return "vqscope doctor " + " ".join(self.args)

    def doc(self) -> dict:
        """The ``--json`` object."""
        assert self.is_json, self.command
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError(f"{self.command}: not JSON (exit {self.rc}):\n{self.out}\n{self.err}") from None

    def verdicts(self) -> dict[tuple[str, int], tuple[str, str]]:
        """``{(device, index): (verdict, evidence)}``: every queue of a
        ``--json`` run, or the problem lines of a text run (the queues that
        are not healthy or idle; :meth:`counts` has the others)."""
        if self.is_json:
            return {(q["device"], q["index"]): (q["verdict"], q["evidence"]) for q in self.doc()["queues"]}
        return {(m["device"], int(m["index"])): (m["verdict"], m["evidence"])
                for m in PROBLEM_LINE.finditer(self.out)}

    def counts(self) -> Counter:
        """How many queues got each final verdict."""
        if self.is_json:
            return Counter(v for v, _ in self.verdicts().values())
        m = SUMMARY_LINE.search(self.out)
        assert m, f"{self.command}: no summary line (exit {self.rc}):\n{self.out}\n{self.err}"
        c = Counter()
        for part in filter(None, (p.strip() for p in m["counts"].split(","))):
            n, v = part.split(" ", 1)
            c[v] += int(n)
        assert sum(c.values()) == int(m["queues"]), self.out
        return c

    def problems(self) -> dict[tuple[str, int], tuple[str, str]]:
        return {k: v for k, v in self.verdicts().items() if v[0] not in OK}

    def transcript(self) -> str:
        shown = self.out if not self.is_json else json.dumps(self.doc(), indent=1)[:3000]
        return f"$ {self.command}\n{shown.rstrip()}\n{self.err.rstrip()}\n(exit status {self.rc})".replace(
            "\n\n(exit", "\n(exit")


def doctors(*arg_lists: list[str], timeout: float = 180) -> list[DoctorRun]:
    """Run several ``vqscope doctor`` at once (each its own process, as a
    user would) and return them finished, in order."""
    procs = [(a, subprocess.Popen([*VQSCOPE, "doctor", *a], cwd=str(ROOT), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)) for a in arg_lists]
    runs = []
    for a, p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n(killed after {timeout:.0f} s)"
        runs.append(DoctorRun(list(a), p.returncode, out, err))
    return runs


# ------------------------------------------------------------------ the tally (printed at the end)

@dataclass
class Tally:
    """Final per-queue verdicts of every run, by peer; transcripts of the
    faulted runs."""

    healthy: dict[str, Counter] = field(default_factory=dict)
    faults: dict[str, Counter] = field(default_factory=dict)
    transcripts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, run: DoctorRun, fault: bool = False) -> None:
        kind = "json" if run.is_json else "text"
        (self.faults if fault else self.healthy)[f"{label} [{kind}]"] = run.counts()

    def transcript(self, title: str, *runs: DoctorRun) -> None:
        text = "\n".join(r.transcript() for r in runs)
        self.transcripts.append((title, text))
        print(f"\n--- {title}\n{text}")

    def false_alarms(self) -> int:
        return sum(n for c in self.healthy.values() for v, n in c.items() if v not in OK)

    def report(self) -> str:
        def lines(d: dict[str, Counter]) -> list[str]:
            return [f"  {label}: " + ", ".join(f"{n} {v}" for v, n in sorted(c.items())) for label, c in d.items()]
        total = sum(sum(c.values()) for c in self.healthy.values())
        return "\n".join(["", "doctor verdicts, final per queue, healthy peers:", *lines(self.healthy),
                          f"false alarms: {self.false_alarms()} of {total} queue verdicts on healthy peers",
                          "doctor verdicts, final per queue, faults on purpose:", *lines(self.faults)])


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield TALLY
    print(TALLY.report())
    path = os.environ.get(TRANSCRIPTS_ENV)
    if path and TALLY.transcripts:
        Path(path).write_text("".join(f"## {title}\n\n```\n{text}\n```\n\n" for title, text in TALLY.transcripts)
                              + "```" + TALLY.report() + "\n```\n")


def assert_healthy(label: str, *runs: DoctorRun) -> None:
    """Every run exited 0 with only healthy/idle queues; tallied."""
    for r in runs:
        TALLY.add(label, r)
    for r in runs:
        assert r.rc == 0 and not r.problems() and not set(r.counts()) - set(OK), \
            f"{label}: false alarm\n{r.transcript()}"


def assert_names(run: DoctorRun, faulted: tuple[str, int], verdicts: tuple[str, ...], evidence: str) -> str:
    """``run`` exited 1 naming ``faulted`` (device, index) with one of
    ``verdicts`` and evidence matching the regex ``evidence``, and no other
    queue a problem. Returns the evidence."""
    problems = run.problems()
    assert run.rc == 1, f"exit {run.rc}, expected 1 (a problem)\n{run.transcript()}"
    assert faulted in problems, f"{faulted} not named\n{run.transcript()}"
    verdict, text = problems[faulted]
    assert verdict in verdicts, f"{faulted}: {verdict}, expected one of {verdicts}\n{run.transcript()}"
    assert re.search(evidence, text), f"{faulted}: evidence does not match /{evidence}/: {text}"
    others = {k: v for k, v in problems.items() if k != faulted}
    assert not others, f"other queues named besides {faulted}: {others}\n{run.transcript()}"
    return text


def backend_device(run: DoctorRun) -> str:
    """The device name vqscope's back-end gives (one device: its first
    queue's, or its first problem's in a text run)."""
    return next(iter(run.verdicts()))[0] if run.is_json else next(iter(run.problems()))[0]


@pytest.fixture
def sockdir():
    d = socket_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ the built-in front-end (vqscope demo)

def demo(sock: str, seconds: float, *inject: str) -> Peer:
    """``vqscope demo --headless`` on ``sock`` for ``seconds``, with faults;
    returns when its introspection socket is up."""
    argv = [*VQSCOPE, "demo", "--headless", "--duration", str(seconds), "--socket", sock]
    for spec in inject:
        argv += ["--inject", spec]
    p = Peer(argv, "vqscope demo", cwd=str(ROOT))
    try:
        wait_path(sock + ".introspect", 30, p.alive)
    except PeerError as e:
        p.close()
        raise PeerError(f"{e}\n{p.tail()}") from None
    return p


def record(sock: str, path: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([*VQSCOPE, "record", "--connect", sock, "-o", path, "--duration", str(seconds)],
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_record(p: subprocess.Popen) -> None:
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0, f"vqscope record failed ({p.returncode}): {out}"


@pytest.mark.timeout(120)
def test_demo_and_its_recording_no_false_alarm(sockdir) -> None:
    """The demo's two vrings, watched live (text and --json) while a
    recording is made; then the recording replayed: all healthy."""
    sock, rec = f"{sockdir}/vu.sock", f"{sockdir}/demo.vqs"
    with demo(sock, 30) as d:
        r = record(sock, rec, 5)
        live = doctors(["--connect", sock], ["--connect", sock, "--json"])
        finish_record(r)
        assert d.alive(), d.tail()
    replay = doctors(["--replay", rec], ["--replay", rec, "--json"])
    assert_healthy("demo --connect", *live)
    assert_healthy("demo recording --replay", *replay)
    assert all(sum(r.counts().values()) == 2 for r in live + replay)
    assert replay[1].doc()["timeline"], replay[1].out


@pytest.mark.timeout(120)
def test_demo_withholding_tx_kicks_is_kick_missing_on_tx(sockdir) -> None:
    """The built-in front-end publishes TX entries but stops kicking (after
    2 s): --connect says kick_missing on vring 1 (the device's avail_event
    required a kick, none came), RX not named; a recording of it, replayed,
    names the same."""
    sock, rec = f"{sockdir}/vu.sock", f"{sockdir}/kicks.vqs"
    with demo(sock, 30, "withhold-kicks=1,after=2") as d:
        r = record(sock, rec, 6)
        runs = doctors(["--connect", sock, "--duration", FAULT_WATCH, *STALL],
                       ["--connect", sock, "--duration", FAULT_WATCH, *STALL, "--json"])
        finish_record(r)
        assert d.alive(), d.tail()
    replay = doctors(["--replay", rec, *STALL], ["--replay", rec, *STALL, "--json"])
    TALLY.transcript("demo --inject withhold-kicks=1,after=2: doctor --connect", runs[0])
    TALLY.transcript("the same, recorded and replayed: doctor --replay", replay[0])
    for run in runs:
        TALLY.add("demo withhold-kicks=1 --connect", run, fault=True)
        device = backend_device(run)
        assert_names(run, (device, vq_tx(0)), ("kick_missing",), r"required a kick; none came")
    timeline = replay[1].doc()["timeline"]
    assert replay[1].rc == replay[0].rc == 1
    named = {(d["index"], d["verdict"]) for d in timeline if d["verdict"] not in OK}
    assert named == {(vq_tx(0), "kick_missing")}, timeline


@pytest.mark.timeout(120)
def test_demo_not_consuming_rx_is_named_on_rx_not_tx(sockdir) -> None:
    """The built-in front-end stops consuming RX (after 2 s): collects no
    used entry, refills nothing, reads no call. --connect names vring 0
    (driver_stalled: calls sent, the driver did not respond; or starved),
    not vring 1."""
    sock = f"{sockdir}/vu.sock"
    with demo(sock, 30, "stop-consuming=0,after=2") as d:
        runs = doctors(["--connect", sock, "--duration", FAULT_WATCH, *STALL],
                       ["--connect", sock, "--duration", FAULT_WATCH, *STALL, "--json"])
        assert d.alive(), d.tail()
    TALLY.transcript("demo --inject stop-consuming=0,after=2: doctor --connect", runs[0])
    for run in runs:
        TALLY.add("demo stop-consuming=0 --connect", run, fault=True)
        device = backend_device(run)
        assert_names(run, (device, vq_rx(0)), ("driver_stalled", "starved", "call_missing"),
                     r"used_event|buffer")


# ------------------------------------------------------------------ dpdk-testpmd (virtio-user)

def _dpdk() -> None:
    require(is_root(), "DPDK's virtio_user needs root")
    require(find_testpmd() is not None, "dpdk-testpmd is not installed (Debian 'dpdk'; make deps)")


@pytest.mark.dpdk
@pytest.mark.timeout(240)
def test_testpmd_loopback_no_false_alarm(sockdir) -> None:
    """testpmd (io forward, 4 bursts in flight) looping frames through
    ``serve net --loopback``; two doctors watch 10 s (text and --json)."""
    _dpdk()
    sock = f"{sockdir}/vu.sock"
    with VqscopeNet(sock) as be, \
         DpdkTestpmd([virtio_user_vdev(sock)], main_lcore=1, name="testpmd virtio_user") as fe:
        fe.start(tx_first=4)
        runs = doctors(["--connect", sock, "--duration", "10"], ["--connect", sock, "--duration", "10", "--json"])
        rx, tx = fe.port_stats()[0]
        assert be.peer.alive(), be.tail()
    assert rx > 0 and tx > 0
    assert_healthy("testpmd loopback --connect", *runs)
    assert runs[1].counts() == Counter(healthy=2), runs[1].out


@pytest.mark.dpdk
@pytest.mark.timeout(240)
def test_testpmd_stalled_tx_vring_named_not_its_pair(sockdir) -> None:
    """Two queue pairs; the back-end stops serving vring 1 (pair 0's TX)
    after 2 s. The doctor names vring 1 device_stalled (the device read
    avail_idx, was kicked, took nothing), not vring 0 (its RX pair, which
    gets nothing to fill) nor pair 1 (2, 3), which keeps moving."""
    _dpdk()
    sock = f"{sockdir}/vu.sock"
    with VqscopeNet(sock, queues=2, inject=("stall=1,after=2",)) as be, \
         DpdkTestpmd([virtio_user_vdev(sock, 2)], main_lcore=1, queues=2, name="testpmd virtio_user") as fe:
        fe.start(tx_first=4)
        runs = doctors(["--connect", sock, "--duration", FAULT_WATCH, *STALL],
                       ["--connect", sock, "--duration", FAULT_WATCH, *STALL, "--json"])
        assert be.peer.alive(), be.tail()
    TALLY.transcript("serve net --queues 2 --inject stall=1,after=2 under dpdk-testpmd: doctor --connect", runs[0])
    for run in runs:
        TALLY.add("testpmd, serve stall=1 --connect", run, fault=True)
        device = backend_device(run)
        assert_names(run, (device, vq_tx(0)), ("device_stalled",), r"took none|returned none")
    verdicts = runs[1].verdicts()
    assert {i: verdicts[(device, i)][0] for i in (2, 3)} == {2: "healthy", 3: "healthy"}, verdicts


# ------------------------------------------------------------------ a QEMU guest

@pytest.fixture(scope="module")
def vm():
    """One guest for the module: traffic only when a test asks for it, the
    vhost-user NIC's back-end on a tap (the guest's pings get answers), and
    QEMU reconnecting to a restarted back-end (faults are set by
    restarting ``serve`` with ``--inject``)."""
    require_guest("reading QEMU's memory, the vhost-user guest and its tap need root")
    with AttachVM(tap=True, reconnect=True, traffic=False) as v:
        yield v


def qemu_and_backend(vm, *extra: str) -> list[DoctorRun]:
    """Four doctors at once: --qmp (text), --qmp on the second monitor
    (--json), --connect (text), --connect --json."""
    return doctors(["--qmp", vm.qmp, *extra], ["--qmp", vm.qmp_test, *extra, "--json"],
                   ["--connect", vm.sock, *extra], ["--connect", vm.sock, *extra, "--json"])


@pytest.mark.qemu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("traffic", ["at rest", "under ping"])
def test_qemu_guest_no_false_alarm(vm, traffic: str) -> None:
    """Every queue of the guest (user-net, virtio-blk, the vhost-user NIC,
    9p, virtio-serial) through --qmp, and the back-end's through --connect,
    over the default 5 s: healthy or idle. Under ping: the guest pings the
    slirp gateway and the host through the tap and writes its disk."""
    if traffic == "under ping":
        vm.command("traffic on")
    try:
        runs = qemu_and_backend(vm)
    finally:
        if traffic == "under ping":
            vm.command("traffic off")
    assert_healthy(f"QEMU guest {traffic} --qmp", *runs[:2])
    assert_healthy(f"QEMU guest {traffic} --connect", *runs[2:])
    queues = runs[1].verdicts()
    assert {("vunet", 0), ("vunet", 1), ("unet", 0), ("unet", 1), ("vblk", 0)} <= set(queues), sorted(queues)
    assert any(d.startswith("virtio-9p") for d, _ in queues) and any(d.startswith("virtio-serial") for d, _ in queues)
    if traffic == "under ping":
        assert {queues[k][0] for k in [("vunet", 1), ("unet", 1), ("vblk", 0)]} == {"healthy"}, queues


def _fault_over(vm, vring: int, timeout: float = 60) -> bool:
    """Wait until the back-end says no fault is in force on ``vring``."""
    def over() -> bool:
        q = {q["index"]: q for q in vm.backend.snapshot()["queues"]}[vring]
        return not q.get("inject", {}).get("active")
    return wait_for(over, timeout, 0.5)


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_qemu_tx_vring_stalled_then_served_again(vm) -> None:
    """The guest pings the host through the tap; ``serve`` restarted (QEMU
    reconnects) with ``--inject stall=1,after=4,for=10``: the device reads
    the TX ring and its kicks but takes nothing. The doctors start when the
    vrings run and watch ``after`` + 4 s: they see the stall begin (within
    ``after`` s) and last at least 4 s. --qmp names the vhost-user
    NIC's queue 1 and --connect vring 1 device_stalled, nothing else; once
    the stall ends both say healthy and the guest's pings are answered."""
    vm.command("traffic on")
    try:
        spec = f"stall=1,after={STALL_AFTER},for={STALL_FOR}"
        vm.restart_backend((spec,))
        runs = qemu_and_backend(vm, "--duration", str(STALL_AFTER + 4), *STALL)
        assert _fault_over(vm, vq_tx(0)), "the stall did not end"
        after = doctors(["--qmp", vm.qmp, "--duration", "3", *STALL], ["--connect", vm.sock, "--duration", "3", *STALL,
                                                                       "--json"])
    finally:
        vm.command("traffic off")
    pinged = vm.command("ping 3")
    TALLY.transcript(f"QEMU guest pinging, serve --inject {spec}: doctor --qmp", runs[0])
    TALLY.transcript("the same: doctor --connect", runs[2])
    TALLY.transcript("after the stall: doctor --qmp, doctor --connect --json", *after)
    for run in runs:
        TALLY.add(f"QEMU guest, serve stall=1 {run.args[0]}", run, fault=True)
    for run in runs[:2]:
        assert_names(run, ("vunet", vq_tx(0)), ("device_stalled",), r"avail_idx")
    for run in runs[2:]:
        assert_names(run, (backend_device(run), vq_tx(0)), ("device_stalled",),
                     r"the device read avail_idx \d+ but took none; [1-9]\d* kicks received")
    assert [r.rc for r in after] == [0, 0], "\n".join(r.transcript() for r in after)
    q1 = {i: v for (_, i), (v, _) in after[1].verdicts().items()}[vq_tx(0)]
    assert q1 == "healthy", after[1].transcript()
    assert re.search(r"VQS-PING sent=3 received=[1-9]", pinged), pinged


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_qemu_rx_calls_dropped_guest_loses_pings(vm) -> None:
    """``serve`` restarted with ``--inject drop-calls=0``: RX buffers are
    filled but the guest is never interrupted for them. The guest sends
    nothing (a TX interrupt would make it look at RX too: one INTx for both
    queues), the host pings it and gets no answer. --connect names vring 0
    call_missing (a call was due, none sent) or driver_stalled; --qmp, which
    cannot see calls, driver_stalled saying so; TX is not named. Then a
    back-end without the fault, and the guest's pings work again."""
    vm.restart_backend(("drop-calls=0",))
    ping = subprocess.Popen(["sh", "-c", f"sleep 3; ping -c 8 -i 0.25 -W 1 {vm.subnet}.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        runs = qemu_and_backend(vm, "--duration", VM_FAULT_WATCH, *STALL)
    finally:
        pinged = ping.communicate(timeout=60)[0]
    vm.restart_backend()
    after = vm.command("ping 3")
    TALLY.transcript("QEMU guest pinged by the host, serve --inject drop-calls=0: doctor --connect", runs[2])
    TALLY.transcript("the same: doctor --qmp", runs[0])
    for run in runs:
        TALLY.add(f"QEMU guest, serve drop-calls=0 {run.args[0]}", run, fault=True)
    assert re.search(r"8 packets transmitted, 0 received", pinged), pinged
    for run in runs[:2]:
        assert_names(run, ("vunet", vq_rx(0)), ("driver_stalled",), r"cannot tell call_missing from driver_stalled")
    for run in runs[2:]:
        text = assert_names(run, (backend_device(run), vq_rx(0)), ("call_missing", "driver_stalled"),
                            r"used_idx \d+ passed used_event \d+")
        assert re.search(r"none sent|did not respond|cannot be told", text), text
    assert re.search(r"VQS-PING sent=3 received=[1-9]", after), after
