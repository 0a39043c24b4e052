"""Kernel tests: vhost-net and the BCC probes on a real kernel that has them.

The host kernel has neither vhost-net nor kprobes, so the tests of
tests/kernel/ run inside ONE virtme-ng guest booted with Debian's kernel
under TCG: a session fixture boots it, the
guest loads vhost_net, mounts tracefs/debugfs and runs
``pytest tests/kernel --junitxml`` into a directory shared with the host
(``--rwdir``); each in-VM test then becomes one host test here,
``test_in_vm[FILE::TEST]``, passing, failing (with the in-VM message) or
skipping as it did in the guest. The list of in-VM tests is read from the
files' source (module-level ``def test_*``), so CI shows them by name before
the guest boots.

Also here, without a VM: the driver's ioctl numbers against the kernel's
uapi header (compiled), and its error on a kernel without vhost-net.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from inspector.spec import tun, vhost
from inspector.tools import vhost_net_load as vnd

from tests.conftest import ROOT, VQSCOPE, require
from tests.support.peers import Peer, PeerError, guest_kernel, require_guest, venv_bin, vng_path

KERNEL_TESTS = ROOT / "tests" / "kernel"
VM_TIMEOUT = 1500  # boot (~20-45 s under TCG) + BCC compiles (tens of seconds each)


def in_vm_test_names() -> list[str]:
    """``FILE::TEST`` for every module-level ``def test_*`` of tests/kernel."""
    names = []
    for path in sorted(KERNEL_TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names += [f"{path.stem}::{n.name}" for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    return names


@dataclass
class VmRun:
    """The guest's run: ``cases[FILE::TEST]`` is a list of ``(outcome,
    message)`` (one per parametrization), outcome in passed / failed /
    error / skipped; ``rc`` pytest's exit status in the guest; ``output``
    the guest's console; ``seconds`` boot + tests."""

    cases: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    rc: int | None = None
    output: str = ""
    seconds: float = 0.0

    def tail(self, n: int = 4000) -> str:
        return f"--- guest output (last {n} chars) ---\n{self.output[-n:]}"


def parse_junit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """The test cases of a pytest junit XML file, keyed ``FILE::TEST`` (the
    parametrization suffix dropped)."""
    cases: dict[str, list[tuple[str, str]]] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        module = tc.get("classname", "").rsplit(".", 1)[-1]
        name = tc.get("name", "").split("[", 1)[0]
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                message = f"{child.get('message', '')}\n{child.text or ''}".strip()
                break
        cases.setdefault(f"{module}::{name}", []).append((outcome, message))
    return cases


def slowest(output: str) -> list[str]:
    """The lines of pytest's ``--durations`` table in a console output."""
    lines = output.replace("\r", "").splitlines()
    start = next((i for i, ln in enumerate(lines) if "slowest" in ln and "durations" in ln), None)
    if start is None:
        return []
    out = []
    for ln in lines[start + 1:]:
        if not ln.strip() or ln.startswith("="):
            break
        out.append(ln)
    return out


def guest_script(results: str) -> str:
    """What the guest runs: vhost_net, tracefs/debugfs, then the kernel
    tests with their junit XML in ``results``."""
    ci = "export CI=1" if os.environ.get("CI") else ""
    return f"""
modprobe vhost_net || echo VQS-NO-VHOST-NET
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
echo "VQS-KERNEL=$(uname -r) build=$(readlink -f /lib/modules/$(uname -r)/build)"
cd {ROOT}
export VQSCOPE_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 PATH={venv_bin()}:$PATH
{ci}
python -m pytest tests/kernel -p no:cacheprovider -ra -q --durations=8 -o junit_family=xunit2 \\
  --junitxml={results}/junit.xml
echo "VQS-PYTEST-RC=$?"
"""


