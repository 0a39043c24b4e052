"""A Linux guest on vhost-user-blk back-ends, for the real-guest tests of
virtio-blk (tests/integration/test_blk_guest.py).

The back-end under test is ``python -m inspector serve blk`` (our device).
Set ``VQSCOPE_BLK_BACKEND=qsd`` to run the same guest against
qemu-storage-daemon's vhost-user-blk export (libvhost-user) instead: that
proves the harness when our back-end is broken or absent.

Recipe (measured on the 2-core Debian 12 CI machine, QEMU 7.2, TCG): the
guest memory of :func:`tests.support.peers.vng_argv` (memfd, ``share=on``)
plus, per disk, ``-chardev socket,id=ID,path=SOCK,reconnect=1 -device
vhost-user-blk-pci,chardev=ID,num-queues=1``. Unlike virtio-net-pci,
vhost-user-blk-pci boots with MSI-X under TCG (no ``vectors=0`` needed);
Linux finds it as ``/dev/vdX`` (virtio_blk), about 21 s from ``vng`` to the
guest script on an idle host. A vhost-user-blk device has no ``serial``
property (GET_ID is the back-end's), so the guest script finds each disk by
its capacity in sectors: every disk of a :class:`BlkVM` has its own size.

``reconnect=1``: when the back-end dies QEMU stops the device and connects
again every second; QEMU's vhost-user-blk then sends GET_INFLIGHT_FD /
SET_INFLIGHT_FD (when the back-end offers INFLIGHT_SHMFD), so a new back-end
can resubmit what the dead one had taken but not completed. The guest's
requests meanwhile wait in its ring (Linux's virtio_blk has no timeout).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import time

from tests.conftest import require
from tests.support.peers import Guest, Peer, PeerError, PeerHandle, VqscopeServe, require_guest, socket_dir, wait_path
from tests.support.qsd import qsd_command

#: What the crash test writes: one record per block, repeated to fill it.
PATTERN_BLOCK = 4096
PATTERN_MAGIC = b"VQSBLOCK"
_RECORD = struct.Struct("<8sQQQ")  # magic, block, generation, a check word: block * _CHECK_MUL ^ generation
_CHECK_MUL = 1000003


def blk_backend_kind() -> str:
    """``vqscope`` (default) or ``qsd`` (``VQSCOPE_BLK_BACKEND``)."""
    kind = os.environ.get("VQSCOPE_BLK_BACKEND", "vqscope")
    if kind not in ("vqscope", "qsd"):
        raise ValueError(f"VQSCOPE_BLK_BACKEND={kind!r}: expected 'vqscope' or 'qsd'")
    return kind


def require_blk_guest() -> None:
    """Fail (CI) or skip (locally) unless a vhost-user-blk guest can run:
    what :func:`require_guest` checks, the guest's tools (taken from the
    host's userland) and, for ``qsd``, qemu-storage-daemon."""
    require_guest("QEMU's vhost-user guest needs root")
    for tool in ("mkfs.ext4", "sha256sum", "debugfs"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (e2fsprogs, coreutils; make deps)")
    require(os.path.exists("/usr/bin/python3"), "the guest's pattern writer runs the host's /usr/bin/python3")
    if blk_backend_kind() == "qsd":
        require(shutil.which("qemu-storage-daemon") is not None,
                "qemu-storage-daemon is not installed (qemu-system-common)")


# ---------------------------------------------------------------- back-ends

def _sigkill(peer: Peer, timeout: float = 30) -> None:
    """SIGKILL ``peer``'s process group (no cleanup, no GET_VRING_BASE) and reap it."""
    try:
        os.killpg(peer.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    peer.proc.wait(timeout)


class VqscopeBlk(VqscopeServe):
    """``python -m inspector serve blk --file IMAGE`` on ``sock``."""

    def __init__(self, sock: str, image: str, *, readonly: bool = False, queues: int = 1,
                 inject: tuple[str, ...] = (), startup_timeout: float = 30):
        self.image = image
        args = ["--file", image, "--queues", str(queues), *(["--readonly"] if readonly else [])]
        super().__init__(sock, "blk", args, inject=inject, startup_timeout=startup_timeout)

    def kill(self) -> None:
        _sigkill(self.peer)

    def wait_started(self, timeout: float) -> dict:
        """Wait until QEMU is connected and requestq 0 runs; return its
        snapshot entry."""
        self.peer.wait_for(r"front-end connected", timeout)
        deadline = time.monotonic() + timeout
        while True:
            qs = {q["index"]: q for q in self.snapshot()["queues"]}
            if 0 in qs:
                return qs[0]
            if time.monotonic() > deadline:
                raise PeerError(f"requestq 0 did not start within {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.2)


class QsdBlk(PeerHandle):
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``sock``
    (no snapshot, no faults)."""

    kind = "qsd"

    def __init__(self, sock: str, image: str, *, readonly: bool = False, queues: int = 1,
                 inject: tuple[str, ...] = (), startup_timeout: float = 30):
        if inject:
            raise ValueError(f"qemu-storage-daemon injects no faults: {inject}")
        self.sock = sock
        self.image = image
        self.peer = Peer(qsd_command(image, sock, writable=not readonly, num_queues=queues),
                         "qemu-storage-daemon")
        try:
            wait_path(sock, startup_timeout, self.peer.alive)
        except PeerError as e:
            self.peer.close()
            raise PeerError(f"{e}\n{self.peer.tail()}") from None

    def snapshot(self) -> None:
        return None

    def kill(self) -> None:
        _sigkill(self.peer)

    def wait_started(self, timeout: float) -> None:
        """Nothing to wait for that qsd shows: QEMU reconnects within a second."""


def start_blk_backend(sock: str, image: str, **kw) -> VqscopeBlk | QsdBlk:
    """Our back-end, or qemu-storage-daemon when ``VQSCOPE_BLK_BACKEND=qsd``."""
    cls = QsdBlk if blk_backend_kind() == "qsd" else VqscopeBlk
    return cls(sock, image, **kw)


def vhost_user_blk_opts(dev_id: str, sock: str, queues: int = 1) -> str:
    """QEMU options for one vhost-user-blk-pci disk on ``sock`` whose chardev
    reconnects (``reconnect=1``) to a restarted back-end."""
    return (f"-chardev socket,id={dev_id},path={sock},reconnect=1 "
            f"-device vhost-user-blk-pci,chardev={dev_id},num-queues={queues},id={dev_id}dev")


# ---------------------------------------------------------------- the pattern and its checker

def pattern_block(block: int, gen: int) -> bytes:
    """The PATTERN_BLOCK bytes block ``block`` holds after generation ``gen``
    of the pattern writer (the guest's copy is in PATTERN_WRITER)."""
    return _RECORD.pack(PATTERN_MAGIC, block, gen, (block * _CHECK_MUL) ^ gen) * (PATTERN_BLOCK // _RECORD.size)


def check_pattern(image: str, first: int, nblocks: int, gen: int) -> list[str]:
    """Read ``image`` outside the guest: every block ``first + b`` (units of
    PATTERN_BLOCK) for ``b < nblocks`` must hold ``pattern_block(b, gen)``.
    Returns one line per block that does not (what it holds instead)."""
    bad = []
    with open(image, "rb") as f:
        f.seek(first * PATTERN_BLOCK)
        data = f.read(nblocks * PATTERN_BLOCK)
    for b in range(nblocks):
        got = data[b * PATTERN_BLOCK:(b + 1) * PATTERN_BLOCK]
        if got == pattern_block(b, gen):
            continue
        if len(got) == PATTERN_BLOCK and got == got[:_RECORD.size] * (PATTERN_BLOCK // _RECORD.size) \
                and got.startswith(PATTERN_MAGIC):
            _, blk, g, _ = _RECORD.unpack_from(got)
            bad.append(f"block {b}: holds block {blk} of generation {g}, not generation {gen}")
        else:
            bad.append(f"block {b}: not a pattern block (first bytes {got[:32].hex()})")
    return bad


# The guest's writer (the host's /usr/bin/python3, stdlib only): generation
# after generation, THREADS threads each write every THREADS-th block of the
# region with O_DIRECT (so THREADS requests are in flight), one pwrite of
# PATTERN_BLOCK bytes per block. SIGUSR1 asks it to stop after the current
# generation. It prints "VQS-GEN g" after each generation and at the end
# "VQS-PATTERN gens=G errors=E" and the first errors.
PATTERN_WRITER = f'''
import mmap, os, signal, struct, sys, threading
dev, first, nblocks, nthreads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BS = {PATTERN_BLOCK}
stop = threading.Event()
signal.signal(signal.SIGUSR1, lambda *a: stop.set())
def block(b, g):
    return struct.pack({_RECORD.format!r}, {PATTERN_MAGIC!r}, b, g, (b * {_CHECK_MUL}) ^ g) * (BS // {_RECORD.size})
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
errors = []
def worker(k, g):
    buf = mmap.mmap(-1, BS)  # page-aligned, as O_DIRECT wants
    for b in range(k, nblocks, nthreads):
        buf[:] = block(b, g)
        try:
            n = os.pwrite(fd, buf, (first + b) * BS)
            if n != BS:
                errors.append(f"block {{b}} gen {{g}}: short write {{n}}")
        except OSError as e:
            errors.append(f"block {{b}} gen {{g}}: {{e}}")
g = 0
while not stop.is_set() and not errors:
    g += 1
    ts = [threading.Thread(target=worker, args=(k, g)) for k in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(f"VQS-GEN {{g}}", flush=True)
try:
    os.fsync(fd)
except OSError as e:
    errors.append(f"fsync: {{e}}")
print(f"VQS-PATTERN gens={{g}} errors={{len(errors)}}", *errors[:5], sep="\\n", flush=True)
'''


# ---------------------------------------------------------------- the guest

#: Lines of the guest kernel's log that mean the disk failed a request or
#: the device broke its ring (Linux blk_update_request / virtio_ring).
GUEST_ERROR_RX = (r"I/O error|blk_update_request|critical medium|beyond end of device|not a head|out of range"
                  r"|is broken|EXT4-fs error|Buffer I/O")


def blk_guest_script(disks: dict[str, int], writer: str) -> str:
    """Guest script: find each disk of ``disks`` ({name: capacity in
    sectors}) as ``/dev/vdX`` (shell variable ``$DISK_name``), print
    ``VQS-DISKS``, ``VQS-READY``, then obey one command a line on stdin,
    each answered with ``VQS-DONE CMD``:

    - ``mkfs NAME``: ``mkfs.ext4`` on disk NAME (``VQS-RC n``);
    - ``write NAME N``: mount it, write files f1..fN of i MiB + i*4097 bytes
      of random data, ``sync``, print ``VQS-SUM sha256 name`` for each,
      unmount (``VQS-RC n``: the first failure's status);
    - ``sums NAME``: mount it read-only, ``VQS-SUM`` lines, unmount;
    - ``pattern-start NAME FIRST NBLOCKS THREADS``: run ``writer`` (the
      PATTERN_WRITER file) on disk NAME in the background;
    - ``pattern-stop``: ask it to stop after its current generation and wait
      for its ``VQS-PATTERN`` line;
    - ``dmesg``: the guest kernel's block and virtio error lines, between
      ``VQS-DMESG-BEGIN`` and ``VQS-DMESG-END``.

    End of input ends the script (and the guest)."""
    find = "\n".join(
        f'for b in /sys/block/vd*; do [ "$(cat $b/size)" = {sectors} ] && DISK_{name}=/dev/${{b##*/}}; done'
        for name, sectors in disks.items())
    have = " ".join(f"{name}=$DISK_{name}" for name in disks)
    check = " && ".join(f'[ -n "$DISK_{name}" ]' for name in disks)
    return f"""
{find}
echo "VQS-DISKS {have}"
{check} || {{ echo VQS-MISSING; for b in /sys/block/*; do echo "$b $(cat $b/size)"; done; exit 3; }}
MNT=$(mktemp -d)
WPID=""
disk() {{ eval echo \\$DISK_$1; }}
echo VQS-READY
while read -r line; do
  set -- $line
  case "$1" in
    mkfs) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$(disk $2)"; echo "VQS-RC $?" ;;
    write) rc=0
      mount "$(disk $2)" "$MNT" || rc=$?
      i=1
      while [ $rc = 0 ] && [ $i -le "$3" ]; do
        head -c $((i * 1048576 + i * 4097)) /dev/urandom > "$MNT/f$i" || rc=$?
        i=$((i + 1))
      done
      sync || rc=$?
      (cd "$MNT" && sha256sum f*) | sed 's/^/VQS-SUM /'
      umount "$MNT" || rc=$?
      echo "VQS-RC $rc" ;;
    sums) mount -o ro "$(disk $2)" "$MNT"; echo "VQS-RC $?"
      (cd "$MNT" && sha256sum f*) | sed 's/^/VQS-SUM /'
      umount "$MNT" ;;
    pattern-start) /usr/bin/python3 {writer} "$(disk $2)" "$3" "$4" "$5" </dev/null & WPID=$! ;;
    pattern-stop) kill -USR1 $WPID; wait $WPID; echo "VQS-RC $?"; WPID="" ;;
    dmesg) echo VQS-DMESG-BEGIN; dmesg | grep -E "{GUEST_ERROR_RX}"; echo VQS-DMESG-END ;;
  esac
  echo "VQS-DONE $line"
done
"""


def parse_sums(out: str) -> dict[str, str]:
    """``{file name: sha256}`` from a command's ``VQS-SUM`` lines."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^VQS-SUM ([0-9a-f]{64})\s+(\S+)\s*$", out, re.M)}


def command_rc(out: str) -> int:
    """The ``VQS-RC n`` status a guest command printed."""
    m = re.search(r"^VQS-RC (\d+)\s*$", out, re.M)
    if not m:
        raise PeerError(f"the guest command printed no VQS-RC line:\n{out[-2000:]}")
    return int(m.group(1))


def debugfs_sha256(image: str, names: list[str]) -> dict[str, str]:
    """Checksums of files in the root of the ext4 filesystem ``image``, read
    on the host by ``debugfs -R 'cat /NAME'`` (no mount, no loop device)."""
    sums = {}
    for name in names:
        r = subprocess.run(["debugfs", "-R", f"cat /{name}", image], capture_output=True, timeout=60)
        if r.returncode != 0:
            raise PeerError(f"debugfs cat /{name} on {image}: {r.stderr.decode(errors='replace')}")
        sums[name] = hashlib.sha256(r.stdout).hexdigest()
    return sums


class BlkVM:
    """One guest boot with one vhost-user-blk-pci disk per entry of
    ``disks`` ({name: size in bytes}, the sizes all different, multiples of
    4096), each a raw image ``self.images[name]`` in a private directory on
    its own back-end (``self.backends[name]``, :func:`start_blk_backend`) at
    ``self.socks[name]``. The guest runs :func:`blk_guest_script`;
    :meth:`command` sends it a command. :meth:`restart_backend` SIGKILLs a
    disk's back-end and starts a new one on the same socket and image;
    :meth:`reboot` ends guest and back-ends and boots again on the same
    images."""

    def __init__(self, disks: dict[str, int], boot_timeout: float = 240):
        for name, size in disks.items():
            if size % PATTERN_BLOCK or list(disks.values()).count(size) > 1:
                raise ValueError(f"disk {name}: size {size} must be a multiple of {PATTERN_BLOCK} "
                                 f"and differ from every other disk's")
        self.dir = socket_dir()
        self.disks = dict(disks)
        self.images = {name: f"{self.dir}/{name}.img" for name in disks}
        self.socks = {name: f"{self.dir}/{name}.sock" for name in disks}
        self.boot_timeout = boot_timeout
        self.backends: dict[str, VqscopeBlk | QsdBlk] = {}
        self.guest: Guest | None = None
        self.boots = 0
        for name, size in disks.items():
            with open(self.images[name], "wb") as f:
                f.truncate(size)
        self.writer = f"{self.dir}/pattern_writer.py"
        with open(self.writer, "w") as f:
            f.write(PATTERN_WRITER)
        # The script is a file the guest reads from the host's /tmp: virtme-ng passes --exec on the
        # kernel command line, which holds 2048 bytes.
        self.script = f"{self.dir}/guest.sh"
        with open(self.script, "w") as f:
            f.write(blk_guest_script({n: s // 512 for n, s in disks.items()}, self.writer))
        try:
            self.boot()
        except BaseException:
            self.close()
            raise

    def boot(self) -> None:
        """Start a back-end per disk and boot the guest; return at VQS-READY."""
        for name in self.disks:
            self.backends[name] = start_blk_backend(self.socks[name], self.images[name])
        extra = " ".join(vhost_user_blk_opts(f"blk{i}", self.socks[name]) for i, name in enumerate(self.disks))
        self.guest = Guest(None, f"sh {self.script}", qemu_extra=extra)
        self.boots += 1
        m = self.guest.expect(r"^VQS-(READY|MISSING)", self.boot_timeout)
        if m.group(1) == "MISSING":
            raise PeerError(f"the guest did not find every disk by its size\n{self.tail()}")

    def command(self, line: str, timeout: float = 120) -> str:
        """Send the guest script one command; return its output."""
        return self.guest.command(line, timeout)

    def restart_backend(self, name: str, inject: tuple[str, ...] = (), timeout: float = 60) -> None:
        """SIGKILL disk ``name``'s back-end and start a new one (with
        ``inject``, vqscope's ``--inject`` specs) on the same socket and
        image; return when QEMU has connected again and (vqscope) its
        requestq runs."""
        old = self.backends.pop(name)
        old.kill()
        old.close()
        for p in (self.socks[name], self.socks[name] + ".introspect"):  # stale: wait_path must see new ones
            if os.path.exists(p):
                os.unlink(p)
        self.backends[name] = start_blk_backend(self.socks[name], self.images[name], inject=inject)
        self.backends[name].wait_started(timeout)

    def reboot(self) -> None:
        """End the guest and every back-end, then boot again on the same images."""
        self._stop()
        self.boot()

    def guest_errors(self) -> list[str]:
        """The guest kernel's block and virtio error lines (GUEST_ERROR_RX)."""
        out = self.command("dmesg")
        body = out[out.index("VQS-DMESG-BEGIN") + len("VQS-DMESG-BEGIN"):out.index("VQS-DMESG-END")]
        return [ln for ln in body.splitlines() if ln.strip()]

    def tail(self) -> str:
        parts = [self.guest] if self.guest is not None else []
        return "\n".join(p.tail() for p in [*parts, *self.backends.values()])

    def _stop(self) -> None:
        try:
            if self.guest is not None:
                try:
                    self.guest.proc.stdin.close()  # end of input ends the script and the guest
                    self.guest.proc.wait(60)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                self.guest.close()
                self.guest = None
        finally:
            for be in self.backends.values():
                be.close()
            self.backends.clear()

    def close(self) -> None:
        try:
            self._stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
