"""``vqscope proxy`` (inspector/vhost_user/proxy.py): the built-in
front-ends through the proxy to ``vqscope serve`` (a subprocess, as a
third-party back-end would be), the back-end request channel, byte-exact
forwarding of malformed messages with their fds, hang-ups on either side,
and the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from inspector.spec.virtio import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from inspector.vhost_user import transport as t
from inspector.vhost_user.blk_frontend import BlkFrontend
from inspector.vhost_user.frontend import VhostUserFrontend
from inspector.vhost_user.protocol import BackendRequest, ProtocolFeature, ProtocolViolation, Request
from inspector.vhost_user.proxy import VhostUserProxy
from inspector.vhost_user.server import VhostUserServer
from tests.conftest import ROOT, VQSCOPE, wait_for
from tests.support.nulldevice import NullDevice
from tests.support.peers import VqscopeServe, socket_dir, wait_path
from tests.unit.test_vhost_user_frontend import frames_back


@pytest.fixture
def sdir():
    d = socket_dir()
    yield d
    for name in os.listdir(d):
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass
    os.rmdir(d)


@pytest.fixture
def proxy_to(sdir):
    """proxy_to(back_path) -> a started in-process VhostUserProxy on sdir/front.sock."""
    proxies = []

    def make(back: str, **kw) -> VhostUserProxy:
        p = VhostUserProxy(os.path.join(sdir, "front.sock"), back, os.path.join(sdir, "front.sock.introspect"),
                           **kw).start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()


def _fd_count(proxy: VhostUserProxy | None = None) -> int:
    """This process's open fds, less ``proxy``'s spare back-end connection
    (made when a back-end hangs up and is still there: the back-end gate)."""
    spare = proxy is not None and proxy._spare is not None
    return len(os.listdir("/proc/self/fd")) - spare


def _balanced(proxy: VhostUserProxy, stats: dict) -> None:
    assert stats["proxy_originated"] == 0
    for key in ("front_end", "back_end", "backend_req", "backend_req_reply"):
        s = stats[key]
        assert (s["messages"], s["bytes"], s["fds"]) == (s["messages_out"], s["bytes_out"], s["fds_out"]), key


def _frames_back(fe, pair, n):
    return frames_back(fe, pair, n, timeout=10.0)


@pytest.mark.timeout(90)
def test_net_traffic_and_reply_ack_through_the_proxy_to_serve(sdir, proxy_to):
    back = os.path.join(sdir, "back.sock")
    with VqscopeServe(back, "net", ["--loopback"]):
        proxy = proxy_to(back)
        with VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=4 << 20, packed=False) as fe:
            assert fe.protocol_features & ProtocolFeature.REPLY_ACK      # every request acked through it
            assert fe.backend_channel is not None
            fe.post_rx_buffers(0, 32)
            sent = [bytes([i]) * (60 + i) for i in range(20)]
            assert fe.send_frames(0, sent) == 20
            assert _frames_back(fe, 0, 20) == sent
            conn = proxy.connections[0]
            assert conn.channel is not None                               # the channel was interposed
            assert wait_for(lambda: not any(s.outbox for s in conn.sides))
            _balanced(proxy, conn.link_stats())
        assert wait_for(lambda: not proxy.connections)
        msgs, _ = proxy.message_log()
        dirs = {m["direction"] for m in msgs}
        assert {"front-end", "back-end"} <= dirs
        names = [m["request"] for m in msgs if m["direction"] == "front-end"]
        assert "GET_VRING_BASE" not in names and "SET_MEM_TABLE" in names
        assert all(m["malformed"] is None for m in msgs)


@pytest.mark.timeout(90)
def test_blk_inflight_config_and_io_through_the_proxy_to_serve(sdir, proxy_to):
    back = os.path.join(sdir, "back.sock")
    with VqscopeServe(back, "blk", ["--memory", "--size", "16M"]):
        proxy = proxy_to(back)
        with BlkFrontend(proxy.listen_path, inflight=True, queue_size=64, mem_size=8 << 20) as fe:
            assert fe.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
            assert fe.inflight_map is not None                       # GET_INFLIGHT_FD's fd came back
            assert fe.config()["capacity"] == (16 << 20) // 512      # GET_CONFIG answered through it
            data = os.urandom(8192)
            assert fe.request(0, VIRTIO_BLK_T_OUT, 8, data).status == VIRTIO_BLK_S_OK
            c = fe.request(0, VIRTIO_BLK_T_IN, 8, in_len=8192)
            assert c.status == VIRTIO_BLK_S_OK and c.data == data
            stats = proxy.connections[0].link_stats()
            assert stats["back_end"]["fds"] >= 1                     # the inflight area's fd
        msgs, _ = proxy.message_log()
        assert any(m["request"] == "GET_CONFIG" and m["direction"] == "back-end" for m in msgs)


def _null_server(sdir):
    devices = []

    def factory():
        devices.append(NullDevice())
        return devices[-1]

    srv = VhostUserServer(os.path.join(sdir, "null.sock"), factory)
    srv.devices = devices
    return srv


def test_backend_request_channel_is_relayed_both_ways(sdir, proxy_to):
    with _null_server(sdir) as srv:
        proxy = proxy_to(srv.socket_path)
        with VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=1 << 20) as fe:
            conn = srv.connections[0]
            assert wait_for(lambda: conn.backend_req_fd is not None)
            assert conn.send_config_change()
            fe.backend_channel.settimeout(5)
            msg = t.recv_message(fe.backend_channel)
            assert msg.request == BackendRequest.CONFIG_CHANGE_MSG and msg.size == 12
            # A reply from the front-end, with an fd, reaches the back-end's end.
            r, w = os.pipe()
            try:
                t.send_message(fe.backend_channel, BackendRequest.CONFIG_CHANGE_MSG, struct.pack("<Q", 0),
                               fds=[r], flags=1 | 0x4)
            finally:
                os.close(r)
            back_end = socket.socket(fileno=os.dup(conn.backend_req_fd))
            try:
                back_end.settimeout(5)
                reply = t.recv_message(back_end)
            finally:
                back_end.close()
            assert reply.flags == 5 and reply.payload == struct.pack("<Q", 0) and len(reply.fds) == 1
            os.write(w, b"!")
            assert os.read(reply.fds[0], 1) == b"!"                  # the same pipe, end to end
            reply.close_fds()
            os.close(w)
            pconn = proxy.connections[0]
            assert wait_for(lambda: pconn.link_stats()["backend_req_reply"]["messages_out"] == 1)
            _balanced(proxy, pconn.link_stats())
        msgs, _ = proxy.message_log()
        assert [m["request"] for m in msgs if m["direction"] == "backend-req"] == ["CONFIG_CHANGE_MSG"]
        assert [m["nfds"] for m in msgs if m["direction"] == "backend-req-reply"] == [1]


class _RawBackEnd:
    """A listening socket standing in for a back-end: accept() one
    connection and read exactly what arrives."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(5)

    def accept(self) -> socket.socket:
        c, _ = self.sock.accept()
        c.settimeout(5)
        return c

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