@pytest.fixture(scope="session")
def vm_run() -> VmRun:
    """Boot the guest once and run every in-VM test (see module docstring)."""
    require_guest("booting Debian's kernel to test vhost-net needs root (tap, /dev/vhost-net)")
    kernel = guest_kernel() or ""
    ver = re.sub(r"^vmlinuz-", "", os.path.basename(kernel))
    require(os.path.isdir(f"/lib/modules/{ver}/build"),
            f"no kernel headers for the guest kernel {ver} (linux-headers-amd64; make deps): BCC needs them")
    results = tempfile.mkdtemp(prefix="vqsk", dir="/tmp")
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}:{env.get('PATH', '/usr/bin:/bin')}"
    argv = [vng_path() or "vng", "-r", kernel, "--disable-kvm", "--cpus", "1", "--memory", "2G",
            "--rwdir", results, "--exec", guest_script(results)]
    run = VmRun()
    start = time.monotonic()
    try:
        with Peer(argv, "vng kernel tests", env=env, cwd="/tmp") as guest:
            try:
                m = guest.wait_for(r"^VQS-PYTEST-RC=(\d+)", VM_TIMEOUT)
                run.rc = int(m.group(1))
            except PeerError:
                pass
            run.output = guest.output
        run.seconds = time.monotonic() - start
        junit = Path(results) / "junit.xml"
        if junit.exists():
            run.cases = parse_junit(junit)
    finally:
        shutil.rmtree(results, ignore_errors=True)
    print(f"\nkernel tests: guest boot + {len(run.cases)} tests took {run.seconds:.1f} s; in the guest:\n"
          + "\n".join(slowest(run.output)))
    return run


@pytest.mark.qemu
@pytest.mark.timeout(VM_TIMEOUT + 120)
@pytest.mark.parametrize("name", in_vm_test_names())
def test_in_vm(vm_run: VmRun, name: str) -> None:
    """One in-VM test, reported under its own name."""
    cases = vm_run.cases.get(name)
    assert cases, (f"{name} did not run in the guest (pytest status {vm_run.rc})\n{vm_run.tail()}")
    bad = [m for o, m in cases if o in ("failed", "error")]
    if bad:
        pytest.fail(f"in the guest: {name}:\n" + "\n---\n".join(bad), pytrace=False)
    skipped = [m for o, m in cases if o == "skipped"]
    if len(skipped) == len(cases):
        require(False, f"skipped in the guest: {skipped[0]}")


@pytest.mark.qemu
@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_vm_ran_every_kernel_test(vm_run: VmRun) -> None:
    """The guest ran to the end and ran exactly the tests of tests/kernel."""
    assert vm_run.rc is not None, f"the guest did not finish the kernel tests\n{vm_run.tail()}"
    assert "VQS-NO-VHOST-NET" not in vm_run.output, f"modprobe vhost_net failed\n{vm_run.tail()}"
    assert sorted(vm_run.cases) == sorted(in_vm_test_names()), vm_run.tail()


# ------------------------------------------------------------ without a VM

