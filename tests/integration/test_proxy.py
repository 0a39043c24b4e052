"""``vqscope proxy`` between real third-party peers (issue 15).

1. dpdk-testpmd virtio_user -> proxy -> dpdk-testpmd ``net_vhost`` (io
   forwarding), split and packed rings (``packed_vq=1``): traffic flows; two
   proxy snapshots show both rings advancing; once both testpmds stopped
   forwarding, each ring's used index in the proxy's snapshot agrees with
   the back-end testpmd's counters (split: mod 2^16); the whole session's
   message log decodes (no entry ``malformed``) and the proxy originated no
   message (link counters in == out, ``proxy_originated`` 0).
2. A QEMU guest's vhost-user-blk-pci -> proxy -> qemu-storage-daemon (one
   boot): the guest writes files and reads them back (sha256, and debugfs
   on the host image); the snapshot shows the request queue with
   ``device_type`` "block"; SIGKILLing qemu-storage-daemon closes QEMU's
   connection (proxy: "back-end hung up"), and when it is back on the same
   socket QEMU's ``reconnect=1`` comes back through the proxy and the
   guest's I/O works again.
3. The hostile corpus (tests/support/hostile_corpus.py) through the proxy to
   testpmd's ``net_vhost``, each case after a handshake of the built-in
   front-end: the proxy stays up, its fd count returns to its baseline, it
   logs one "(forwarded as-is)" line per case malformed at the protocol
   level (what protocol.check_header / the framing reject without session
   state) and none for cases only a back-end's semantics reject, and the
   back-end saw each case (DPDK logs the messages it reads).

``VQSCOPE_TEST_PROXY=off`` runs the same peers connected directly (the
harness without the proxy; assertions about the proxy are left out).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from types import SimpleNamespace

import pytest

from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.vhost_user.frontend import VhostUserFrontend

from tests.conftest import require, wait_for
from tests.support.blk import (QsdBlk, blk_guest_script, command_rc, debugfs_sha256, parse_sums,
                               require_blk_guest, vhost_user_blk_opts)
from tests.support.hostile_corpus import CORPUS, Ctx, send_case
from tests.support.peers import (DpdkTestpmd, DpdkVhostNet, Guest, PeerError, find_testpmd, is_root, socket_dir,
                                 virtio_user_vdev, vq_rx, vq_tx)
from tests.support.proxy import CUT_CASES, PROXY_SEES, interpose

BURSTS = 4            # tx_first bursts of 32 frames: 128 in flight
MIN_PACKETS = 200_000  # each way before the counters are compared
RUN_TIMEOUT = 120.0


def _require_dpdk() -> None:
    require(is_root(), "DPDK's virtio_user and vhost need root")
    require(find_testpmd() is not None, "dpdk-testpmd is not installed (Debian 'dpdk'; make deps)")


def _conn_id(px, start: int, timeout: float = 30) -> int:
    """The proxy's id of the connection that came up after output offset ``start``."""
    m = px.peer.wait_for(r"proxy: connection (\d+): front-end connected, back-end connected", timeout, start=start)
    return int(m.group(1))


def _conn_queues(px, conn: int, snap: dict | None = None) -> dict[int, dict]:
    """``{vring index: QueueEntry}`` of connection ``conn`` in the proxy's snapshot."""
    return {i: q for (c, i), q in px.queues(snap).items() if c == conn}


def _used_pos(q: dict) -> int:
    """The ring's used position: split ``used_idx``; packed the count of
    (``next_used``, ``used_wrap_counter``), modulo 2 x size."""
    if q["layout"] == "split":
        return q["used_idx"]
    return q["next_used"] + q["size"] * (1 - q["used_wrap_counter"])


def _used_modulus(q: dict) -> int:
    return 1 << 16 if q["layout"] == "split" else 2 * q["size"]


def assert_link_balanced(q: dict) -> dict:
    """The ``proxy`` extras' ``link`` of a queue: for each direction, messages,
    bytes and fds in (``messages``...) == out (``messages_out``...), and
    nothing the proxy originated."""
    link = q["proxy"]["link"]
    assert link["proxy_originated"] == 0, link
    assert {"front_end", "back_end", "backend_req"} <= set(link), link
    for direction, d in link.items():
        if direction == "proxy_originated":
            continue
        for what in ("messages", "bytes", "fds"):
            assert d[what] == d[f"{what}_out"], (direction, what, link)
    return link