def _recv_exact(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    data, fds = bytearray(), []
    while len(data) < n:
        chunk, anc, _, _ = sock.recvmsg(n - len(data), socket.CMSG_SPACE(64 * 4))
        t._collect_fds(anc, fds)
        assert chunk, "peer closed"
        data += chunk
    return bytes(data), fds


def test_malformed_messages_are_forwarded_byte_for_byte_with_their_fds(sdir, proxy_to, caplog):
    raw = _RawBackEnd(os.path.join(sdir, "raw.sock"))
    proxy = proxy_to(raw.path)
    before = _fd_count(proxy)
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    front.settimeout(5)
    try:
        with caplog.at_level(logging.INFO, logger="inspector.proxy"):
            front.connect(proxy.listen_path)
            back = raw.accept()
            # An oversized payload (streamed through), then a bad version with
            # a memfd, then a reply from the back-end in pieces.
            big = os.urandom(300_000)
            t.send_message(front, Request.SET_FEATURES, big)
            memfd = os.memfd_create("t")
            t.send_message(front, Request.SET_MEM_TABLE, b"\x01" * 40, fds=[memfd], flags=0)
            got, fds = _recv_exact(back, 12 + len(big))
            assert got == t.encode_message(Request.SET_FEATURES, big) and fds == []
            got, fds = _recv_exact(back, 12 + 40)
            assert got == t.encode_message(Request.SET_MEM_TABLE, b"\x01" * 40, flags=0)
            assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(memfd).st_ino
            for fd in fds + [memfd]:
                os.close(fd)
            reply = t.encode_message(Request.GET_FEATURES, struct.pack("<Q", 7), flags=5)
            for i in range(len(reply)):
                back.send(reply[i:i + 1])
                time.sleep(0.001)
            got, _ = _recv_exact(front, len(reply))
            assert got == reply
            assert "SET_FEATURES: size 300000" in caplog.text and "(forwarded as-is)" in caplog.text
            # The back-end hangs up: the front-end's connection is closed.
            back.close()
            assert front.recv(1) == b""
            assert wait_for(lambda: not proxy.connections)
            assert "connection 1 closed: back-end hung up" in caplog.text
    finally:
        front.close()
        raw.close()
    # The raw back-end's listener is gone, and with it the back-end: the
    # proxy has paused its own listener too (the back-end gate).
    assert wait_for(lambda: proxy.backend_down and _fd_count(proxy) == before - 2)
    msgs, _ = proxy.message_log()
    assert msgs[0]["malformed"] and msgs[0]["size"] == 300_000


def test_front_end_hang_up_closes_the_back_end(sdir, proxy_to, caplog):
    raw = _RawBackEnd(os.path.join(sdir, "raw.sock"))
    proxy = proxy_to(raw.path)
    try:
        with caplog.at_level(logging.INFO, logger="inspector.proxy"):
            for n in (1, 2):                                          # and again: a reconnect
                front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                front.connect(proxy.listen_path)
                back = raw.accept()
                front.close()
                assert back.recv(1) == b""
                back.close()
                assert wait_for(lambda: f"connection {n} closed: front-end hung up" in caplog.text)
    finally:
        raw.close()


def test_unreachable_back_end_is_mirrored_by_refusing_front_ends_until_it_is_back(sdir, proxy_to, caplog):
    """The back-end gate: a front-end accepted while the back-end is down is
    closed, and the proxy stops listening (the socket file stays), so the
    next front-ends are refused as the back-end itself would refuse them
    (QEMU's reconnect=1 retries); when a back-end listens again the proxy
    connects to it, listens again, and the next front-end is relayed over
    that connection."""
    back = os.path.join(sdir, "back.sock")
    proxy = proxy_to(back)
    with caplog.at_level(logging.INFO, logger="inspector.proxy"):
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        front.settimeout(5)
        front.connect(proxy.listen_path)
        assert front.recv(1) == b""
        front.close()
        assert wait_for(lambda: proxy.refused == 1 and proxy.backend_down)
        assert "cannot connect" in caplog.text and "is down" in caplog.text and not proxy.connections
        assert os.path.exists(proxy.listen_path)
        for _ in range(2):
            front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with pytest.raises(ConnectionRefusedError):
                front.connect(proxy.listen_path)
            front.close()
        assert proxy.refused == 1                       # refused by the kernel, not accepted and closed
        with VqscopeServe(back, "net", ["--loopback"]):
            assert wait_for(lambda: not proxy.backend_down and proxy.listening, 15), caplog.text
            assert "is back: listening on" in caplog.text
            with VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=2 << 20) as fe:
                fe.post_rx_buffers(0, 8)
                assert fe.send_frames(0, [b"y" * 70]) == 1
                assert _frames_back(fe, 0, 1) == [b"y" * 70]
            assert proxy.accepted == 1
        # The back-end goes away while no front-end is connected: the proxy
        # learns it from the next front-end (accepted and closed, once), and
        # refuses the ones after it.
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        front.settimeout(5)
        front.connect(proxy.listen_path)
        assert front.recv(1) == b""
        front.close()
        assert wait_for(lambda: proxy.refused == 2 and proxy.backend_down and not proxy.listening, 15)


