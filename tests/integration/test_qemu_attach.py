"""``vqscope snapshot|tui --qmp SOCK``: attaching to a running QEMU.

Two halves:

- without QEMU: a fake QMP server (a thread speaking QMP on a Unix socket)
  in front of rings that live in this test process's own memory
  (tests/support/ringbuilder.py), so the whole source — QMP, `info mtree -f`,
  `gpa2hva`, /proc/PID/maps, process_vm_readv — runs against known data;
  plus the error paths (missing socket, not QEMU, QEMU < 7.2, QEMU gone).
- with QEMU (``@pytest.mark.qemu``): ONE virtme-ng guest (tests/support/peers.py,
  AttachVM) with virtio-net on -netdev user, a virtio-blk disk and a
  vhost-user virtio-net on our back-end, shared by the tests of this module.

The QMP replies the source parses, as QEMU 7.2 printed them here:

- ``x-query-virtio``: ``[{"name": "virtio-blk", "path": "/machine/peripheral/vblk/virtio-backend"}, ...]``
- ``x-query-virtio-status``: ``{"name": "virtio-net", "vhost-started": true, "num-vqs": 3,
  "guest-features": {"transports": ["VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled", ...],
  "dev-features": [...], "unknown-dev-features": 1099511627776}, "vhost-dev": {"nvqs": 2, ...}, ...}``
- ``x-query-virtio-queue-status``: ``{"vring-desc": 47603712, "vring-avail": 47607808,
  "vring-used": 47608384, "vring-num": 256, "last-avail-idx": 123, "used-idx": 123,
  "signalled-used": 123, "shadow-avail-idx": 355, "inuse": 0, ...}``
- ``x-query-virtio-vhost-queue-status``: ``{"desc": 140695861334016, "avail": 140695861338112,
  "used": 140695861338688, "desc-phys": 47587328, "avail-phys": 47591424, "used-phys": 47592000,
  "num": 256, "kick": 0, "call": 0, ...}``
- ``x-query-virtio-queue-element`` (tests only): ``{"index": 3, "descs": [{"flags": ["write"],
  "len": 1, "addr": 48034464}, {"flags": ["write", "next"], ...}, ...], "avail": {...}, "used": {...}}``
  — descriptors listed last first.
- HMP ``gpa2hva 0x100000``: ``Host virtual address for 0x100000 (mem0) is 0x7ff64c0ff000``
- HMP ``info mtree -f``: see :data:`MTREE` below.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from inspector.errors import InspectorError, SourceError, SourceGone
from inspector.snapshot import to_json
from inspector.sources import qemu as qs

from tests.conftest import ROOT, VQSCOPE, require, wait_for
from tests.support.peers import AttachVM, require_guest, socket_dir
from tests.support.ringbuilder import RingBuilder

MTREE = """FlatView #0
 AS "mch", root: bus master container
 Root memory region: (none)
  No rendered FlatView

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): mem0
  00000000000c0000-00000000000c1fff (prio 0, rom): mem0 @00000000000c0000
  00000000000c2000-00000000000c4fff (prio 0, ram): mem0 @00000000000c2000
  0000000000100000-000000003fffffff (prio 0, ram): mem0 @0000000000100000
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio

FlatView #3
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-00000000000bffff (prio 0, ram): mem0
"""


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*VQSCOPE, *args], cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ pure parsing

def test_parse_flatview_takes_ram_of_memory_address_space() -> None:
    r = qs.parse_flatview(MTREE.replace("\n", "\r\n"))
    assert r == [qs.FlatRange(0, 0xC0000, "mem0", 0), qs.FlatRange(0xC2000, 0x3000, "mem0", 0xC2000),
                 qs.FlatRange(0x100000, 0x3FF00000, "mem0", 0x100000)]
    with pytest.raises(SourceError, match='no flat view of address space "memory"'):
        qs.parse_flatview(MTREE.split("FlatView #1")[0])


def test_parse_gpa2hva() -> None:
    assert qs.parse_gpa2hva("Host virtual address for 0x100000 (mem0) is 0x7ff64c0ff000\r\n",
                            0x100000) == 0x7FF64C0FF000
    with pytest.raises(SourceError, match="No memory is mapped"):
        qs.parse_gpa2hva("No memory is mapped at address 0x100000000\r\n", 0x100000000)


def test_check_mapped_spans_adjacent_mappings_and_names_holes() -> None:
    maps = qs.parse_maps("1000-3000 rw-p 00000000 00:00 0 \n3000-5000 rw-s 00000000 00:01 9 /memfd:mem0 (deleted)\n"
                         "6000-7000 ---p 00000000 00:00 0 \n")
    qs.check_mapped(maps, 0x2000, 0x2800, "RAM x")
    with pytest.raises(SourceError, match="RAM x: QEMU virtual range 0x4000\\+0x2000 is not mapped"):
        qs.check_mapped(maps, 0x4000, 0x2000, "RAM x")
    with pytest.raises(SourceError, match="not readable"):
        qs.check_mapped(maps, 0x6000, 0x10, "RAM y")


def test_features_mask_and_short_names() -> None:
    mask, unknown = qs.features_mask({
        "transports": ["VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled",
                       "VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)"],
        "dev-features": ["VIRTIO_NET_F_MRG_RXBUF: Driver can merge receive buffers", "VIRTIO_X_F_NEW: ?"],
        "unknown-dev-features": 1 << 40})
    assert mask == (1 << 29) | (1 << 32) | (1 << 15) | (1 << 40)
    assert unknown == ["VIRTIO_X_F_NEW"]
    assert qs.short_name("/machine/peripheral/vblk/virtio-backend", "virtio-blk") == "vblk"
    assert qs.short_name("/machine/peripheral-anon/device[3]/virtio-backend",
                         "virtio-serial") == "virtio-serial:device[3]"


def test_queue_command_is_chosen_by_vhost_started_only() -> None:
    assert qs.queue_command(True) == "x-query-virtio-vhost-queue-status"
    assert qs.queue_command(False) == "x-query-virtio-queue-status"
    assert qs.queue_command(True) not in qs.VHOST_UNSAFE


# ------------------------------------------------------------------ fake QEMU

class FakeQmp:
    """A QMP server on a Unix socket, one client at a time, run by a
    thread. ``handlers[cmd](args) -> reply`` (a value, or an exception
    ``(class, desc)`` tuple wrapped in :class:`Err`); every command received
    is appended to ``log`` as ``(cmd, args)``. ``greeting=None`` sends
    ``raw_greeting`` bytes instead (a server that is not QEMU)."""

    class Err(Exception):
        def __init__(self, cls: str, desc: str):
            self.cls, self.desc = cls, desc

    def __init__(self, path: str, handlers: dict, *, greeting: bool = True, raw_greeting: bytes = b"",
                 version: tuple[int, int, int] = (7, 2, 0)):
        self.path = path
        self.handlers = handlers
        self.log: list[tuple[str, dict]] = []
        self.greeting = greeting
        self.raw_greeting = raw_greeting
        self.version = dict(zip(("major", "minor", "micro"), version))
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.srv.settimeout(0.1)  # close() does not wake accept(): poll _stop
        while not self._stop:
            try:
                c, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c.settimeout(None)
            self.conns.append(c)
            try:
                self._session(c)
            except OSError:
                pass
            finally:
                c.close()

    def _session(self, c: socket.socket) -> None:
        if not self.greeting:
            c.sendall(self.raw_greeting)
            return
        c.sendall(json.dumps({"QMP": {"version": {"qemu": self.version,
                                                  "package": "fake"}, "capabilities": []}}).encode() + b"\r\n")
        for msg in self._messages(c):
            cmd, args, mid = msg["execute"], msg.get("arguments", {}), msg.get("id")
            self.log.append((cmd, args))
            if cmd == "qmp_capabilities":
                reply = {"return": {}}
            elif cmd in self.handlers:
                try:
                    reply = {"return": self.handlers[cmd](args)}
                except FakeQmp.Err as e:
                    reply = {"error": {"class": e.cls, "desc": e.desc}}
            else:
                reply = {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
            if mid is not None:
                reply["id"] = mid
            c.sendall(json.dumps(reply).encode() + b"\r\n")

    @staticmethod
    def _messages(c: socket.socket):
        """JSON objects from a stream without separators (QMP clients need
        not end a command with a newline)."""
        dec, buf = json.JSONDecoder(), ""
        while True:
            data = c.recv(65536)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    def drop_clients(self) -> None:
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.drop_clients()
        self.srv.close()
        self.thread.join(5)


def _addr(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


class FakeVm:
    """Rings in this process's memory behind a fake QMP: device ``fnet``
    (QEMU services it: vhost not started, one queue) and device ``fvu``
    (vhost started, two vring queues of which QEMU knows one)."""

    NET = "/machine/peripheral/fnet/virtio-backend"
    VU = "/machine/peripheral/fvu/virtio-backend"

    def __init__(self, path: str):
        self.rb = rb = RingBuilder(8)
        self.vu = vu = RingBuilder(8, ring_gpa=0x20000, data_gpa=0x200000)
        self.heads = {}
        for name, b in (("net", rb), ("vu", vu)):
            self.heads[name] = [b.add_chain(((64, False), (128, True))) for _ in range(3)]
            b.publish()
        rb.device_use([(0, 128)])
        self.last_avail = 2  # QEMU popped two, returned one
        self.ram = [(0x10000, rb.ring_buf), (0x100000, rb.data_buf), (0x20000, vu.ring_buf),
                    (0x200000, vu.data_buf)]
        self.ram.sort()
        feats = {"transports": ["VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled",
                                "VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)"],
                 "dev-features": []}

        def status(a):
            vhost = a["path"] == self.VU
            return {"name": "virtio-net", "vhost-started": vhost, "num-vqs": 2 if vhost else 1,
                    "broken": False, "guest-features": feats, "status": {"statuses": ["DRIVER_OK"]}}

        def queue_status(a):
            if a["path"] != self.NET or a["queue"] != 0:
                raise FakeQmp.Err("GenericError", "Invalid virtqueue number")
            d, av, u = rb.addrs
            return {"vring-desc": d, "vring-avail": av, "vring-used": u, "vring-num": 8,
                    "last-avail-idx": self.last_avail, "used-idx": 1, "signalled-used": 1}

        def vhost_queue_status(a):
            if a["path"] != self.VU:
                raise FakeQmp.Err("GenericError", "vhost device has not started yet")
            if a["queue"] != 0:
                raise FakeQmp.Err("GenericError", f"Invalid vhost virtqueue number {a['queue']}")
            d, av, u = vu.addrs
            return {"desc": self.hva(d), "avail": self.hva(av), "used": self.hva(u), "desc-phys": d,
                    "avail-phys": av, "used-phys": u, "num": 8, "kick": 0, "call": 0}

        def hmp(a):
            line = a["command-line"]
            if line == "info mtree -f":
                rows = "".join(f"  {g:016x}-{g + len(b) - 1:016x} (prio 0, ram): fake{n}\r\n"
                               for n, (g, b) in enumerate(self.ram))
                return f'FlatView #0\r\n AS "memory", root: system\r\n Root memory region: system\r\n{rows}'
            if line.startswith("gpa2hva "):
                g = int(line.split()[1], 16)
                return f"Host virtual address for {g:#x} (fake) is {self.hva(g):#x}\r\n"
            return ""

        self.qmp = FakeQmp(path, {
            "x-query-virtio": lambda a: [{"name": "virtio-net", "path": self.NET},
                                         {"name": "virtio-net", "path": self.VU}],
            "query-name": lambda a: {"name": "fakevm"},
            "x-query-virtio-status": status,
            "x-query-virtio-queue-status": queue_status,
            "x-query-virtio-vhost-queue-status": vhost_queue_status,
            "human-monitor-command": hmp,
        })

    def hva(self, gpa: int) -> int:
        for g, b in self.ram:
            if g <= gpa < g + len(b):
                return _addr(b) + gpa - g
        raise AssertionError(hex(gpa))

    def close(self) -> None:
        self.qmp.close()


@pytest.fixture
def sockdir():
    d = socket_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake_vm(sockdir):
    pytest.importorskip("inspector.memory.process")
    vm = FakeVm(f"{sockdir}/qmp.sock")
    yield vm
    vm.close()


def test_fake_vm_every_queue_read_and_no_unsafe_command_on_vhost(fake_vm) -> None:
    with qs.QemuSource(fake_vm.qmp.path) as src:
        assert src.pid == os.getpid()                 # SO_PEERCRED of the QMP socket
        snaps = [to_json(src.snapshot()) for _ in range(3)]
    snap = snaps[-1]
    assert snap["source"] == f"qemu fakevm pid {os.getpid()} ({fake_vm.qmp.path})"
    by = {(q["device"], q["index"]): q for q in snap["queues"]}
    assert set(by) == {("fnet", 0), ("fvu", 0)}
    net, vu = by[("fnet", 0)], by[("fvu", 0)]
    assert (net["avail_idx"], net["used_idx"], net["last_avail_idx"], net["inflight"]) == (3, 1, 2, 2)
    assert [c["head"] for c in net["chains"]] == fake_vm.heads["net"][2:]
    assert [(d["len"], d["flags"]) for d in net["chains"][0]["descs"]] == [(64, 1), (128, 2)]
    assert net["event_idx"] and net["used_event"] is not None
    assert net["qemu"]["vhost"] is False and net["qemu"]["used_idx"] == 1
    assert (vu["avail_idx"], vu["used_idx"], vu["last_avail_idx"]) == (3, 0, None)
    assert [c["head"] for c in vu["chains"]] == fake_vm.heads["vu"]
    assert vu["qemu"]["vhost"] is True
    assert (vu["qemu"]["desc"], vu["qemu"]["avail"], vu["qemu"]["used"]) == fake_vm.vu.addrs
    assert vu["qemu"]["desc_hva"] == fake_vm.hva(fake_vm.vu.addrs[0])
    assert vu["anomalies"] == [] and net["anomalies"] == []
    assert {"device": "fvu", "index": 1, "reason": "Invalid vhost virtqueue number 1"} in snap["skipped"]
    for cmd, args in fake_vm.qmp.log:
        if cmd in qs.VHOST_UNSAFE:
            assert args["path"] != FakeVm.VU, f"{cmd} sent to a vhost device: {args}"
    assert not any(cmd == "x-query-virtio-queue-element" for cmd, _ in fake_vm.qmp.log)


def test_fake_vm_stale_last_avail_is_not_decoded_from(fake_vm) -> None:
    """QEMU answers a last_avail_idx older than the ring read (behind
    used_idx: QEMU's own invariant is used <= last_avail <= avail), every
    time it is asked: the entry says null and the chains are the in-flight
    ones of the ring read, not the returned chain before them (whose
    descriptors and indirect table the driver may have reused)."""
    fake_vm.last_avail = 0
    with qs.QemuSource(fake_vm.qmp.path) as src:
        snap = to_json(src.snapshot())
    net = {q["device"]: q for q in snap["queues"]}["fnet"]
    assert (net["avail_idx"], net["used_idx"], net["last_avail_idx"]) == (3, 1, None)
    assert [c["head"] for c in net["chains"]] == fake_vm.heads["net"][1:]
    assert net["anomalies"] == []
    asked = [a for cmd, a in fake_vm.qmp.log if cmd == "x-query-virtio-queue-status"]
    assert len(asked) == 2          # once, then once more: the answer stayed behind


def test_fake_vm_unexpected_reply_shapes_skip_what_they_describe(fake_vm) -> None:
    """Another QEMU may answer with other fields or types: the queue (or
    device) whose reply cannot be read is skipped with the reason, the
    rest of the snapshot is read as usual, nothing raises."""
    handlers = fake_vm.qmp.handlers
    queue_ok, status_ok = handlers["x-query-virtio-queue-status"], handlers["x-query-virtio-status"]
    handlers["x-query-virtio-queue-status"] = lambda a: {**queue_ok(a), "vring-num": "lots"}
    handlers["x-query-virtio-status"] = lambda a: (status_ok(a) if a["path"] == FakeVm.NET
                                                   else {**status_ok(a), "num-vqs": [2]})
    with qs.QemuSource(fake_vm.qmp.path) as src:
        snap = to_json(src.snapshot())
    assert snap["queues"] == []
    reasons = {(s["device"], s["index"]): s["reason"] for s in snap["skipped"]}
    assert "unexpected x-query-virtio-queue-status reply: ValueError" in reasons[("fnet", 0)], reasons
    assert "unexpected x-query-virtio-status reply: TypeError" in reasons[("fvu", None)], reasons
    handlers["x-query-virtio-queue-status"] = queue_ok
    with qs.QemuSource(fake_vm.qmp.path) as src:
        assert [q["device"] for q in to_json(src.snapshot())["queues"]] == ["fnet"]


def test_fake_vm_through_the_cli(fake_vm) -> None:
    r = run_cli("snapshot", "--qmp", fake_vm.qmp.path, "--json")
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    assert sorted((q["device"], q["index"]) for q in snap["queues"]) == [("fnet", 0), ("fvu", 0)]
    r = run_cli("snapshot", "--qmp", fake_vm.qmp.path)
    assert r.returncode == 0 and "fnet" in r.stdout, r.stderr


def test_qmp_channel_refuses_unsafe_commands_before_sending(fake_vm) -> None:
    ch = qs.QmpChannel(fake_vm.qmp.path)
    try:
        n = len(fake_vm.qmp.log)
        for vhost in (True, None):
            for cmd in sorted(qs.VHOST_UNSAFE):
                with pytest.raises(InspectorError, match="refusing"):
                    ch.execute(cmd, {"path": FakeVm.VU, "queue": 0}, vhost_started=vhost)
        assert len(fake_vm.qmp.log) == n
        assert ch.execute("x-query-virtio-queue-status", {"path": FakeVm.NET, "queue": 0},
                          vhost_started=False)["vring-num"] == 8
    finally:
        ch.close()


def test_qemu_monitor_closing_is_source_gone(fake_vm) -> None:
    with qs.QemuSource(fake_vm.qmp.path) as src:
        src.snapshot()
        fake_vm.qmp.close()
        time.sleep(0.2)
        with pytest.raises(SourceGone):
            src.snapshot()


def test_tui_polls_the_qemu_source_and_shows_it_gone(fake_vm) -> None:
    """The TUI polls from a worker thread, inside Textual's own asyncio
    loop: the source's QMP loop is its own; a closed monitor is 'gone'."""
    import asyncio

    from tui.app import VqscopeApp

    async def until(pilot, cond, timeout=10.0):
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "condition not met in time"
            await pilot.pause(0.02)

    with qs.QemuSource(fake_vm.qmp.path) as src:
        app = VqscopeApp(src, interval=0.05)

        async def main():
            async with app.run_test(size=(160, 50)) as pilot:
                await until(pilot, lambda: app.snapshot is not None)
                assert {(q["device"], q["index"]) for q in to_json(app.snapshot)["queues"]} == {("fnet", 0), ("fvu", 0)}
                fake_vm.qmp.close()
                await until(pilot, lambda: app.gone is not None)
                assert "went away" in app.gone or "closed" in app.gone

        asyncio.run(main())


def test_source_gone_exits_1(monkeypatch, capsys) -> None:
    from inspector import cli

    class Gone:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def snapshot(self):
            raise SourceGone("QEMU pid 42 (/x.sock) exited")

    monkeypatch.setattr(cli, "open_source", lambda args: Gone())   # the name the CLI calls
    assert cli.main(["snapshot", "--qmp", "/x.sock", "--json"]) == 1
    assert "QEMU pid 42 (/x.sock) exited" in capsys.readouterr().err


# ------------------------------------------------------------------ errors, through the CLI

def test_missing_socket_exit_2(sockdir) -> None:
    r = run_cli("snapshot", "--qmp", f"{sockdir}/nothing.sock", "--json")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "-qmp unix:" in r.stderr and "Traceback" not in r.stderr


def test_refused_socket_exit_2(sockdir) -> None:
    p = f"{sockdir}/dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(p)
    s.close()  # the file stays, nobody listens
    r = run_cli("snapshot", "--qmp", p)
    assert r.returncode == 2 and "nothing listens there" in r.stderr and "Traceback" not in r.stderr


def test_socket_that_is_not_qemu_exit_2(sockdir) -> None:
    srv = FakeQmp(f"{sockdir}/ssh.sock", {}, greeting=False, raw_greeting=b"SSH-2.0-OpenSSH_9.2\r\n")
    try:
        r = run_cli("snapshot", "--qmp", srv.path, "--json")
    finally:
        srv.close()
    assert r.returncode == 2, r
    assert "is not a QEMU QMP monitor" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_qemu_older_than_7_2_exit_2(sockdir) -> None:
    srv = FakeQmp(f"{sockdir}/old.sock", {"query-name": lambda a: {}}, version=(7, 1, 0))
    try:
        r = run_cli("snapshot", "--qmp", srv.path, "--json")
    finally:
        srv.close()
    assert r.returncode == 2, r
    assert "QEMU < 7.2 has no x-query-virtio (this QEMU is 7.1.0)" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_pid_without_qmp_exit_2() -> None:
    r = run_cli("snapshot", "--pid", "1")
    assert r.returncode == 2 and "--pid goes with --qmp" in r.stderr


# ------------------------------------------------------------------ real QEMU

def _requirements() -> None:
    require_guest("reading QEMU's memory and the vhost-user guest need root")


@pytest.fixture(scope="module")
def vm():
    _requirements()
    pytest.importorskip("inspector.memory.process")
    with AttachVM() as v:
        yield v


class MonitorClient:
    """The test's own QMP client, on the second monitor."""

    def __init__(self, path: str):
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.q = QEMUMonitorProtocol(path)
        self.q.connect()

    def __call__(self, cmd: str, **args):
        return self.q.cmd(cmd, **args)

    def close(self) -> None:
        self.q.close()


@pytest.fixture
def qmp(vm):
    q = MonitorClient(vm.qmp_test)
    yield q
    try:
        if not q("query-status")["running"]:
            q("cont")
    finally:
        q.close()


def cli_snapshot(vm) -> dict:
    r = run_cli("snapshot", "--qmp", vm.qmp, "--json")
    assert r.returncode == 0, f"{r.stderr}\n{vm.tail()}"
    return json.loads(r.stdout)


def queues_of(snap: dict) -> dict[tuple[str, int], dict]:
    return {(q["device"], q["index"]): q for q in snap["queues"]}


FLAGS = {"next": 1, "write": 2, "indirect": 4}


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_live_snapshots_advance(vm) -> None:
    a = cli_snapshot(vm)
    time.sleep(3)
    b = cli_snapshot(vm)
    qa, qb = queues_of(a), queues_of(b)
    assert a["source"].startswith("qemu virtme-ng pid ") and vm.qmp in a["source"]
    for key in [("vblk", 0), ("unet", 0), ("unet", 1), ("vunet", 0), ("vunet", 1)]:
        assert key in qa and key in qb, f"{key} missing: {sorted(qa)}"
    # disk writes, slirp pings (TX and the replies on RX), vhost-user pings
    for key in [("vblk", 0), ("unet", 1), ("unet", 0), ("vunet", 1)]:
        assert (qb[key]["used_idx"] - qa[key]["used_idx"]) & 0xFFFF > 0, (key, qa[key], qb[key])
    for q in b["queues"]:
        assert q["kicks"] == q["calls"] == q["packets"] == q["bytes"] == 0
        assert q["event_idx"] == (q["used_event"] is not None)
        assert not [x for x in q["anomalies"] if x["kind"] != "indirect_not_read"], q


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_stopped_vm_agrees_with_qemu(vm, qmp) -> None:
    """VM stopped: for queues QEMU services, our used_idx is QEMU's
    used-idx, our last_avail_idx its last-avail-idx, and every in-flight
    chain we decode is what x-query-virtio-queue-element gives for that
    avail slot (called only on devices without vhost)."""
    qmp("stop")
    snap = cli_snapshot(vm)
    compared = 0
    for q in snap["queues"]:
        if q["device"] not in ("vblk", "unet"):
            continue
        path = q["qemu"]["path"]
        assert qmp("x-query-virtio-status", path=path)["vhost-started"] is False
        st = qmp("x-query-virtio-queue-status", path=path, queue=q["index"])
        assert q["used_idx"] == st["used-idx"], (q, st)
        assert q["last_avail_idx"] == st["last-avail-idx"], (q, st)
        assert (q["qemu"]["desc"], q["qemu"]["avail"], q["qemu"]["used"]) == \
            (st["vring-desc"], st["vring-avail"], st["vring-used"])
        assert len(q["chains"]) == (q["avail_idx"] - q["last_avail_idx"]) & 0xFFFF
        for k, chain in enumerate(q["chains"][:32]):
            slot = (q["last_avail_idx"] + k) % q["size"]
            el = qmp("x-query-virtio-queue-element", path=path, queue=q["index"], index=slot)
            assert el["index"] == chain["head"], (q["device"], q["index"], slot, el, chain)
            theirs = [(d["addr"], d["len"], sum(FLAGS[f] for f in d["flags"])) for d in reversed(el["descs"])]
            ours = [(d["addr"], d["len"], d["flags"] & ~FLAGS["indirect"]) for d in chain["descs"]
                    if not d["flags"] & FLAGS["indirect"]]
            assert ours == theirs, (q["device"], q["index"], slot, el, chain)
            compared += 1
    assert compared > 0, "no in-flight chain to compare (virtio-net RX always has some)"


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_vhost_user_queues_without_get_vring_base(vm, qmp) -> None:
    """Our back-end's vhost-user device: its queues come with the addresses
    of x-query-virtio-vhost-queue-status and last_avail_idx null; attaching
    sends the back-end nothing (no GET_VRING_BASE) and traffic goes on."""
    from inspector.sources.backend import BackendSource

    assert qmp("query-status")["running"]
    with BackendSource(vm.sock) as be:
        before = be.messages()
        pk0 = {q["index"]: q["packets"] for q in to_json(be.snapshot())["queues"]}
        snaps = [cli_snapshot(vm) for _ in range(5)]
        with qs.QemuSource(vm.qmp) as src:
            for _ in range(20):
                src.snapshot()
                time.sleep(0.05)
        time.sleep(2)
        after = be.messages()
        pk1 = {q["index"]: q["packets"] for q in to_json(be.snapshot())["queues"]}
    new = after[len(before):]
    assert not [m for m in new if m["request"] in ("GET_VRING_BASE", "VHOST_USER_GET_VRING_BASE")], new
    assert new == [], f"attaching sent the back-end vhost-user messages: {new}"
    assert pk1[1] > pk0[1] and pk1[0] > pk0[0], f"back-end packets stopped: {pk0} -> {pk1}"
    path = "/machine/peripheral/vunet/virtio-backend"
    for snap in snaps:
        qv = queues_of(snap)
        assert {k for k in qv if k[0] == "vunet"} == {("vunet", 0), ("vunet", 1)}
        assert {"device": "vunet", "index": 2, "reason": "Invalid vhost virtqueue number 2"} in snap["skipped"]
        for i in (0, 1):
            q = qv[("vunet", i)]
            vst = qmp("x-query-virtio-vhost-queue-status", path=path, queue=i)
            assert q["last_avail_idx"] is None and q["qemu"]["vhost"] is True
            assert (q["qemu"]["desc"], q["qemu"]["avail"], q["qemu"]["used"]) == \
                (vst["desc-phys"], vst["avail-phys"], vst["used-phys"])
            assert (q["qemu"]["desc_hva"], q["qemu"]["avail_hva"], q["qemu"]["used_hva"]) == \
                (vst["desc"], vst["avail"], vst["used"])
            assert q["size"] == vst["num"]
            assert not [a for a in q["anomalies"] if a["kind"] == "address_mismatch"], q
    # Control: the log does show GET_VRING_BASE when QEMU itself stops the
    # rings (a VM stop stops vhost), so its absence above means something.
    qmp("stop")
    qmp("cont")
    with BackendSource(vm.sock) as be:
        assert wait_for(lambda: any(m["request"] == "GET_VRING_BASE" for m in be.messages()[len(after):]),
                        10, 0.2), "a VM stop sent no GET_VRING_BASE: the message log proves nothing"


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_read_only_guest_ram_unchanged_by_a_minute_of_snapshots(vm, qmp) -> None:
    """VM stopped: a hash of all guest RAM (read through /proc/PID/mem)
    before and after a minute of snapshots at ~4 Hz is the same; the
    source's /proc/PID/mem is open O_RDONLY."""
    qmp("stop")
    time.sleep(1)  # let in-flight I/O settle
    with qs.QemuSource(vm.qmp) as src:
        ram = src.ram
        assert sum(r.size for r in ram) >= 1000 << 20

        def ram_hash() -> str:
            h = hashlib.sha256()
            fd = os.open(f"/proc/{src.pid}/mem", os.O_RDONLY)
            try:
                for r in ram:
                    for off in range(0, r.size, 8 << 20):
                        n = min(8 << 20, r.size - off)
                        data = os.pread(fd, n, r.hva + off)
                        assert len(data) == n
                        h.update(data)
            finally:
                os.close(fd)
            return h.hexdigest()

        flags = int(open(f"/proc/self/fdinfo/{src.mem_fd}").read().split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY, oct(flags)
        assert os.readlink(f"/proc/self/fd/{src.mem_fd}") == f"/proc/{src.pid}/mem"
        h0 = ram_hash()
        n, end = 0, time.monotonic() + 60
        while time.monotonic() < end:
            t = time.monotonic()
            snap = to_json(src.snapshot())
            n += 1
            time.sleep(max(0.0, 0.25 - (time.monotonic() - t)))
        h1 = ram_hash()
    assert n >= 120, f"only {n} snapshots in a minute"
    assert len(snap["queues"]) > 5
    assert h0 == h1, "guest RAM changed while the VM was stopped and vqscope read it"


@pytest.mark.qemu
@pytest.mark.timeout(120)
def test_qemu_exit_while_attached_is_source_gone(sockdir) -> None:
    """A bare QEMU (no guest: its queues are not set up) that is killed
    while attached: the next snapshot raises SourceGone."""
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86 is not installed")
    pytest.importorskip("inspector.memory.process")
    path = f"{sockdir}/q.sock"
    p = subprocess.Popen(["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "64", "-display", "none",
                          "-S", "-nodefaults", "-qmp", f"unix:{path},server=on,wait=off",
                          "-netdev", "user,id=u0", "-device", "virtio-net-pci,netdev=u0,id=n0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() else "timeout"
            time.sleep(0.05)
        with qs.QemuSource(path) as src:
            assert src.pid == p.pid
            snap = to_json(src.snapshot())
            assert snap["queues"] == []
            assert {s["reason"] for s in snap["skipped"] if s["device"] == "n0"} == {"not set up"}
            p.kill()
            p.wait(10)
            with pytest.raises(SourceGone):
                src.snapshot()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