def assert_log_decodes(px, conn: int) -> list[dict]:
    """The proxy's message log of connection ``conn``: every entry decoded
    (``malformed`` None), with a direction; returns the entries."""
    msgs = [m for m in px.messages() if m.get("connection") == conn]
    assert msgs, f"no message of connection {conn} in the proxy's log"
    bad = [m for m in msgs if m.get("malformed")]
    assert not bad, f"malformed entries in a session between two real peers: {bad[:5]}"
    dirs = {m["direction"] for m in msgs}
    assert dirs <= {"front-end", "back-end", "backend-req", "backend-req-reply"}, dirs
    assert "front-end" in dirs, dirs
    return msgs


# ---------------------------------------------------------------- QEMU guest -> proxy -> qemu-storage-daemon
# (first in the file: the DPDK back-end of the later tests busy-polls a CPU the TCG guest needs)

DISK_BYTES = 64 << 20   # the guest finds the disk by its capacity
FILES = 2               # f1, f2: 1 and 2 MiB of random data


@pytest.fixture(scope="module")
def blk_path():
    """One guest boot: a vhost-user-blk-pci disk (QEMU ``reconnect=1``) on
    the proxy in front of qemu-storage-daemon (or on qsd directly with
    VQSCOPE_TEST_PROXY=off)."""
    require_blk_guest()
    require(shutil.which("qemu-storage-daemon") is not None,
            "qemu-storage-daemon is not installed (qemu-system-common; make deps)")
    d = socket_dir()
    ns = SimpleNamespace(image=f"{d}/disk.img", back=f"{d}/be.sock", qsd=None, guest=None)
    with open(ns.image, "wb") as f:
        f.truncate(DISK_BYTES)
    script = f"{d}/guest.sh"          # a file: vng's --exec goes on a 2048-byte kernel command line
    with open(script, "w") as f:
        f.write(blk_guest_script({"d": DISK_BYTES // 512}, f"{d}/unused_writer.py"))
    try:
        ns.qsd = QsdBlk(ns.back, ns.image)
        with interpose(ns.back, f"{d}/fe.sock") as (front, px):
            ns.px = px
            ns.guest = Guest(None, f"sh {script}", qemu_extra=vhost_user_blk_opts("blk0", front))
            m = ns.guest.expect(r"^VQS-(READY|MISSING)", 300)
            if m.group(1) == "MISSING":
                raise PeerError(f"the guest found no disk of {DISK_BYTES} bytes\n{ns.guest.tail()}")
            yield ns
    finally:
        if ns.guest is not None:
            try:
                ns.guest.proc.stdin.close()   # end of input ends the script and the guest
                ns.guest.proc.wait(60)
            except (OSError, Exception):
                pass
            ns.guest.close()
        if ns.qsd is not None:
            ns.qsd.close()
        shutil.rmtree(d, ignore_errors=True)


def _blk_tail(ns) -> str:
    return "\n".join(x.tail() for x in (ns.guest, ns.px, ns.qsd) if x is not None)


def _write_and_check(ns, files: int) -> dict[str, str]:
    """The guest writes ``files`` files (sha256 in the guest), the host
    reads them from the image (debugfs), the guest mounts again and reads
    them back: all three sums agree."""
    out = ns.guest.command(f"write d {files}", timeout=300)
    assert command_rc(out) == 0, f"mount, write, sync or umount failed in the guest:\n{out}\n{_blk_tail(ns)}"
    sums = parse_sums(out)
    assert sorted(sums) == [f"f{i}" for i in range(1, files + 1)], out
    assert debugfs_sha256(ns.image, sorted(sums)) == sums, "the image on the host differs from what the guest wrote"
    back = ns.guest.command("sums d", timeout=180)
    assert command_rc(back) == 0 and parse_sums(back) == sums, f"read back {parse_sums(back)}, wrote {sums}"
    return sums


@pytest.mark.qemu
@pytest.mark.timeout(900)
def test_guest_blk_through_proxy_survives_qsd_restart(blk_path):
    ns = blk_path
    px = ns.px
    try:
        assert command_rc(ns.guest.command("mkfs d", timeout=240)) == 0, _blk_tail(ns)
        sums = _write_and_check(ns, FILES)
        conn = None
        if px:
            conn = int(re.findall(r"proxy: connection (\d+): front-end connected, back-end connected",
                                  px.peer.output)[-1])
            qs = _conn_queues(px, conn)
            assert 0 in qs, f"no request queue in the proxy's snapshot: {qs}\n{px.tail()}"
            q = qs[0]
            assert q["device_type"] == "block" and q["layout"] == "split" and q["size"] > 0, q
            assert q["used_idx"] is not None and q["last_avail_idx"] is None, q
            assert q["proxy"]["started"] and q["proxy"]["enabled"], q
            assert_link_balanced(q)
            assert_log_decodes(px, conn)
        # qemu-storage-daemon dies: QEMU's connection is closed, QEMU retries every second.
        start = len(px.peer.output) if px else 0
        ns.qsd.kill()
        ns.qsd.close()
        if px:
            px.peer.wait_for(rf"proxy: connection {conn} closed: back-end hung up", 30, start=start)
            # QEMU's reconnects are refused as qsd's own socket would refuse them.
            px.peer.wait_for(r"proxy: back-end .* is down .*not listening", 30, start=start)
            assert px.peer.alive()
        if os.path.exists(ns.back):
            os.unlink(ns.back)             # SIGKILL left its socket file
        ns.qsd = QsdBlk(ns.back, ns.image)
        if px:
            px.peer.wait_for(r"proxy: back-end .* is back: listening on .* again", 30, start=start)
            m = px.peer.wait_for(r"proxy: connection (\d+): front-end connected, back-end connected", 60,
                                 start=start)
            conn = int(m.group(1))
            assert not px.log_lines(r"cannot connect", start), px.tail()
        # The guest's I/O works again: what it wrote before, and new files.
        back = ns.guest.command("sums d", timeout=240)
        assert command_rc(back) == 0 and parse_sums(back) == sums, f"after the restart: {parse_sums(back)} != {sums}"
        _write_and_check(ns, FILES + 1)
        if px:
            q = _conn_queues(px, conn)[0]
            assert q["device_type"] == "block" and q["proxy"]["started"], q
            assert_link_balanced(q)
            assert_log_decodes(px, conn)
            print("blk through the proxy: closes", px.log_lines(r"proxy: connection \d+ closed:"))
        errors = ns.guest.command("dmesg")
        body = errors[errors.index("VQS-DMESG-BEGIN") + 15:errors.index("VQS-DMESG-END")]
        assert not [ln for ln in body.splitlines() if ln.strip()], f"guest kernel errors: {body}"
    except PeerError as e:
        raise AssertionError(f"{e}\n{_blk_tail(ns)}") from None


# ---------------------------------------------------------------- 1, 2: testpmd <-> testpmd

@pytest.fixture(scope="module")
def net_path():
    """DPDK's vhost back-end (testpmd net_vhost, io forwarding) and, unless
    VQSCOPE_TEST_PROXY=off, the proxy in front of it: shared by the split
    and packed sessions (one front-end after the other)."""
    _require_dpdk()
    d = socket_dir()
    try:
        with DpdkVhostNet(f"{d}/be.sock") as be, \
             interpose(be.sock, f"{d}/fe.sock", device_type=None) as (front, px):
            yield SimpleNamespace(be=be, front=front, px=px)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run_traffic(fe: DpdkTestpmd, minimum: int, timeout: float) -> tuple[int, int]:
    t0 = time.monotonic()
    rx = tx = 0
    while time.monotonic() - t0 < timeout:
        rx, tx = fe.port_stats()[0]
        if rx >= minimum and tx >= minimum:
            return rx, tx
        time.sleep(0.5)
    pytest.fail(f"testpmd counted rx={rx} tx={tx} after {timeout:.0f} s, wanted {minimum} each way\n{fe.tail()}")


@pytest.mark.dpdk
@pytest.mark.timeout(300)
@pytest.mark.parametrize("devargs", [pytest.param({}, id="split"), pytest.param({"packed_vq": 1}, id="packed")])
def test_testpmd_through_proxy(net_path, devargs):
    layout = "packed" if devargs else "split"
    be, px = net_path.be, net_path.px
    start = len(px.peer.output) if px else 0
    be_start = len(be.pmd.output)
    with DpdkTestpmd([virtio_user_vdev(net_path.front, 1, **devargs)], main_lcore=1,
                     name="testpmd virtio_user front-end") as fe:
        conn = _conn_id(px, start) if px else None
        fe.start(tx_first=BURSTS)
        _run_traffic(fe, MIN_PACKETS // 4, RUN_TIMEOUT)
        if px:
            # Two snapshots while traffic runs: both rings moved in between.
            s1 = _conn_queues(px, conn)
            time.sleep(0.5)
            s2 = _conn_queues(px, conn)
            assert {vq_rx(0), vq_tx(0)} <= set(s1) and set(s1) == set(s2), (s1.keys(), s2.keys())
            for i in (vq_rx(0), vq_tx(0)):
                a, b = s1[i], s2[i]
                assert a["layout"] == b["layout"] == layout, a
                assert a["size"] > 0 and a.get("last_avail_idx") is None, a
                assert a["device"] == f"proxy{conn}", a
                pr = b["proxy"]
                assert pr["connection"] == conn and pr["enabled"] and pr["started"], pr
                assert pr["kicks"] is None and pr["calls"] is None, pr     # no --count-notifications
                assert _used_pos(a) != _used_pos(b), f"vring {i} did not advance: {a} -> {b}"
        _run_traffic(fe, MIN_PACKETS, RUN_TIMEOUT)
        fst = fe.stop()
        # The back-end drains what the front-end had made available, then stops.
        time.sleep(0.5)
        bst = be.pmd.stop()
        try:
            dequeued, enqueued = bst.port_rx[0], bst.port_tx[0]   # from vring 1 (TX), onto vring 0 (RX)
            print(f"[{layout}] front-end {fst}; back-end {bst}")
            assert fst.port_tx[0] >= MIN_PACKETS and fst.port_rx[0] >= MIN_PACKETS, fst
            assert dequeued <= fst.port_tx[0] and fst.port_rx[0] <= enqueued, (fst, bst)
            if px:
                qs = _conn_queues(px, conn)
                assert qs[vq_rx(0)]["device_type"] == "net", qs[vq_rx(0)]
                for i, n in ((vq_tx(0), dequeued), (vq_rx(0), enqueued)):
                    q = qs[i]
                    mod = _used_modulus(q)
                    # Frames the back-end counted that the proxy does not see used yet.
                    lag = (n - _used_pos(q)) % mod
                    if layout == "split":
                        assert lag == 0, (f"vring {i}: the proxy's used position {_used_pos(q)} (mod {mod}) "
                                          f"does not match the back-end's {n} frames: {q}")
                    else:
                        # DPDK's packed dequeue writes used descriptors from a shadow ring, a batch
                        # at a time: frames it took and counted may not be used yet. The proxy then
                        # shows them in flight (held by the back-end), no more and no fewer.
                        assert lag <= q["inflight"] and len(q["chains"]) == q["inflight"], (
                            f"vring {i}: the back-end counted {n} frames, the proxy sees {_used_pos(q)} "
                            f"used (mod {mod}) and {q['inflight']} in flight: {q}")
                        print(f"[packed] vring {i}: {lag} frame(s) counted by DPDK, not yet used; "
                              f"{q['inflight']} in flight")
                    assert_link_balanced(q)
                assert_log_decodes(px, conn)
        finally:
            be.pmd.start()
    if px:
        px.peer.wait_for(rf"proxy: connection {conn} closed: front-end hung up", 30, start=start)
        assert px.peer.alive()
    assert be.pmd.alive(), be.tail()
    del be_start


# ---------------------------------------------------------------- 3: the hostile corpus

HANDSHAKE_DONE_RX = r"virtio is now ready for processing"


def _check_fds(px, base: int, name: str) -> None:
    """The proxy holds ``base`` fds again, or one more: the spare back-end
    connection it makes when the back-end hangs up or comes back, kept for
    the next front-end (the back-end gate, inspector/vhost_user/proxy.py).
    A leak accumulates; the end of the corpus checks ``base`` exactly."""
    assert wait_for(lambda: px.fd_count() in (base, base + 1), 10), \
        f"{name}: the proxy holds {px.fd_count()} fds, {base} (+1) wanted\n{px.tail()}"


def protocol_malformed(case) -> str | None:
    """How ``case``'s message is malformed for the proxy: "cut" (the peer
    closes in the middle of it), "message" (the proxy tells from the message
    alone: tests/support/proxy.py PROXY_SEES), None (only a back-end's
    semantics can reject it: a proxy forwards it without a word)."""
    return "cut" if case.name in CUT_CASES else "message" if case.name in PROXY_SEES else None


def dpdk_saw(case, ctx: Ctx) -> str | None:
    """A regex of what DPDK's vhost library (lib/vhost/vhost_user.c, INFO
    level) logs when it reads ``case``'s message: proof that the bytes got
    there. None when it logs nothing before the connection closes (a header
    announcing a payload that never comes: it waits for it)."""
    h = case.build(ctx)
    if h.cut is None and h.size is not None and h.size > len(h.payload):
        return None
    try:
        name = p.Request(h.request).name
    except ValueError:
        name = None
    signed = h.request - (1 << 32) if h.request >= 1 << 31 else h.request
    alts = [rf"\(req: {signed}\) was not handled"]
    if name:
        alts += [rf"read message VHOST_USER_{name}\b", rf"vhost read message for VHOST_USER_{name} failed"]
    return "|".join(alts)


def _drain(sock: socket.socket, timeout: float) -> None:
    """Read (and close the fds of) whatever the back-end answers until it
    closes the connection or ``timeout`` s pass without a word."""
    sock.settimeout(timeout)
    try:
        while True:
            m = t.recv_message(sock)
            if m is None:
                return
            m.close_fds()
    except (OSError, p.ProtocolError):
        return


def _restart_dpdk(net_path) -> None:
    """A new DPDK vhost back-end on the same socket (the old one died)."""
    net_path.be.close()
    if os.path.exists(net_path.be.sock):
        os.unlink(net_path.be.sock)      # a crashed DPDK leaves its socket file
    net_path.be = DpdkVhostNet(net_path.be.sock)


@pytest.mark.dpdk
@pytest.mark.timeout(400)
def test_hostile_corpus_through_proxy(net_path):
    px = net_path.px
    if px:
        assert wait_for(lambda: len(px.log_lines(r"closed:")) >= len(px.log_lines(r"front-end connected")), 30)
        base = px.fd_count()
    report, deaths = [], []
    for case in CORPUS:
        if case.inflight:
            continue   # DPDK's net_vhost does not offer INFLIGHT_SHMFD (protocol features 0x1002b)
        be = net_path.be
        start = len(px.peer.output) if px else 0
        hs = len(be.pmd.output)
        fe = VhostUserFrontend(net_path.front, queue_pairs=1, queue_size=64, mem_size=1 << 20, timeout=10,
                               packed=case.layout != "split")
        fds: list[int] = []
        try:
            be.pmd.wait_for(HANDSHAKE_DONE_RX, 10, start=hs)
            time.sleep(0.05)
            ctx = Ctx(num_queues=2, uva=fe.uva, mem_size=fe.mem_size, queue_size=fe.queue_size)
            bad, want = protocol_malformed(case), dpdk_saw(case, ctx)
            be_start = len(be.pmd.output)
            fds = send_case(fe.sock, case, ctx)
            saw = want is None or wait_for(lambda: re.search(want, be.pmd.output[be_start:]) is not None, 10, 0.05)
            _drain(fe.sock, 0.3)
        finally:
            for fd in fds:
                os.close(fd)
            fe.close()
        # DPDK logs the hang-up of each connection (or dies of the case).
        wait_for(lambda: not be.pmd.alive() or "vhost peer closed" in be.pmd.output[be_start:], 3, 0.02)
        died = not be.pmd.alive()
        report.append((case.name, bad))
        assert saw, f"{case.name}: DPDK did not log /{want}/ after the case was sent\n{be.tail()}"
        if px:
            assert px.peer.alive(), f"{case.name}: the proxy died\n{px.tail()}"
            if died:   # the back-end's death is passed on to the front-end, as it is
                px.peer.wait_for(r"proxy: connection \d+ closed: back-end hung up", 10, start=start)
                # and front-ends are refused until it is back (fds counted after the restart)
                px.peer.wait_for(r"proxy: back-end .* is down", 10, start=start)
            else:
                _check_fds(px, base, case.name)
            # One line per malformed message: "(forwarded as-is)", or for a
            # message cut short the close "in the middle of a message". (DPDK's
            # answers to some of them are malformed too, and logged as the
            # back-end's: a reply to request 0.)
            want_lines = int(bad == "message")
            wait_for(lambda: len(px.malformed_lines(start, "front-end")) >= want_lines, 5)
            lines = px.malformed_lines(start, "front-end")
            assert len(lines) == want_lines, \
                f"{case.name}: malformed at the protocol level: {bad}; the proxy logged {lines}\n{px.tail()}"
            if bad == "cut":
                px.peer.wait_for(r"proxy: connection \d+ closed: front-end hung up in the middle of a message",
                                 10, start=start)

        if died:
            deaths.append(f"{case.name} (status {be.pmd.proc.returncode})")
            _restart_dpdk(net_path)
            if px:
                px.peer.wait_for(r"proxy: back-end .* is back: listening on .* again", 30, start=start)
                _check_fds(px, base, case.name)
    if px:
        # A clean session last: it takes the spare (if any) and the front-end
        # hangs up first, so nothing the corpus left may remain.
        fe = VhostUserFrontend(net_path.front, queue_pairs=1, queue_size=64, mem_size=1 << 20, timeout=10)
        fe.close()
        assert wait_for(lambda: px.fd_count() == base and not px.snapshot()["queues"], 10), \
            f"after the corpus the proxy holds {px.fd_count()} fds, {base} before\n{px.tail()}"
    print(f"hostile corpus through {'the proxy' if px else 'nothing (direct)'}: {len(report)} cases, "
          f"{sum(bool(b) for _, b in report)} malformed at the protocol level "
          f"({[n for n, b in report if b]}); DPDK's vhost died on {deaths or 'none'}")