UAPI_PROGRAM = r"""
#include <stdio.h>
#include <linux/vhost.h>
#include <linux/if_tun.h>
int main(void) {
  printf("VHOST_GET_FEATURES %lu\n", (unsigned long)VHOST_GET_FEATURES);
  printf("VHOST_SET_FEATURES %lu\n", (unsigned long)VHOST_SET_FEATURES);
  printf("VHOST_SET_OWNER %lu\n", (unsigned long)VHOST_SET_OWNER);
  printf("VHOST_RESET_OWNER %lu\n", (unsigned long)VHOST_RESET_OWNER);
  printf("VHOST_SET_LOG_BASE %lu\n", (unsigned long)VHOST_SET_LOG_BASE);
  printf("VHOST_SET_VRING_ERR %lu\n", (unsigned long)VHOST_SET_VRING_ERR);
  printf("VHOST_SET_MEM_TABLE %lu\n", (unsigned long)VHOST_SET_MEM_TABLE);
  printf("VHOST_SET_VRING_NUM %lu\n", (unsigned long)VHOST_SET_VRING_NUM);
  printf("VHOST_SET_VRING_ADDR %lu\n", (unsigned long)VHOST_SET_VRING_ADDR);
  printf("VHOST_SET_VRING_BASE %lu\n", (unsigned long)VHOST_SET_VRING_BASE);
  printf("VHOST_GET_VRING_BASE %lu\n", (unsigned long)VHOST_GET_VRING_BASE);
  printf("VHOST_SET_VRING_KICK %lu\n", (unsigned long)VHOST_SET_VRING_KICK);
  printf("VHOST_SET_VRING_CALL %lu\n", (unsigned long)VHOST_SET_VRING_CALL);
  printf("VHOST_NET_SET_BACKEND %lu\n", (unsigned long)VHOST_NET_SET_BACKEND);
  printf("VHOST_GET_BACKEND_FEATURES %lu\n", (unsigned long)VHOST_GET_BACKEND_FEATURES);
  printf("VHOST_SET_BACKEND_FEATURES %lu\n", (unsigned long)VHOST_SET_BACKEND_FEATURES);
  printf("TUNSETIFF %lu\n", (unsigned long)TUNSETIFF);
  printf("TUNSETVNETHDRSZ %lu\n", (unsigned long)TUNSETVNETHDRSZ);
  printf("sizeof_vhost_vring_addr %zu\n", sizeof(struct vhost_vring_addr));
  printf("sizeof_vhost_memory_region %zu\n", sizeof(struct vhost_memory_region));
  return 0;
}
"""


def test_ioctl_numbers_match_the_uapi_header(tmp_path: Path) -> None:
    """The _IOW/_IOR/_IOWR computations equal the kernel header's macros."""
    require(shutil.which("gcc") is not None and os.path.exists("/usr/include/linux/vhost.h"),
            "gcc and linux-libc-dev (/usr/include/linux/vhost.h) are needed")
    src = tmp_path / "uapi.c"
    src.write_text(UAPI_PROGRAM)
    subprocess.run(["gcc", "-o", str(tmp_path / "uapi"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "uapi")], capture_output=True, text=True, check=True).stdout
    got = dict(line.split() for line in out.splitlines())
    for name in vhost.VHOST_IOCTL_NAMES.values():
        assert int(got[name]) == getattr(vhost, name), name
    for name in ("TUNSETIFF", "TUNSETVNETHDRSZ"):
        assert int(got[name]) == getattr(tun, name), name
    assert int(got["sizeof_vhost_vring_addr"]) == vhost.VHOST_VRING_ADDR.size
    assert int(got["sizeof_vhost_memory_region"]) == vhost.VHOST_MEMORY_REGION.size
    assert len(vhost.VHOST_IOCTL_NAMES) == 16  # no two requests share a number