@pytest.mark.timeout(90)
def test_cli_proxy_forwards_and_exits_cleanly_on_sigterm(sdir):
    back = os.path.join(sdir, "back.sock")
    front = os.path.join(sdir, "front.sock")
    with VqscopeServe(back, "net", ["--loopback"]):
        proc = subprocess.Popen([*VQSCOPE, "proxy", "--listen", front, "--connect", back], cwd=str(ROOT),
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_path(front, 30, lambda: proc.poll() is None)
            assert os.stat(front).st_mode & 0o777 == 0o600
            assert os.path.exists(front + ".introspect")
            with VhostUserFrontend(front, queue_size=64, mem_size=2 << 20) as fe:
                fe.post_rx_buffers(0, 8)
                assert fe.send_frames(0, [b"x" * 80]) == 1
                assert _frames_back(fe, 0, 1) == [b"x" * 80]
                r = subprocess.run([*VQSCOPE, "snapshot", "--connect", front, "--json"], cwd=str(ROOT),
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 0, r.stderr
                snap = json.loads(r.stdout)
                assert snap["source"] == f"vqscope proxy {front}" and snap["pid"] == proc.pid
                assert [q["device"] for q in snap["queues"]] == ["proxy1", "proxy1"]
                r = subprocess.run([*VQSCOPE, "doctor", "--connect", front, "--duration", "1", "--json"],
                                   cwd=str(ROOT), capture_output=True, text=True, timeout=60)
                assert r.returncode in (0, 1), r.stderr
                assert json.loads(r.stdout)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert f"proxy: listening on {front}, back-end {back}" in err
    assert "proxy: connection 1: front-end connected, back-end connected" in err
    assert "proxy: connection 1 closed: front-end hung up" in err
    assert not os.path.exists(front) and not os.path.exists(front + ".introspect")


# --- Milestone 2: what passes, known and shown -------------------------------------------------

#: Ring fields both snapshots must agree on at a quiescent point (the proxy
#: cannot know the device's own positions: last_avail_idx stays None).
SPLIT_FIELDS = ("size", "avail_idx", "used_idx", "inflight", "avail_flags", "used_flags", "used_event",
                "avail_event", "layout", "features")
PACKED_FIELDS = ("size", "layout", "inflight", "next_avail", "avail_wrap_counter", "next_used",
                 "used_wrap_counter", "driver_event_flags", "device_event_flags", "features")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True])
