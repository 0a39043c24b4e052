"""Malformed vhost-user messages in the middle of a valid session.

Every case of tests/support/hostile_corpus.py (at least one per class of hostile
1) goes on a fresh connection whose built-in front-end has just completed a
full handshake (memory table mapped, vrings started), while another
connection carries traffic. For each: REPLY_ACK answers non-zero where a
reply is possible, the back-end writes exactly one log line naming request,
field and value, closes the connection, and its fd count returns to the
baseline; the other connection's traffic keeps moving.

In-process first (a VhostUserServer with loopback virtio-net devices and the
built-in front-end as the traffic source), then once against ``vqscope serve``
as a subprocess with dpdk-testpmd (virtio_user) moving packets on another
connection: testpmd's packet rate during the corpus must stay within a
generous factor of its rate before (a ratio in one run, no absolute rate).
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import struct
import threading
import time

import pytest

from inspector.devices.net import NetDevice
from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.server import VhostUserServer

from tests.conftest import require, wait_for
from tests.support.hostile_corpus import CLASSES, CORPUS, MARK, Ctx, expected_text, send_case
from tests.support.peers import (DpdkTestpmd, VqscopeNet, find_testpmd, is_root, socket_dir, virtio_user_vdev)

PAIRS = 2           # the back-end's queue pairs; fresh front-ends set up 1, so vring 3 stays unconfigured
PACE_S = 0.25      # between corpus cases against vqscope serve
WINDOWS = 8        # quiet/corpus window pairs
FRAME = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x00" + bytes(46)


class HostileNet(NetDevice):
    """Loopback virtio-net that also takes an inflight area (so the
    INFLIGHT_SHMFD classes can be negotiated): the area is kept, unused."""

    supports_inflight = True

    def set_inflight(self, area, num_queues: int, queue_size: int) -> None:
        parent = getattr(super(), "set_inflight", None)
        if parent is not None:
            parent(area, num_queues, queue_size)


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def marked_fds() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            n += MARK in os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return n


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_corpus_covers_every_class():
    """One case at least per class of hostile message."""
    assert len(CLASSES) >= 30 and len({c.name for c in CORPUS}) == len(CORPUS)
    for words in ("header size", "too many fds", "carries none", "missing fds", "0 regions",
                  "overlapping", "zero-size", "overflowing", "beyond the fd", "queue count",
                  "above 0xffff", "SET_VRING_NUM 0", "power of two", "> 32768", "outside the mapped",
                  "misaligned", "SET_VRING_BASE >= 65536", "SET_LOG_BASE with a bad size",
                  "SET_LOG_BASE with a bad offset", "SET_CONFIG size", "unknown request", "request 0",
                  "beyond the spec", "reply bit", "wrong version", "closes mid-message",
                  "SET_FEATURES with bits", "SET_PROTOCOL_FEATURES with bits", "without INFLIGHT",
                  "num_queues 0", "num_queues above", "mmap_size <", "never configured"):
        assert any(words in k for k in CLASSES), words


class Traffic(threading.Thread):
    """Frames through the session front-end's pair 0, echoed by the loopback
    device, counted in ``echoed``; any error ends it (``error``)."""

    def __init__(self, fe: VhostUserFrontend):
        super().__init__(name="traffic", daemon=True)
        self.fe = fe
        self.echoed = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.fe.post_rx_buffers(0, 8)
                self.fe.send_frames(0, [FRAME] * 8)
                deadline = time.monotonic() + 10
                got = 0
                while got < 8 and time.monotonic() < deadline and not self._halt.is_set():
                    self.fe.poll_tx_done(0)
                    n = len(self.fe.recv_frames(0))
                    got += n
                    self.echoed += n
                    if not n:
                        self.fe.wait_call(0, 0.01)
                if got < 8 and not self._halt.is_set():
                    raise AssertionError(f"only {got} of 8 frames echoed within 10 s")
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> None:
        self._halt.set()
        self.join(15)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """An in-process server and a front-end moving frames through it."""
    d = tmp_path_factory.mktemp("hostile")
    srv = VhostUserServer(str(d / "vu.sock"), lambda: HostileNet(queue_pairs=PAIRS, busy_poll_us=0),
                          introspect_path=str(d / "vu.sock.introspect"))
    srv.start()
    fe = VhostUserFrontend(srv.socket_path, queue_pairs=1, queue_size=64, mem_size=1 << 20)
    traffic = Traffic(fe)
    traffic.start()
    try:
        assert wait_for(lambda: traffic.echoed > 0, timeout=10), traffic.error
        yield srv, traffic
    finally:
        traffic.stop()
        fe.close()
        srv.stop()


def run_case(socket_path: str, case, *, reply_timeout: float = 10.0) -> Ctx:
    """Handshake a fresh front-end (with the ring layout the case needs),
    send ``case``, check the REPLY_ACK and the close; returns the case's
    Ctx. Every fd it made is closed on return."""
    fe = VhostUserFrontend(socket_path, queue_pairs=1, queue_size=64, mem_size=1 << 20, timeout=reply_timeout,
                           packed=case.layout != "split")
    fds: list[int] = []
    try:
        if case.layout is not None:
            assert fe.packed is (case.layout == "packed"), f"{case.name}: needs {case.layout} rings"
        ctx = Ctx(num_queues=2 * PAIRS, uva=fe.uva, mem_size=fe.mem_size, queue_size=fe.queue_size)
        if case.inflight:
            fe._request(p.Request.SET_PROTOCOL_FEATURES,
                        p.pack_u64(fe.protocol_features | p.ProtocolFeature.INFLIGHT_SHMFD))
        fds = send_case(fe.sock, case, ctx)
        if case.ack:
            r = t.recv_message(fe.sock)
            assert r is not None, f"{case.name}: closed without the REPLY_ACK"
            assert r.flags & p.FLAG_REPLY and r.request == case.build(ctx).request, r
            assert len(r.payload) == 8 and struct.unpack("<Q", r.payload)[0] != 0, r
            r.close_fds()
        assert closed_by_peer(fe.sock), f"{case.name}: the back-end must close the connection"
        return ctx
    finally:
        for fd in fds:
            os.close(fd)
        fe.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_message_mid_session(session, caplog, case):
    srv, traffic = session
    caplog.set_level(logging.INFO, logger="inspector.vhost_user")
    assert wait_for(lambda: len(srv.connections) == 1)
    base = fd_count()
    echoed = traffic.echoed
    caplog.clear()
    ctx = run_case(srv.socket_path, case)
    # The connection is gone, and with it every fd the back-end had for it.
    assert wait_for(lambda: len(srv.connections) == 1 and fd_count() == base), (fd_count(), base)
    assert marked_fds() == 0
    req, text = expected_text(case, ctx)
    lines = [r.getMessage() for r in caplog.records
             if r.name == "inspector.vhost_user" and r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert req in lines[0] and text in lines[0] and "protocol violation" in lines[0], (lines[0], req, text)
    # The session on the other connection still moves frames.
    assert wait_for(lambda: traffic.echoed > echoed, timeout=10), traffic.error
    assert traffic.error is None, traffic.error


@pytest.mark.timeout(60)
def test_stalled_front_end_holds_only_itself(tmp_path, caplog):
    """A front-end that stops mid-message does not delay another's handshake
    (reads never block), and is closed once its stall timeout passes."""
    caplog.set_level(logging.INFO, logger="inspector.vhost_user")
    with VhostUserServer(str(tmp_path / "s"), lambda: HostileNet(), stall_timeout=2.0) as srv:
        staller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staller.connect(srv.socket_path)
        try:
            staller.sendall(t.encode_message(p.Request.SET_VRING_NUM, p.VringState(0, 64).pack())[:15])
            assert wait_for(lambda: srv.connections and srv.connections[0].messages == 0
                            and srv.connections[0]._reader.partial)
            stalled_conn = srv.connections[0]
            with VhostUserFrontend(srv.socket_path, queue_size=64, mem_size=1 << 20) as fe:
                fe.get_features()
                # Served while the staller is still connected and not yet timed out.
                assert not stalled_conn.closed
            staller.settimeout(10)
            assert closed_by_peer(staller)
        finally:
            staller.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "SET_VRING_NUM: size=8" in lines[0] and "stalled" in lines[0], lines


# --- against vqscope serve, with dpdk-testpmd on another connection ---------------------------

def _rate(pmd: DpdkTestpmd, seconds: float) -> tuple[float, int]:
    """Packets received per second by testpmd over ``seconds``, and the final count."""
    rx0 = pmd.port_stats()[0][0]
    t0 = time.monotonic()
    time.sleep(seconds)
    rx1 = pmd.port_stats()[0][0]
    return (rx1 - rx0) / (time.monotonic() - t0), rx1


def _log_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "protocol violation" in ln]


@pytest.mark.dpdk
@pytest.mark.timeout(600)
def test_corpus_against_serve_while_testpmd_moves_packets():
    require(is_root(), "DPDK's virtio_user needs root")
    require(find_testpmd() is not None, "dpdk-testpmd is not installed (Debian 'dpdk'; make deps)")
    d = socket_dir()
    sock = os.path.join(d, "vu.sock")
    with VqscopeNet(sock, queues=PAIRS) as be:
        pid = be.peer.proc.pid
        pmd = DpdkTestpmd([virtio_user_vdev(sock, queues=1)], main_lcore=0)
        try:
            pmd.start(tx_first=4)
            time.sleep(2.0)   # warm-up
            base = fd_count(pid)
            offered = _offered_protocol_features(sock)
            cases = [c for c in CORPUS if not c.inflight or offered & p.ProtocolFeature.INFLIGHT_SHMFD]
            assert len(cases) >= len(CORPUS) - sum(c.inflight for c in CORPUS)
            # Alternating windows, quiet then corpus, so that the load of the
            # rest of a shared machine weighs on both sides alike.
            quiet, during = [], []
            for k in range(WINDOWS):
                rate, rx = _rate(pmd, 1.0)
                quiet.append(rate)
                t0 = time.monotonic()
                for case in cases[k::WINDOWS]:
                    start = len(be.peer.output)
                    ctx = run_case(sock, case)
                    req, text = expected_text(case, ctx)
                    assert wait_for(lambda start=start: len(_log_lines(be.peer.output[start:])) >= 1), \
                        f"{case.name}: no log line\n{be.tail()}"
                    lines = _log_lines(be.peer.output[start:])
                    assert len(lines) == 1 and req in lines[0] and text in lines[0], (case.name, lines)
                    assert wait_for(lambda: fd_count(pid) == base, timeout=10), \
                        f"{case.name}: back-end fds {fd_count(pid)} != {base}"
                    # Paced: on 2 shared cores each handshake's CPU (this
                    # process, the back-end's loop and the GIL its data path
                    # needs between bursts) would otherwise be what slows
                    # testpmd, not the hostile messages.
                    time.sleep(PACE_S)
                rx_end = pmd.port_stats()[0][0]
                assert rx_end > rx, f"testpmd stopped receiving during corpus window {k}\n{pmd.tail()}"
                during.append((rx_end - rx) / (time.monotonic() - t0))
            after, _ = _rate(pmd, 1.0)
            print(f"testpmd rx/s quiet {[round(r) for r in quiet]}, corpus {[round(r) for r in during]}, "
                  f"after {after:.0f}; {len(cases)} cases")
            # testpmd kept moving packets through all of it, at a rate within a
            # generous factor of the quiet windows' (medians: a ratio, not a rate).
            assert after > 0 and statistics.median(during) > statistics.median(quiet) / 10, (quiet, during)
            assert be.peer.alive(), be.tail()
        finally:
            pmd.close()


def _offered_protocol_features(sock: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sock)
        t.send_message(s, p.Request.GET_FEATURES)
        t.recv_message(s)
        t.send_message(s, p.Request.GET_PROTOCOL_FEATURES)
        return struct.unpack("<Q", t.recv_message(s).payload)[0]
    finally:
        s.close()
