"""A Linux guest (Debian's kernel under virtme-ng, QEMU/TCG) on two
vhost-user-blk-pci disks served by ``vqscope serve blk``: a filesystem that
outlives the guest and the back-end, and writes that outlive a SIGKILLed
back-end (issue 14).

One guest boot (tests/support/blk.py BlkVM) is shared by both tests; the
filesystem test boots a second time on the same images. ``fs`` carries the
filesystem, ``raw`` the crash test's pattern; each disk has its own back-end
on its own socket, and QEMU's chardev has ``reconnect=1``.

``VQSCOPE_BLK_BACKEND=qsd`` runs the same tests against qemu-storage-daemon
(libvhost-user); there the crash test kills at whatever moment a generation
ends, since qsd cannot be made to hold requests.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.support.blk import (PATTERN_BLOCK, BlkVM, blk_backend_kind, check_pattern, command_rc, debugfs_sha256,
                               parse_sums, pattern_block, require_blk_guest)
from tests.support.peers import PeerError

pytestmark = pytest.mark.qemu

FS_BYTES = 80 << 20     # the sizes differ: the guest finds each disk by its capacity
RAW_BYTES = 24 << 20
FILES = 4               # f1..f4: 1..4 MiB of random data each (10 MiB and a little)
PATTERN_BLOCKS = 1024   # the crash test's region: 4 MiB at the start of ``raw``
WRITER_THREADS = 4      # O_DIRECT writers in the guest: up to 4 requests in flight
KILLS = 2               # back-ends SIGKILLed while holding requests (plus the first, mid-write)
HOLD = "hold-io=0,after=1"   # requestq 0: from 1 s after it starts, requests taken are not submitted


@pytest.fixture(scope="module")
def vm():
    require_blk_guest()
    with BlkVM({"fs": FS_BYTES, "raw": RAW_BYTES}) as v:
        yield v


def _requestq(backend) -> dict:
    return {q["index"]: q for q in backend.snapshot()["queues"]}[0]


def _taken(q: dict) -> int:
    """Requests the device took from requestq ``q`` and has not returned:
    its last_avail_idx minus the used index (mod 2^16, §2.7.6)."""
    return (q["last_avail_idx"] - q["used_idx"]) & 0xFFFF


def _wait_held(backend, timeout: float = 60) -> tuple[int, dict]:
    """Wait until ``backend`` holds requests: its hold-io fault in force
    (snapshot extras ``inject.active``), some requests taken and none
    returned for 1 s. Returns (requests held, requestq's snapshot entry)."""
    deadline = time.monotonic() + timeout
    prev = None
    still = 0
    while True:
        q = _requestq(backend)
        key = (q["used_idx"], q["last_avail_idx"])
        holding = HOLD in q.get("inject", {}).get("active", [])
        still = still + 1 if key == prev and holding and _taken(q) > 0 else 0
        if still >= 4:
            return _taken(q), q
        if time.monotonic() > deadline:
            raise PeerError(f"the back-end held no request within {timeout:.0f} s: {q}\n{backend.tail()}")
        prev = key
        time.sleep(0.25)


def _blk(q: dict) -> dict:
    """A blk queue's counters (snapshot extras ``blk``)."""
    return q.get("blk", {})


def _counters(q: dict) -> dict:
    """The blk counters worth a report line (no ``recent``, no zero bad-request kinds)."""
    blk = dict(_blk(q))
    blk.pop("recent", None)
    blk["bad_requests"] = {k: n for k, n in blk.get("bad_requests", {}).items() if n}
    return blk


def _resubmitted(vm: BlkVM) -> dict:
    """What the new back-end of ``raw`` says it resubmitted: its requestq's
    ``resubmitted`` counter and the counts in its "resubmitting N
    request(s)" log lines (vqscope; nothing for qsd)."""
    be = vm.backends["raw"]
    if blk_backend_kind() != "vqscope":
        return {}
    return {"resubmitted": _blk(_requestq(be)).get("resubmitted"),
            "log": [int(n) for n in re.findall(r"resubmitting (\d+) request", be.peer.output)]}


def _next_gen(vm: BlkVM, after: int, timeout: float = 120) -> int:
    """Wait for the guest writer's first generation above ``after``; return it."""
    m = vm.guest.wait_for(rf"^VQS-GEN ({after + 1})\s*$", timeout)
    return int(m.group(1))


def _last_gen(vm: BlkVM) -> int:
    gens = re.findall(r"^VQS-GEN (\d+)\s*$", vm.guest.output, re.M)
    return int(gens[-1]) if gens else 0


@pytest.mark.timeout(600)
def test_sigkilled_backend_loses_no_write(vm):
    """The guest writes generation after generation of a pattern (block b
    of generation g holds (b, g)) with O_DIRECT from 4 threads while the
    host SIGKILLs ``raw``'s back-end — first mid-write, then KILLS times
    while it holds requests it took (``--inject hold-io``) — and starts a
    new one on the same socket. The guest sees no I/O error; afterwards every
    block of the image holds the last generation the guest wrote; each
    restarted back-end resubmitted exactly the requests its predecessor held
    (INFLIGHT_SHMFD), and the guest saw no used id twice."""
    kind = blk_backend_kind()
    log = []
    try:
        vm.command(f"pattern-start raw 0 {PATTERN_BLOCKS} {WRITER_THREADS}")
        gen = _next_gen(vm, 0)
        t0 = time.monotonic()
        hold = (HOLD,) if kind == "vqscope" else ()
        vm.restart_backend("raw", inject=hold)      # the boot back-end dies mid-write
        log.append({"kill": 0, "after_generation": gen, **_resubmitted(vm)})
        for k in range(KILLS):
            if kind == "vqscope":
                held, q = _wait_held(vm.backends["raw"])
            else:
                gen = _next_gen(vm, _last_gen(vm))
                held, q = None, {}
            vm.restart_backend("raw", inject=hold if k < KILLS - 1 else ())
            log.append({"kill": k + 1, "held": held, "in_flight": _blk(q).get("in_flight"), **_resubmitted(vm)})
        gen = _next_gen(vm, _last_gen(vm))          # the writer goes on on the last back-end
        gen = _next_gen(vm, gen)
        out = vm.command("pattern-stop", timeout=180)
        elapsed = time.monotonic() - t0
        m = re.search(r"^VQS-PATTERN gens=(\d+) errors=(\d+)", out, re.M)
        assert m, f"the guest writer printed no summary:\n{out}\n{vm.tail()}"
        gens, errors = int(m.group(1)), int(m.group(2))
        guest_errors = vm.guest_errors()
        bad = check_pattern(vm.images["raw"], 0, PATTERN_BLOCKS, gens)
        last = vm.backends["raw"].snapshot()
        print(f"[{kind}] crash test: {gens} generations of {PATTERN_BLOCKS} blocks in {elapsed:.1f} s, "
              f"{errors} writer errors, {len(bad)} bad blocks; kills: {log}; last back-end requestq: "
              f"{_counters(last['queues'][0]) if last else None}")
        assert errors == 0 and command_rc(out) == 0, f"the guest saw I/O errors:\n{out}"
        assert not guest_errors, f"the guest kernel logged block or ring errors: {guest_errors}"
        assert not bad, f"{len(bad)} blocks do not hold generation {gens}: {bad[:10]}"
        if kind == "vqscope":
            for entry in log[1:]:
                assert entry["held"] > 0 and entry["in_flight"] == entry["held"], entry
                assert entry["log"] == [entry["held"]], entry
                assert entry["resubmitted"] == entry["held"], \
                    f"kill {entry['kill']}: the new back-end resubmitted {entry['resubmitted']} of the " \
                    f"{entry['held']} requests the dead one held"
    except PeerError as e:
        raise AssertionError(f"{e}\nkills so far: {log}\n{vm.tail()}") from None


@pytest.mark.timeout(600)
def test_filesystem_survives_second_boot(vm):
    """mkfs.ext4 on ``fs``, FILES files of random data, sync and their
    sha256 in the guest; the same sums read by debugfs from the image on the
    host; then a second boot (new back-ends, new QEMU) on the same images
    mounts ``fs`` and prints the same sums."""
    try:
        assert command_rc(vm.command("mkfs fs", timeout=180)) == 0, vm.tail()
        out = vm.command(f"write fs {FILES}", timeout=300)
        assert command_rc(out) == 0, f"mount, write, sync or umount failed in the guest:\n{out}"
        sums = parse_sums(out)
        assert sorted(sums) == [f"f{i}" for i in range(1, FILES + 1)], out
        host = debugfs_sha256(vm.images["fs"], sorted(sums))
        assert host == sums, f"the image read on the host differs from what the guest wrote: {host} != {sums}"
        vm.reboot()
        out = vm.command("sums fs", timeout=180)
        assert command_rc(out) == 0, f"the second boot could not mount the filesystem:\n{out}"
        again = parse_sums(out)
        print(f"[{blk_backend_kind()}] filesystem: {len(sums)} files, same sums after boot {vm.boots}: "
              f"{again == sums}")
        assert again == sums, f"second boot read {again}, the first wrote {sums}"
        assert not vm.guest_errors()
    except PeerError as e:
        raise AssertionError(f"{e}\n{vm.tail()}") from None


def test_pattern_checker_names_stale_and_foreign_blocks(tmp_path):
    """The checker itself (no guest): an image whose blocks hold generation
    3, but block 5 generation 2, block 7 zeros, block 9 block 8's record."""
    img = tmp_path / "img"
    blocks = [pattern_block(b, 3) for b in range(16)]
    blocks[5] = pattern_block(5, 2)
    blocks[7] = bytes(PATTERN_BLOCK)
    blocks[9] = pattern_block(8, 3)
    img.write_bytes(b"".join(blocks))
    bad = check_pattern(str(img), 0, 16, 3)
    assert [ln.split(":")[0] for ln in bad] == ["block 5", "block 7", "block 9"], bad
    assert "generation 2" in bad[0] and "not a pattern block" in bad[1] and "holds block 8" in bad[2], bad
    # A region at block 4 of the image: its block b (image block 4 + b) holds pattern block b.
    img.write_bytes(bytes(4 * PATTERN_BLOCK) + b"".join(pattern_block(b, 1) for b in range(4)))
    assert check_pattern(str(img), 4, 4, 1) == []