def test_snapshot_through_the_proxy_matches_serves_own(sdir, proxy_to, packed):
    from inspector.sources.backend import BackendSource

    back = os.path.join(sdir, "back.sock")
    with VqscopeServe(back, "net", ["--loopback"]):
        proxy = proxy_to(back)
        with VhostUserFrontend(proxy.listen_path, queue_size=64 if not packed else 48, mem_size=4 << 20,
                               packed=packed, event_idx=True) as fe:
            assert fe.packed == packed
            fe.post_rx_buffers(0, 40)
            for k in range(3):                                   # past a wrap of the 48-entry packed rings
                sent = [bytes([k, i]) * 40 for i in range(30)]
                assert fe.send_frames(0, sent) == 30
                assert _frames_back(fe, 0, 30) == sent
                assert wait_for(lambda: fe.poll_tx_done(0) >= 0 and not fe.tx(0).slots)
                fe.post_rx_buffers(0, 30)
            time.sleep(0.2)                                      # quiescent: nothing in motion
            with BackendSource(proxy.listen_path) as via_proxy, BackendSource(back) as direct:
                mine, theirs = via_proxy.snapshot(), direct.snapshot()
        assert mine.source == f"vqscope proxy {proxy.listen_path}" and mine.pid == os.getpid()
        assert [q.index for q in mine.queues] == [q.index for q in theirs.queues] == [0, 1]
        for q, ref in zip(mine.queues, theirs.queues):
            assert q.device == "proxy1" and q.device_type == "net"
            assert q.last_avail_idx is None or packed
            for f in PACKED_FIELDS if packed else SPLIT_FIELDS:
                assert getattr(q, f) == getattr(ref, f), (q.index, f)
            assert not q.anomalies, q.anomalies
            px = q.extras["proxy"]
            assert (px["connection"], px["enabled"], px["started"], px["kicks"], px["calls"]) == (1, True, True,
                                                                                                 None, None)
            assert px["link"]["proxy_originated"] == 0
        assert mine.queues[1].used_idx in (None, 90)


