"""``vqscope proxy`` (inspector/vhost_user/proxy.py): the built-in
front-ends through the proxy to ``vqscope serve`` (a subprocess, as a
third-party back-end would be), the back-end request channel, byte-exact
forwarding of malformed messages with their fds, hang-ups on either side,
and the CLI."""

from __future__ import annotations

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
from inspector.vhost_user.protocol import BackendRequest, ProtocolFeature, Request
from inspector.vhost_user.proxy import VhostUserProxy
from inspector.vhost_user.server import VhostUserServer
from tests.conftest import ROOT, VQSCOPE, wait_for
from tests.support.nulldevice import NullDevice
from tests.support.peers import VqscopeServe, socket_dir, wait_path


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


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _balanced(proxy: VhostUserProxy, stats: dict) -> None:
    assert stats["proxy_originated"] == 0
    for key in ("front_end", "back_end", "backend_req", "backend_req_reply"):
        s = stats[key]
        assert (s["messages"], s["bytes"], s["fds"]) == (s["messages_out"], s["bytes_out"], s["fds_out"]), key


def _frames_back(fe, pair, n, timeout=10.0):
    got = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        fe.wait_call(pair, 0.1, "rx")
        got += fe.recv_frames(pair)
    return got


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
    before = _fd_count()
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
    assert wait_for(lambda: _fd_count() == before - 1)             # the raw back-end's listener is gone too
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


def test_unreachable_back_end_closes_the_front_end_and_keeps_listening(sdir, proxy_to, caplog):
    proxy = proxy_to(os.path.join(sdir, "nobody.sock"))
    with caplog.at_level(logging.INFO, logger="inspector.proxy"):
        for _ in range(2):
            front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            front.settimeout(5)
            front.connect(proxy.listen_path)
            assert front.recv(1) == b""
            front.close()
        assert wait_for(lambda: proxy.refused == 2)
    assert "cannot connect" in caplog.text and not proxy.connections


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
