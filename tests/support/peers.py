"""Real vhost-user peers for the integration tests: dpdk-testpmd and a
virtme-ng Linux guest under QEMU (TCG).

Every process here is started in its own process group, read by a thread
(so a chatty peer never blocks on a full pipe), and ended by
:meth:`Peer.close` — SIGTERM, then SIGKILL after a bounded wait. Use them as
context managers so a failing assertion still ends them.

The back-end under test is ``python -m inspector serve net`` (our device).
Set ``VQSCOPE_PEER_BACKEND=dpdk`` to run the same tests against DPDK's own
vhost back-end (``net_vhost0``, plus ``net_tap`` for the tap tests) instead:
that proves the harness itself when our back-end is broken or absent.

One file past 600 lines on purpose: every peer here (testpmd, our net
back-end, the virtme-ng guest, the attach VM) is built on Peer's process
handling and the recipes below; harnesses of one device or tool live
beside it (qsd.py, blk.py, proxy.py, prometheus.py).

Recipes (measured on the 2-core Debian 12 CI machine):

- testpmd front-end: ``dpdk-testpmd -l 0,1 --main-lcore 1 --no-pci --no-huge
  -m 1024 --file-prefix=UNIQUE --vdev net_virtio_user0,path=SOCK,queues=N
  -- -i --nb-cores=1 --rxq=N --txq=N --forward-mode=io``, driven on stdin
  (``start tx_first B``, ``show port stats all``, ``stop``, ``quit``): ``stop``
  prints exact per-stream counters.
- guest: ``vng -r /boot/vmlinuz-<ver>-amd64 --disable-kvm --disable-microvm
  --cpus 1 --memory 1G --qemu-opts="-object memory-backend-memfd,id=mem0,
  size=1G,share=on -numa node,memdev=mem0 -chardev socket,id=c0,path=SOCK
  -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0,
  mac=52:54:00:12:34:56,vectors=0" --exec SCRIPT``. ``vectors=0`` (INTx)
  avoids QEMU 7.2's segfault with MSI-X under TCG. The guest's stdin is the
  test's pipe, so a guest script can ``read`` to wait for the host.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import ROOT, VQSCOPE, require

GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = "52:54:00:12:34:57"  # vqscope serve's default config-space MAC
PROMPT = "testpmd> "
_seq = itertools.count()


# ---------------------------------------------------------------- discovery

def is_root() -> bool:
    return os.geteuid() == 0


def find_testpmd() -> str | None:
    return shutil.which("dpdk-testpmd")


def venv_bin() -> Path:
    return Path(sys.executable).parent


def vng_path() -> str | None:
    p = venv_bin() / "vng"
    return str(p) if p.exists() else shutil.which("vng")


def guest_kernel() -> str | None:
    """Debian's newest packaged kernel (the host's own kernel lacks vhost-net
    and has no image in /boot)."""
    ks = sorted(glob.glob("/boot/vmlinuz-*-amd64"),
                key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)])
    return ks[-1] if ks else None


def require_guest(why_root: str) -> None:
    """Fail (CI) or skip (locally) unless a virtme-ng guest can boot here:
    root (``why_root`` says what for), QEMU, vng, Debian's kernel, busybox
    and the host userland the guest borrows."""
    require(is_root(), why_root)
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86 is not installed (make deps)")
    require(vng_path() is not None, "virtme-ng (vng) is not installed in the venv (make venv)")
    require(guest_kernel() is not None, "no Debian kernel in /boot (linux-image-amd64; make deps)")
    require(shutil.which("busybox") is not None, "busybox-static is not installed (make deps)")
    require(shutil.which("ping") is not None and shutil.which("ip") is not None,
            "the guest uses the host's iputils-ping and iproute2 (make deps)")


def backend_kind() -> str:
    kind = os.environ.get("VQSCOPE_PEER_BACKEND", "vqscope")
    if kind not in ("vqscope", "dpdk"):
        raise ValueError(f"VQSCOPE_PEER_BACKEND={kind!r}: expected 'vqscope' or 'dpdk'")
    return kind


def unique(prefix: str) -> str:
    """A name unique to this process and call (file prefixes, taps)."""
    return f"{prefix}{os.getpid()}x{next(_seq)}"


def socket_dir() -> str:
    """A short private directory for Unix sockets (sun_path is 108 bytes and
    the introspection socket adds '.introspect'; pytest's tmp_path is long)."""
    return tempfile.mkdtemp(prefix="vqs", dir="/tmp")


def wait_path(path: str, timeout: float, alive=None) -> None:
    """Wait until ``path`` exists; ``alive()`` false ends the wait early."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if alive is not None and not alive():
            raise PeerError(f"peer exited before {path} appeared")
        if time.monotonic() > deadline:
            raise PeerError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.1)


# ---------------------------------------------------------------- processes

class PeerError(AssertionError):
    """A peer did not behave (exited, timed out, printed an error)."""


class Peer:
    """A child process in its own process group whose merged stdout/stderr
    is collected by a reader thread."""

    def __init__(self, argv: list[str], name: str, stdin=subprocess.DEVNULL, env=None, cwd=None):
        self.name = name
        self.argv = argv
        self._buf: list[str] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if chunk:
                    self._buf.append(chunk.decode(errors="replace"))
                else:
                    self._buf.append("")  # wake waiters on EOF
                self._cond.notify_all()
            if not chunk:
                return

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._buf)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return f"--- {self.name} output (last {n} chars) ---\n{self.output[-n:]}"

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """Wait until ``pattern`` (a regex) matches the output from offset
        ``start``; raise PeerError with the output's tail on exit or timeout."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search("".join(self._buf), start)
                if m:
                    return m
                if not self._reader.is_alive():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        state = "exited with status %s" % self.proc.poll() if not self.alive() else f"timed out after {timeout:.0f} s"
        raise PeerError(f"{self.name}: {state} waiting for /{pattern}/\n{self.tail()}")

    def write(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise PeerError(f"{self.name}: cannot write to stdin ({e})\n{self.tail()}") from e

    def close(self, timeout: float = 10.0) -> int | None:
        """End the process group: SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        else:
            self._signal(signal.SIGKILL)  # leftovers of the group, if any
        for f in (self.proc.stdin,):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        self._reader.join(5)
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- testpmd

_STREAM_RX = re.compile(
    r"Forward Stats for RX Port=\s*(\d+)/Queue=\s*(\d+) -> TX Port=\s*(\d+)/Queue=\s*(\d+)\s*-+\s*\n"
    r"\s*RX-packets:\s*(\d+)\s+TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)")
_PORT_FWD = re.compile(
    r"Forward statistics for port (\d+)\s*-+\s*\n"
    r"\s*RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)\s+RX-total:\s*(\d+)\s*\n"
    r"\s*TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)\s+TX-total:\s*(\d+)")
_PORT_NIC = re.compile(
    r"NIC statistics for port (\d+)\s*#+\s*\n"
    r"\s*RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+)\s*\n"
    r"(?:.*\n){0,3}?"
    r"\s*TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+)")


class FwdStats:
    """Counters printed by testpmd's ``stop``.

    ``rx[(port, queue)]`` / ``tx[(port, queue)]``: packets received on / sent
    to that queue; ``port_rx[port]`` / ``port_tx[port]``; ``tx_dropped[port]``.
    """

    def __init__(self, text: str, nb_queues: int, ports: list[int]):
        self.rx: dict[tuple[int, int], int] = {}
        self.tx: dict[tuple[int, int], int] = {}
        self.port_rx: dict[int, int] = {}
        self.port_tx: dict[int, int] = {}
        self.tx_dropped: dict[int, int] = {}
        for m in _STREAM_RX.finditer(text):
            rp, rq, tp, tq, rx, tx, drop = map(int, m.groups())
            self.rx[(rp, rq)] = self.rx.get((rp, rq), 0) + rx
            self.tx[(tp, tq)] = self.tx.get((tp, tq), 0) + tx
        for m in _PORT_FWD.finditer(text):
            port, rx, _rxd, _rxt, tx, txd, _txt = map(int, m.groups())
            self.port_rx[port] = rx
            self.port_tx[port] = tx
            self.tx_dropped[port] = txd
        missing = [p for p in ports if p not in self.port_rx]
        if missing:
            raise PeerError(f"testpmd stop: no forward statistics for ports {missing}:\n{text[-3000:]}")
        if nb_queues == 1:
            # testpmd prints per-stream figures only when streams outnumber
            # ports; with one queue per port, the port figures are the queue's.
            for p in ports:
                self.rx[(p, 0)] = self.port_rx[p]
                self.tx[(p, 0)] = self.port_tx[p]
            return
        # It also leaves out streams that carried nothing.
        for p in ports:
            for q in range(nb_queues):
                self.rx.setdefault((p, q), 0)
                self.tx.setdefault((p, q), 0)
            srx = sum(n for (pp, _), n in self.rx.items() if pp == p)
            stx = sum(n for (pp, _), n in self.tx.items() if pp == p)
            if (srx, stx) != (self.port_rx[p], self.port_tx[p]):
                raise PeerError(f"testpmd stop: per-stream sums rx={srx} tx={stx} differ from port {p}'s "
                                f"rx={self.port_rx[p]} tx={self.port_tx[p]}:\n{text[-3000:]}")

    def __repr__(self) -> str:
        return f"FwdStats(rx={self.rx}, tx={self.tx}, tx_dropped={self.tx_dropped})"


class DpdkTestpmd(Peer):
    """Interactive ``dpdk-testpmd`` driven on stdin."""

    def __init__(self, vdevs: list[str], *, main_lcore: int, queues: int = 1,
                 extra: list[str] | None = None, name: str = "testpmd", startup_timeout: float = 90):
        self.prefix = unique("vqs")
        self.queues = queues
        self.nb_ports = len(vdevs)
        # stdout is a pipe: make testpmd's stdio line-buffered, or command
        # output would sit in its buffer while the prompt (written directly)
        # comes through.
        argv = ["stdbuf", "-oL", "-eL", find_testpmd() or "dpdk-testpmd", "-l", "0,1", "--main-lcore", str(main_lcore),
                "--no-pci", "--no-huge", "-m", "1024", f"--file-prefix={self.prefix}"]
        for v in vdevs:
            argv += ["--vdev", v]
        argv += ["--", "-i", "--nb-cores=1", f"--rxq={queues}", f"--txq={queues}", "--forward-mode=io"]
        argv += extra or []
        super().__init__(argv, name, stdin=subprocess.PIPE)
        try:
            self.wait_for(re.escape(PROMPT), startup_timeout)
            if re.search(r"No probed ethernet devices|Failed to probe|EAL: Error", self.output):
                raise PeerError(f"{name}: did not probe its ports\n{self.tail()}")
        except BaseException:
            self.close()
            raise

    def cmd(self, line: str, timeout: float = 30) -> str:
        """Run one command; return its output (up to the next prompt)."""
        start = len(self.output)
        self.write(line + "\n")
        m = self.wait_for(re.escape(PROMPT), timeout, start=start)
        return self.output[start:m.start()]

    def start(self, tx_first: int | None = None) -> str:
        return self.cmd("start" if tx_first is None else f"start tx_first {tx_first}")

    def stop(self) -> FwdStats:
        out = self.cmd("stop", timeout=60)
        return FwdStats(out, self.queues, list(range(self.nb_ports)))

    def port_stats(self) -> dict[int, tuple[int, int]]:
        """``{port: (rx_packets, tx_packets)}`` from ``show port stats all``."""
        out = self.cmd("show port stats all")
        res = {int(m.group(1)): (int(m.group(2)), int(m.group(5))) for m in _PORT_NIC.finditer(out)}
        if not res:
            raise PeerError(f"{self.name}: cannot parse 'show port stats all':\n{out[-2000:]}")
        return res

    def close(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        rc = super().close(5)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)  # EAL's runtime dir
        return rc


def virtio_user_vdev(sock: str, queues: int = 1, **devargs) -> str:
    extra = "".join(f",{k}={v}" for k, v in devargs.items())
    return f"net_virtio_user0,path={sock},queues={queues}{extra}"


# ---------------------------------------------------------------- back-ends

def vq_rx(pair: int) -> int:
    """Virtqueue index of queue pair ``pair``'s receive queue."""
    return 2 * pair


def vq_tx(pair: int) -> int:
    """Virtqueue index of queue pair ``pair``'s transmit queue."""
    return 2 * pair + 1


class PeerHandle:
    """A test's handle on one :class:`Peer` (``self.peer``): its output's
    tail, ended by :meth:`close` or at the end of a ``with`` block."""

    peer: Peer

    def tail(self) -> str:
        return self.peer.tail()

    def close(self) -> None:
        self.peer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VqscopeServe(PeerHandle):
    """``python -m inspector serve DEVICE ARGS...`` — our vhost-user
    back-end, up once its socket and its introspection socket exist."""

    kind = "vqscope"

    def __init__(self, sock: str, device: str, args: list[str], *, inject: tuple[str, ...] = (),
                 startup_timeout: float = 30):
        self.sock = sock
        argv = [*VQSCOPE, "serve", device, "--socket", sock, *args]
        for spec in inject:  # faults on purpose (inspector/faults.py): KIND=VRING[,after=S][,for=S]
            argv += ["--inject", spec]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.peer = Peer(argv, f"vqscope serve {device}", env=env, cwd=str(ROOT))
        try:
            wait_path(sock, startup_timeout, self.peer.alive)
            wait_path(sock + ".introspect", startup_timeout, self.peer.alive)
        except PeerError as e:
            self.peer.close()
            raise PeerError(f"{e}\n{self.peer.tail()}") from None

    def snapshot(self) -> dict:
        """The snapshot JSON, through the CLI (`vqscope snapshot --json`)."""
        r = subprocess.run([*VQSCOPE, "snapshot", "--connect", self.sock, "--json"], cwd=str(ROOT),
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise PeerError(f"vqscope snapshot failed ({r.returncode}): {r.stderr}\n{self.peer.tail()}")
        return json.loads(r.stdout)


class VqscopeNet(VqscopeServe):
    """``python -m inspector serve net`` — our vhost-user net back-end."""

    def __init__(self, sock: str, *, queues: int = 1, tap: str | None = None, inject: tuple[str, ...] = (),
                 startup_timeout: float = 30):
        self.tap = tap
        args = ["--queues", str(queues), *(["--tap", tap] if tap else ["--loopback"])]
        super().__init__(sock, "net", args, inject=inject, startup_timeout=startup_timeout)

    def queue_packets(self) -> dict[int, int]:
        """``{virtqueue index: packets}``."""
        return {q["index"]: q["packets"] for q in self.snapshot()["queues"]}

    def quiesce(self) -> None:
        """Nothing to do: the snapshot is live."""


class DpdkVhostNet(PeerHandle):
    """Stand-in back-end: testpmd with DPDK's vhost PMD (port 0), io
    forwarding, echoing to the same queue — or, with ``tap``, forwarding
    between port 0 and a DPDK ``net_tap`` port 1 (interface ``tap``).

    Its counters are testpmd's forwarding statistics, collected by
    ``stop``/``start`` and kept cumulative; mapped to virtqueue indices as
    vhost RX queue q = the driver's TX virtqueue 2q+1 and vhost TX queue q =
    the driver's RX virtqueue 2q.
    """

    kind = "dpdk"

    def __init__(self, sock: str, *, queues: int = 1, tap: str | None = None, startup_timeout: float = 90):
        self.sock = sock
        self.tap = tap
        vdevs = [f"net_vhost0,iface={sock},queues={queues}"]
        if tap:
            vdevs.append(f"net_tap0,iface={tap}")
        self.pmd = DpdkTestpmd(vdevs, main_lcore=0, queues=queues, name="testpmd vhost back-end",
                           startup_timeout=startup_timeout)
        self._acc: dict[int, int] = {}
        try:
            self.pmd.start()
            wait_path(sock, 10, self.pmd.alive)
        except BaseException:
            self.pmd.close()
            raise

    def queue_packets(self) -> dict[int, int]:
        st = self.pmd.stop()
        self.pmd.start()
        for (port, q), n in st.rx.items():
            if port == 0:
                self._acc[vq_tx(q)] = self._acc.get(vq_tx(q), 0) + n
        for (port, q), n in st.tx.items():
            if port == 0:
                self._acc[vq_rx(q)] = self._acc.get(vq_rx(q), 0) + n
        return dict(self._acc)

    def snapshot(self) -> dict:
        """A minimal snapshot-shaped dict (only ``index`` and ``packets``)."""
        return {"source": "dpdk", "queues": [{"index": i, "packets": n}
                                             for i, n in sorted(self.queue_packets().items())]}

    def quiesce(self) -> None:
        pass

    @property
    def peer(self) -> DpdkTestpmd:
        return self.pmd


def start_backend(sock: str, *, queues: int = 1, tap: str | None = None):
    """Our back-end, or DPDK's vhost when ``VQSCOPE_PEER_BACKEND=dpdk``."""
    cls = DpdkVhostNet if backend_kind() == "dpdk" else VqscopeNet
    return cls(sock, queues=queues, tap=tap)


def wait_counters(backend, want: dict[int, int], timeout: float = 20.0) -> dict[int, int]:
    """Poll ``backend.queue_packets()`` until every queue in ``want`` has at
    least the wanted count and the counters stopped moving; return them."""
    deadline = time.monotonic() + timeout
    prev = None
    while True:
        cur = backend.queue_packets()
        done = all(cur.get(i, 0) >= n for i, n in want.items())
        if (done and cur == prev) or time.monotonic() > deadline:
            return cur
        prev = cur
        time.sleep(0.5)


# ---------------------------------------------------------------- tap (host side)

def link_exists(ifname: str) -> bool:
    return os.path.exists(f"/sys/class/net/{ifname}")


def link_stat(ifname: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/{name}").read_text())


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise PeerError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def tap_name() -> str:
    """A tap name unique to this process (IFNAMSIZ: 15 characters)."""
    return f"vqt{os.getpid() % 100000}{next(_seq) % 100}"[:15]


def host_subnet() -> str:
    """A /24 prefix (``10.203.X``) that differs between concurrently running
    test processes, so two tap tests do not share a route."""
    return f"10.203.{os.getpid() % 250 + 1}"


def delete_link(ifname: str) -> None:
    if link_exists(ifname):
        ip("link", "del", ifname, check=False)


def tap_up(tap: str, sub: str, mac: str, neighbour: tuple[str, str] | None = None) -> None:
    """Give a back-end's (new) tap the MAC ``mac`` and the host address
    ``{sub}.1/24``, IPv6 off (the host would send router solicitations and
    MLD reports: frames the test did not make), bring it up and, with
    ``neighbour`` (IP, MAC), enter that neighbour permanently (no ARP
    across the back-end)."""
    wait_path(f"/sys/class/net/{tap}", 30)
    Path(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6").write_text("1\n")
    ip("link", "set", "dev", tap, "address", mac)
    ip("addr", "add", f"{sub}.1/24", "dev", tap)
    ip("link", "set", tap, "up")
    if neighbour is not None:
        ip("neigh", "replace", neighbour[0], "lladdr", neighbour[1], "dev", tap, "nud", "permanent")


# ---------------------------------------------------------------- virtme-ng guest

def vng_argv(sock: str | None, script: str, *, mac: str = GUEST_MAC, memory: str = "1G", cpus: int = 1,
             kernel: str | None = None, device_opts: str = "", qemu_extra: str = "",
             chardev_opts: str = "", append: str = "") -> list[str]:
    """The vng command line booting Debian's kernel under TCG with one
    vhost-user virtio-net-pci device on ``sock``, running ``script``.
    ``device_opts`` are appended to that device's options (e.g. ``,id=vunet``),
    ``qemu_extra`` to QEMU's command line (no spaces inside an option: vng
    passes them through a shell), ``chardev_opts`` to the vhost-user socket's
    ``-chardev`` (e.g. ``,reconnect=1``: QEMU reconnects to a restarted back-end).
    ``sock`` None: no net device (the guest's vhost-user devices are all in
    ``qemu_extra``), but still the shareable guest memory vhost-user needs.
    ``append``: more kernel command line (e.g. ``intel_iommu=on``)."""
    net = (f"-chardev socket,id=c0,path={sock}{chardev_opts} -netdev vhost-user,id=n0,chardev=c0 "
           f"-device virtio-net-pci,netdev=n0,mac={mac},vectors=0{device_opts} ") if sock is not None else ""
    qemu_opts = (f"-object memory-backend-memfd,id=mem0,size={memory},share=on -numa node,memdev=mem0 "
                 f"{net}{qemu_extra}").strip()
    return [vng_path() or "vng", "-r", kernel or guest_kernel() or "", "--disable-kvm", "--disable-microvm",
            "--cpus", str(cpus), "--memory", memory, f"--qemu-opts={qemu_opts}",
            *(["--append", append] if append else []), "--exec", script]


# Shell fragment: $IF := the interface whose MAC is GUEST_MAC.
GUEST_FIND_IF = f"""
IF=""
for d in /sys/class/net/*; do
  [ "$(cat $d/address)" = {GUEST_MAC} ] && IF=${{d##*/}}
done
echo "VQS-IF=$IF"
[ -n "$IF" ] || {{ echo VQS-NO-IF; ip -br link; exit 3; }}
st() {{ cat /sys/class/net/$IF/statistics/$1; }}
"""


def guest_if_up(sub: str) -> str:
    """Shell: GUEST_FIND_IF, then $IF up as {sub}.2/24."""
    return GUEST_FIND_IF + f"""ip link set "$IF" up
ip addr add {sub}.2/24 dev "$IF"
"""


class Guest(Peer):
    """A virtme-ng guest; the test talks to its script through stdin (the
    script's ``read``) and stdout (markers like ``VQS-READY``)."""

    def __init__(self, sock: str | None, script: str, **kw):
        env = dict(os.environ)
        env["PATH"] = f"{venv_bin()}:{env.get('PATH', '/usr/bin:/bin')}"  # vng runs virtme-run
        super().__init__(vng_argv(sock, script, **kw), "vng guest", stdin=subprocess.PIPE, env=env,
                         cwd="/tmp")

    def expect(self, marker: str, timeout: float = 240) -> re.Match:
        return self.wait_for(marker, timeout)

    def release(self, line: str = "go") -> None:
        self.write(line + "\n")

    def command(self, line: str, timeout: float = 60) -> str:
        """Send a command-loop guest script one line; return what it printed
        up to its ``VQS-DONE LINE`` answer (the script's echo of the line)."""
        start = len(self.output)
        self.release(line)
        m = self.wait_for(rf"^VQS-DONE {re.escape(line)}\s*$", timeout, start=start)
        return self.output[start:m.start()]

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PeerError(f"guest did not exit within {timeout:.0f} s\n{self.tail()}") from None


# ---------------------------------------------------------------- a VM to attach to

USERNET_MAC = "52:54:00:12:34:60"  # the virtio-net-pci on -netdev user
DISK_SERIAL = "vqsdisk"


def attach_script(vhost_subnet: str, traffic: bool = True) -> str:
    """Guest script for the attach tests: configure the user-net NIC
    (10.0.2.15/24, slirp's gateway 10.0.2.2) and the vhost-user NIC
    ({vhost_subnet}.2/24, IPv6 off: it sends only what the test makes it
    send; the peer {vhost_subnet}.1 is a permanent neighbour at PEER_MAC),
    start the background traffic (pinging both, writing the disk with
    O_DIRECT) if ``traffic``, print VQS-READY, then obey one command a line
    on stdin, each answered with a ``VQS-DONE CMD`` line:

    - ``traffic on`` / ``traffic off``: start / stop the background traffic;
    - ``ping N``: ping {vhost_subnet}.1 N times, 0.2 s apart, and print
      ``VQS-PING sent=S received=R`` (``ping``'s own summary);
    - ``stats``: ``VQS-STATS rx=R tx=T`` of the vhost-user NIC;
    - ``dmesg``: the guest kernel's virtio lines (Linux's virtio_ring says
      "not a head", "out of range" or "broken" about a device's bad used
      descriptors), between ``VQS-DMESG-BEGIN`` and ``VQS-DMESG-END``.

    End of input ends the script (and the guest)."""
    return f"""
UIF=""; VIF=""
for d in /sys/class/net/*; do
  a=$(cat $d/address)
  [ "$a" = {GUEST_MAC} ] && VIF=${{d##*/}}
  [ "$a" = {USERNET_MAC} ] && UIF=${{d##*/}}
done
DISK=""
for b in /sys/block/vd*; do [ "$(cat $b/serial 2>/dev/null)" = {DISK_SERIAL} ] && DISK=/dev/${{b##*/}}; done
echo "VQS-IF user=$UIF vhost=$VIF disk=$DISK"
[ -n "$UIF" ] && [ -n "$VIF" ] && [ -n "$DISK" ] || {{ echo VQS-MISSING; ip -br link; ls /sys/block; exit 3; }}
sysctl -qw net.ipv6.conf.$VIF.disable_ipv6=1
ip link set "$UIF" up; ip addr add 10.0.2.15/24 dev "$UIF"
ip link set "$VIF" up; ip addr add {vhost_subnet}.2/24 dev "$VIF"
ip neigh replace {vhost_subnet}.1 lladdr {PEER_MAC} dev "$VIF" nud permanent
PIDS=""
traffic_on() {{
  [ -n "$PIDS" ] && return
  (while :; do ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; sleep 0.1; done) & PIDS="$PIDS $!"
  (while :; do ping -c 1 -W 1 {vhost_subnet}.1 >/dev/null 2>&1; sleep 0.1; done) & PIDS="$PIDS $!"
  (while :; do dd if=/dev/zero of="$DISK" bs=4k count=16 oflag=direct 2>/dev/null; sleep 0.1; done) & PIDS="$PIDS $!"
}}
traffic_off() {{
  [ -n "$PIDS" ] && kill $PIDS 2>/dev/null; wait 2>/dev/null; PIDS=""
}}
{"traffic_on" if traffic else ""}
echo VQS-READY
while read cmd arg; do
  case "$cmd" in
    traffic) [ "$arg" = on ] && traffic_on || traffic_off ;;
    ping) s=$(ping -c "$arg" -i 0.2 -W 1 {vhost_subnet}.1 | grep "packets transmitted")
          echo "VQS-PING sent=$(echo "$s" | cut -d' ' -f1) received=$(echo "$s" | cut -d' ' -f4)" ;;
    stats) echo "VQS-STATS rx=$(cat /sys/class/net/$VIF/statistics/rx_packets) tx=$(cat /sys/class/net/$VIF/statistics/tx_packets)" ;;
    dmesg) echo VQS-DMESG-BEGIN; dmesg | grep -i -E "virtio|vhost|not a head|unexpected"; echo VQS-DMESG-END ;;
  esac
  echo "VQS-DONE $cmd $arg"
done
"""


class AttachVM:
    """A guest with three virtio devices to attach to: ``unet``
    (virtio-net-pci on ``-netdev user``), ``vblk`` (virtio-blk-pci on a
    small raw image) and ``vunet`` (vhost-user virtio-net-pci on our
    back-end, ``self.backend``), besides virtme-ng's own (9p, virtio-serial),
    and two QMP sockets: ``qmp`` for vqscope, ``qmp_test`` for the test's
    own commands (QEMU serves one client per monitor).

    ``traffic``: the guest generates traffic and disk writes from the start
    (else at :meth:`command` ``traffic on``). ``tap``: the back-end is on a
    tap (``self.tap``) holding the host address ``{self.subnet}.1`` at
    PEER_MAC, so the guest's pings get real replies (otherwise loopback:
    they come back as the guest's own requests). ``reconnect``: QEMU's
    vhost-user chardev has ``reconnect=1``, so :meth:`restart_backend` can
    replace the back-end under the running guest. ``packed``: every virtio
    device (``unet``, ``vblk`` and the vhost-user ``vunet``) has ``packed=on``
    (VIRTIO_F_RING_PACKED, VIRTIO 1.2 §2.8; for ``vunet`` when the back-end
    offers it), so the guest's drivers use packed rings."""

    def __init__(self, boot_timeout: float = 240, *, traffic: bool = True, tap: bool = False,
                 reconnect: bool = False, packed: bool = False):
        self.dir = socket_dir()
        self.sock = f"{self.dir}/vu.sock"
        self.qmp = f"{self.dir}/qmp.sock"
        self.qmp_test = f"{self.dir}/qmpt.sock"
        self.disk = f"{self.dir}/disk.img"
        self.subnet = host_subnet()
        self.tap = tap_name() if tap else None
        with open(self.disk, "wb") as f:
            f.truncate(16 << 20)
        self.backend = None
        self.guest = None
        try:
            self.backend = VqscopeNet(self.sock, tap=self.tap)
            pk = ",packed=on" if packed else ""
            extra = (f"-netdev user,id=u0 -device virtio-net-pci,netdev=u0,mac={USERNET_MAC},id=unet{pk} "
                     f"-drive file={self.disk},if=none,format=raw,id=d0 "
                     f"-device virtio-blk-pci,drive=d0,serial={DISK_SERIAL},id=vblk{pk} "
                     f"-qmp unix:{self.qmp},server=on,wait=off -qmp unix:{self.qmp_test},server=on,wait=off")
            # The script is a file the guest reads from the host's /tmp: virtme-ng passes --exec on
            # the kernel command line, which holds 2048 bytes (a longer script hangs the boot).
            script = f"{self.dir}/guest.sh"
            with open(script, "w") as f:
                f.write(attach_script(self.subnet, traffic))
            self.guest = Guest(self.sock, f"sh {script}", device_opts=",id=vunet" + (",packed=on" if packed else ""),
                               qemu_extra=extra, chardev_opts=",reconnect=1" if reconnect else "")
            self.guest.expect(r"^VQS-READY", boot_timeout)
            self._tap_up()
            wait_path(self.qmp, 10)
        except BaseException:
            self.close()
            raise

    def _tap_up(self) -> None:
        """The host end of the back-end's tap (created when QEMU starts the
        device): {subnet}.1 at PEER_MAC, the guest a permanent neighbour."""
        if self.tap:
            tap_up(self.tap, self.subnet, PEER_MAC, (f"{self.subnet}.2", GUEST_MAC))

    def restart_backend(self, inject: tuple[str, ...] = (), timeout: float = 60) -> None:
        """End the back-end (SIGTERM) and start a new one with ``inject``
        (``--inject`` specs) on the same socket (and tap); return when QEMU
        has connected to it and both vrings run (the RX vring holds the
        guest's buffers). Needs ``reconnect``."""
        self.backend.close()
        self.backend = None
        for p in (self.sock, self.sock + ".introspect"):  # stale files: wait_path must see the new ones
            if os.path.exists(p):
                os.unlink(p)
        if self.tap:
            deadline = time.monotonic() + 30
            while link_exists(self.tap) and time.monotonic() < deadline:  # the old tap goes with its process
                time.sleep(0.1)
        self.backend = VqscopeNet(self.sock, tap=self.tap, inject=inject)
        self.backend.peer.wait_for(r"front-end connected", timeout)
        self._tap_up()
        deadline = time.monotonic() + timeout
        while True:
            qs = {q["index"]: q for q in self.backend.snapshot()["queues"]}
            if 0 in qs and 1 in qs and qs[0]["inflight"] > 0:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"the new back-end's vrings did not start within {timeout:.0f} s: "
                                f"{sorted(qs)}\n{self.tail()}")
            time.sleep(0.2)

    def command(self, line: str, timeout: float = 60) -> str:
        """Send the guest script one command (:func:`attach_script`); return
        what it printed up to its ``VQS-DONE`` line."""
        return self.guest.command(line, timeout)

    def qemu_pid(self) -> int:
        """QEMU's pid: the peer of its QMP socket."""
        import socket as _socket
        import struct as _struct

        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(self.qmp_test)
            return _struct.unpack("3i", s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[0]
        finally:
            s.close()

    def tail(self) -> str:
        return "\n".join(p.tail() for p in (self.guest, self.backend) if p is not None)

    def close(self) -> None:
        try:
            if self.guest is not None:
                self.guest.close()
        finally:
            if self.backend is not None:
                self.backend.close()
            if self.tap:
                delete_link(self.tap)
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