def test_message_log_directions_and_decoded_fields(sdir, proxy_to):
    with _null_server(sdir) as srv:
        proxy = proxy_to(srv.socket_path)
        with VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=1 << 20, packed=False):
            pass
        assert wait_for(lambda: not proxy.connections)
    msgs, nxt = proxy.message_log()
    assert [m["seq"] for m in msgs] == list(range(nxt))
    by = {(m["direction"], m["request"]): m for m in msgs}
    assert by[("front-end", "SET_VRING_NUM")]["fields"] == {"index": 1, "num": 64}
    assert by[("back-end", "GET_FEATURES")]["fields"]["u64"] & 1 << 32   # VHOST_USER_F_PROTOCOL_FEATURES
    assert by[("front-end", "SET_MEM_TABLE")]["nfds"] == 1
    assert all(m["connection"] == 1 and m["malformed"] is None for m in msgs)
    assert proxy.message_log(nxt - 1)[0] == msgs[-1:]


def _maps_of(marks) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if any(m in line for m in marks)]


@pytest.mark.timeout(180)
def test_hostile_corpus_through_the_proxy_to_serve(sdir, proxy_to, caplog):
    """Every hostile case (tests/support/hostile_corpus.py) from a fresh
    front-end through the proxy to `serve net`: forwarded, the malformed
    ones the proxy can tell logged with request and field, the connection
    closed by the back-end and passed on, and nothing of it left in the
    proxy: fds and mappings back to the baseline."""
    from tests.support.hostile_corpus import CORPUS, MARK, Ctx, send_case
    from tests.support.proxy import CUT_CASES, PROXY_SEES

    proxy_sees, cut = PROXY_SEES, CUT_CASES
    back = os.path.join(sdir, "back.sock")
    with VqscopeServe(back, "net", ["--loopback", "--queues", "2"]):
        proxy = proxy_to(back)
        before = _fd_count(proxy)
        seen = 0
        with caplog.at_level(logging.INFO, logger="inspector.proxy"):
            for case in CORPUS:
                if case.inflight:
                    continue
                caplog.clear()
                n = proxy.accepted + 1
                with VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=1 << 20,
                                       packed=case.layout == "packed") as fe:
                    fds = send_case(fe.sock, case, Ctx(4, fe.uva, fe.mem_size))
                    try:
                        assert wait_for(lambda: f"connection {n} closed" in caplog.text, timeout=10), case.name
                    finally:
                        for fd in fds:
                            os.close(fd)
                req = case.expect(Ctx(4, fe.uva, fe.mem_size))[0]
                if case.name in cut:
                    assert f"connection {n} closed: front-end hung up in the middle of a message" in caplog.text
                if case.name in proxy_sees:
                    seen += 1
                    assert f"connection {n}: front-end {req}:" in caplog.text and "(forwarded as-is)" in caplog.text, \
                        (case.name, caplog.text)
                assert f"connection {n}: back-end" not in caplog.text.replace(
                    f"connection {n}: back-end request channel closed", ""), (case.name, caplog.text)
                assert wait_for(lambda: _fd_count(proxy) == before), (case.name, _fd_count(proxy), before)
                assert not _maps_of([MARK, "vqscope-guest"]), case.name
        assert seen == len(proxy_sees)
        assert proxy._thread.is_alive() and not proxy.connections


# --- Milestone 3: --count-notifications --------------------------------------------------------

def _read_u64(fd: int, timeout: float = 5.0) -> int:
    import select
    assert select.select([fd], [], [], timeout)[0], "nothing to read"
    return int.from_bytes(os.read(fd, 8), "little")