@pytest.mark.skipif(os.path.exists(vhost.DEV_VHOST_NET), reason="this kernel has vhost-net")
def test_no_vhost_net_is_a_clear_error() -> None:
    with pytest.raises(vnd.VhostNetError, match="this kernel has no vhost-net: modprobe vhost_net"):
        vnd.VhostNetDriver()
    r = subprocess.run([*VQSCOPE, "load", "vhost-net", "--tx", "1"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("vqscope load: /dev/vhost-net does not exist")


def test_parse_junit_outcomes(tmp_path: Path) -> None:
    """A junit file of pytest's shape: parametrized cases grouped under
    their function, failure messages kept."""
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.kernel.test_a" name="test_ok" time="0.1"/>'
        '<testcase classname="tests.kernel.test_a" name="test_p[1]"/>'
        '<testcase classname="tests.kernel.test_a" name="test_p[2]">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.kernel.test_b" name="test_s">'
        '<skipped message="no probes"/></testcase>'
        '</testsuite></testsuites>')
    cases = parse_junit(tmp_path / "j.xml")
    assert cases == {"test_a::test_ok": [("passed", "")],
                     "test_a::test_p": [("passed", ""), ("failed", "assert 1 == 2\ntrace")],
                     "test_b::test_s": [("skipped", "no probes")]}


# ------------------------------------------------------------ the vhost-net source, without a kernel

def _vq_state(ring, uva: int, **kw):
    from probes.vhost_net import VhostVqState

    base = dict(vq=0xFFFF888000001000, owner_pid=os.getpid(), index=1, num=ring.size,
                desc=uva + ring.desc_addr, avail=uva + ring.avail_addr, used=uva + ring.used_addr,
                last_avail_idx=0, avail_idx=0, last_used_idx=0, used_flags=0, signalled_used=0,
                signalled_used_valid=False, notify_enabled=True,
                time_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    base.update(kw)
    return VhostVqState(**base)


def test_source_entry_translates_through_the_mem_table() -> None:
    """A vring in this process's memory, laid out like the driver's (guest
    memory at guest-physical 0): with the memory table the chains' buffers
    are checked against it; without, address anomalies give way to one
    mem_table_unknown."""
    import ctypes
    import mmap

    from inspector.ring.driver import DriverRing
    from inspector.memory import GuestMemory
    from inspector.memory.process import ProcessMemory
    from inspector.ring.anomalies import AnomalyKind
    from inspector.sources.vhost_net import VhostNetSource
    from probes.vhost_ioctl import MemRegion, VhostDevState

    size = 1 << 16
    m = mmap.mmap(-1, size)
    c = (ctypes.c_char * size).from_buffer(m)
    uva = ctypes.addressof(c)
    del c
    mem = GuestMemory()
    mem.add(0, m, uva=uva, size=size)
    ring = DriverRing(mem, 0, 16)
    ring.add_chain([(0x8000, 100, False)])
    ring.add_chain([(0x9000, 64, False), (size + 0x1000, 64, True)])  # outside guest memory
    ring.publish()
    src = object.__new__(VhostNetSource)
    src.pid = os.getpid()
    src._pmem = ProcessMemory(os.getpid())
    try:
        st = _vq_state(ring, uva, last_avail_idx=0, avail_idx=2)
        dev = VhostDevState(pid=os.getpid(), fd=5, features=1 << 32,
                            mem_table=[MemRegion(0, size, uva)])
        e = src._entry("vhost-net:1:5", dev, st, {"kicks": 3, "used_added": 0}, {})
        assert (e.avail_idx, e.used_idx, e.inflight, e.kicks) == (2, 0, 2, 3)
        assert [ch.descs[0].addr for ch in e.chains] == [0x8000, 0x9000]
        assert [a.kind for a in e.anomalies] == [AnomalyKind.ADDR_OUT_OF_RANGE]
        assert e.extras["device_state"]["last_avail_idx"] == e.last_avail_idx == 0
        e = src._entry("vhost-net:1:5", None, st, {}, {"handler_run_ns": {1024: 2}})
        assert [a.kind for a in e.anomalies] == [AnomalyKind.MEM_TABLE_UNKNOWN]
        assert len(e.chains) == 2 and e.features == 0
        assert e.extras["histograms"] == {"handler_run_ns": {"1024": 2}}
        # a ring outside the memory table is reported, not read
        bad = _vq_state(ring, uva + size)
        e = src._entry("vhost-net:1:5", dev, bad, {}, {})
        assert e.anomalies[0].kind is AnomalyKind.RING_UNMAPPED and "memory table" in e.anomalies[0].detail
    finally:
        src._pmem.close()
        ring._view.release()
        del ring, mem
        m.close()


def test_source_refuses_without_privilege_and_without_vhost_net() -> None:
    require(os.geteuid() == 0 and shutil.which("setpriv") is not None,
            "dropping privileges for the test needs root and setpriv (util-linux)")
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        "--inh-caps=-all", *VQSCOPE, "snapshot", "--vhost-net", "1", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("vqscope snapshot: reading vhost-net queues needs BCC probes: run as root")
    if not os.path.exists(vhost.DEV_VHOST_NET):  # this host's kernel
        r = subprocess.run([*VQSCOPE, "snapshot", "--vhost-net", str(os.getpid()), "--json"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2
        assert "this kernel has no vhost-net" in r.stderr and len(r.stderr.splitlines()) == 1