@pytest.mark.parametrize("count", [False, True])
def test_kick_and_call_fds_pass_unchanged_or_relayed_and_counted(sdir, proxy_to, count):
    with _null_server(sdir) as srv:
        proxy = proxy_to(srv.socket_path, count_notifications=count)
        with VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=1 << 20, packed=False) as fe:
            conn = srv.connections[0]
            assert wait_for(lambda: len(conn.vrings) == 2 and conn.vrings[1].call_fd is not None)
            kick_be, call_be = conn.vrings[0].kick_fd, conn.vrings[0].call_fd
            kick_fe, call_fe = fe.queues[0].kick_fd, fe.queues[0].call_fd
            for n in (1, 3):
                os.write(kick_fe, n.to_bytes(8, "little"))          # the driver kicks
                assert _read_u64(kick_be) == n                       # the back-end sees the same count
                os.write(call_be, n.to_bytes(8, "little"))           # the back-end calls
                assert _read_u64(call_fe) == n
            pconn = proxy.connections[0]
            if count:
                assert wait_for(lambda: pconn.notification_counts(0) == (2, 2))
                assert pconn.notification_counts(1) == (0, 0)
                proxy.drain_events()
                reply = proxy.read_events(0, 100, False)
                got = [(e[1], e[2], e[3], e[4]) for e in reply["events"]]
                assert sorted(got) == sorted([("proxy1", 0, "kick", 1), ("proxy1", 0, "kick", 3),
                                              ("proxy1", 0, "call", 0), ("proxy1", 0, "call", 0)])
            else:
                assert pconn.notification_counts(0) == (None, None) and not pconn.notifiers
                assert proxy.read_events(0, 100, False)["events"] == []


@pytest.mark.timeout(90)
def test_count_notifications_with_traffic_through_serve(sdir, proxy_to):
    from inspector.sources.backend import BackendSource

    back = os.path.join(sdir, "back.sock")
    with VqscopeServe(back, "net", ["--loopback"]):
        proxy = proxy_to(back, count_notifications=True)
        before = _fd_count(proxy)
        with VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=4 << 20, packed=False) as fe:
            fe.post_rx_buffers(0, 40)
            for k in range(3):
                sent = [bytes([k, i]) * 30 for i in range(10)]
                assert fe.send_frames(0, sent) == 10
                assert _frames_back(fe, 0, 10) == sent
            with BackendSource(proxy.listen_path) as src:
                snap = src.snapshot()
                kinds = {(e.device, e.queue, e.kind) for e in src.events()}      # the events op, binary
                msgs = src.new_messages()
            assert {("proxy1", 1, "kick"), ("proxy1", 0, "call")} <= kinds
            assert {m["direction"] for m in msgs} >= {"front-end", "back-end"}
            tx = next(q for q in snap.queues if q.index == 1)
            rx = next(q for q in snap.queues if q.index == 0)
            assert tx.extras["proxy"]["kicks"] >= 1 and tx.kicks == tx.extras["proxy"]["kicks"]
            assert rx.extras["proxy"]["calls"] >= 1 and rx.calls == rx.extras["proxy"]["calls"]
        assert wait_for(lambda: not proxy.connections)
        assert wait_for(lambda: _fd_count(proxy) == before)         # relays' eventfds closed


def test_memory_table_add_and_remove_regions_read_only_and_released():
    """SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG (CONFIGURE_MEM_SLOTS, as
    QEMU sends them to libvhost-user) as the proxy's state follows them:
    mapped PROT_READ, remapped on each change, all released on close."""
    from inspector.vhost_user.protocol import MemoryRegionDesc, MemoryTable
    from inspector.vhost_user.proxy_link import Frame
    from inspector.vhost_user.proxy_state import ConnectionState

    def memfd(fill: int) -> int:
        fd = os.memfd_create("vqs-proxy-test")
        os.write(fd, bytes([fill]) * 8192)
        return fd

    before = _fd_count()
    state = ConnectionState(logging.getLogger("test"), 1)
    fds = [memfd(1), memfd(2), memfd(3)]
    try:
        table = MemoryTable([MemoryRegionDesc(0, 8192, 0x10000, 0), MemoryRegionDesc(0x4000, 8192, 0x20000, 0)])
        state.front_end_message(Frame(Request.SET_MEM_TABLE, 1, 72, table.pack(), fds[:2]))
        reg = MemoryRegionDesc(0x8000, 4096, 0x30000, 4096)
        fields = state.front_end_message(Frame(Request.ADD_MEM_REG, 1, 40, bytes(8) + reg.pack(), fds[2:]))
        assert fields["guest_phys_addr"] == 0x8000
        assert [state.mem.read(a, 1) for a in (0, 0x4000, 0x8000)] == [b"\x01", b"\x02", b"\x03"]
        with pytest.raises(TypeError):                         # PROT_READ: a read-only buffer
            state.mem.view(0, 1)[0] = 9
        state.front_end_message(Frame(Request.REM_MEM_REG, 1, 40, bytes(8) + table.regions[0].pack(), []))
        assert [r.gpa for r in state.mem] == [0x4000, 0x8000]
        with pytest.raises(ProtocolViolation, match="no region"):
            state.front_end_message(Frame(Request.REM_MEM_REG, 1, 40, bytes(8) + table.regions[0].pack(), []))
    finally:
        for fd in fds:
            os.close(fd)
    assert _fd_count() > before                                  # the proxy's dups and mappings
    state.close()
    assert _fd_count() == before and not _maps_of(["vqs-proxy-test"])


@pytest.mark.timeout(120)
def test_several_connections_at_once_each_with_its_own_back_end_connection(sdir, proxy_to):
    back = os.path.join(sdir, "back.sock")
    with VqscopeServe(back, "net", ["--loopback"]):
        proxy = proxy_to(back)
        fes = [VhostUserFrontend(proxy.listen_path, queue_size=64, mem_size=2 << 20, packed=k == 1)
               for k in range(3)]
        try:
            assert sorted(c.id for c in proxy.connections) == [1, 2, 3]
            for k, fe in enumerate(fes):
                fe.post_rx_buffers(0, 8)
                assert fe.send_frames(0, [bytes([k]) * 64] * 4) == 4
            for k, fe in enumerate(fes):
                assert _frames_back(fe, 0, 4) == [bytes([k]) * 64] * 4
            snap = proxy_snapshot_of(proxy)
            assert sorted({q.device for q in snap.queues}) == ["proxy1", "proxy2", "proxy3"]
            fes[1].close()
            assert wait_for(lambda: sorted(c.id for c in proxy.connections) == [1, 3])
            again = bytes(12) + b"again" * 20      # (loopback swaps the two MAC addresses)
            for k in (0, 2):                                   # the others go on
                assert fes[k].send_frames(0, [again]) == 1
                assert _frames_back(fes[k], 0, 1) == [again]
        finally:
            for fe in fes:
                fe.close()
        assert wait_for(lambda: not proxy.connections)


def proxy_snapshot_of(proxy):
    from inspector.introspect.proxy_snapshot import proxy_snapshot
    return proxy_snapshot(proxy)


def test_a_back_end_that_does_not_read_holds_only_its_own_connection(sdir, proxy_to):
    """A payload streamed to a back-end that never reads: the proxy holds at
    most its bounded outbox, stops reading that front-end, and serves
    another connection meanwhile."""
    from inspector.vhost_user.proxy_link import OUTBOX_LIMIT, STREAM_CHUNK

    raw = _RawBackEnd(os.path.join(sdir, "raw.sock"))
    proxy = proxy_to(raw.path)
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        front.connect(proxy.listen_path)
        stuck = raw.accept()
        front.setblocking(False)
        sent = 0
        payload = bytes(1 << 16)
        front.send(t.encode_header(Request.SET_FEATURES, 1, 64 << 20))
        end = time.monotonic() + 10
        while time.monotonic() < end:                          # until every buffer on the way is full
            try:
                sent += front.send(payload)
                end = min(end, time.monotonic() + 1)
            except BlockingIOError:
                time.sleep(0.05)
            if sent > 32 << 20:
                break
        conn = proxy.connections[0]
        assert conn.back.out_bytes <= OUTBOX_LIMIT + STREAM_CHUNK
        assert sent < 32 << 20                                 # the proxy stopped reading it
        other.settimeout(5)
        other.connect(proxy.listen_path)
        second = raw.accept()
        t.send_message(other, Request.GET_FEATURES)
        got, _ = _recv_exact(second, 12)
        assert got == t.encode_message(Request.GET_FEATURES)
        second.close()
        stuck.close()
    finally:
        front.close()
        other.close()
        raw.close()
    assert wait_for(lambda: not proxy.connections)
