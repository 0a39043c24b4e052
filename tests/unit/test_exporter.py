"""``vqscope exporter`` without Prometheus (the real one scrapes it in
tests/integration/test_exporter.py): the vocabulary, the prepared text
exposition against prometheus_client's own encoder, background readers that
hang or fail, QMP globs, the HTTP endpoint and the command line."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inspector.analysis import Analyzer, Thresholds, Verdict
from inspector.errors import SourceError
from inspector.exporter import metrics as M
from inspector.exporter.collector import FleetCollector, prepare
from inspector.exporter.poller import Fleet, Reading, SourceSpec, Watch
from inspector.introspect.client import IntrospectionClient
from inspector.exporter.server import make_app, parse_listen, serve, wants_text
from inspector.ring.anomalies import Anomaly, AnomalyKind
from inspector.snapshot.model import QueueEntry, Snapshot
from inspector.sources.base import Source
from tests.conftest import ROOT, VQSCOPE, wait_for
from tests.support.peers import socket_dir
from tests.support.prometheus import Exporter, http_get

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


# ---------------------------------------------------------------- the vocabulary

def test_metric_names_follow_the_prometheus_conventions():
    names = [m.name for m in M.METRICS]
    assert len(names) == len(set(names))
    for m in M.METRICS:
        assert re.fullmatch(r"vqscope_[a-z0-9_]+", m.name), m.name
        assert m.type in ("gauge", "counter")
        assert not m.name.endswith("_total"), "counters are named without _total (the exposition adds it)"
        assert m.exposed.endswith("_total") == (m.type == "counter")
        assert len(m.help) > 10
        if m.name.startswith("vqscope_queue_"):
            assert m.labels[:4] == M.QUEUE_LABELS and len(m.labels) <= 5, m
        if m.name.startswith("vqscope_source_"):
            assert m.labels[0] == "source", m
        assert "_ms" not in m.name and "milliseconds" not in m.name   # base units
    assert M.EXPOSED_NAMES == {m.exposed for m in M.METRICS}


# ---------------------------------------------------------------- snapshots to samples

def _split(device: str, index: int, **kw) -> QueueEntry:
    args = dict(device=device, index=index, size=256, features=0, event_idx=True, avail_idx=70000 % 65536,
                used_idx=4460, last_avail_idx=4460, inflight=4, kicks=12, calls=9, packets=123456789,
                bytes=1 << 40, calls_suppressed=3)
    args.update(kw)
    return QueueEntry(**args)


def _packed(device: str, index: int) -> QueueEntry:
    return QueueEntry(device=device, index=index, layout="packed", size=255, features=0, event_idx=False,
                      inflight=2, last_avail_idx=7, kicks=1, calls=1, packets=10, bytes=640, next_avail=9,
                      avail_wrap_counter=1, next_used=7, used_wrap_counter=0, last_avail_wrap_counter=1,
                      driver_event_flags=0, driver_event_off=0, driver_event_wrap=0, device_event_flags=1,
                      device_event_off=0, device_event_wrap=0, positions="device")


def _blk() -> QueueEntry:
    q = _split("blk0", 0, dropped=None)
    q.extras = {"blk": {"requests": {"in": 5, "out": 7, "flush": 1}, "status": {"ok": 12, "ioerr": 1},
                        "bad_requests": {"unaligned": 2, "out_of_range": 0}, "in_flight": 3,
                        "bytes_read": 4096, "bytes_written": 8192, "resubmitted": 0, "recent": []}}
    return q


def _iova() -> QueueEntry:
    q = _split("net7", 0)
    q.extras = {"iotlb": {"entries": 14, "capacity": 16384, "updates": 40, "invalidations": 26,
                          "invalidations_unmapped": 1, "evictions": 0, "misses": 41, "rejected": 2,
                          "ring_restarts": 0, "ring": {}, "buffers_untranslated": 3,
                          "miss": {"iova": 0xFFFEE000, "perm": "wo", "waiting_s": 2.5}}}
    return q


def _reading(queues: list[QueueEntry], t: float, source: str = "s", taken: float | None = None) -> Reading:
    snap = Snapshot(source=source, time=t, queues=queues)
    a = Analyzer()
    a.update(snap)
    return Reading(snap, a.diagnoses, time.monotonic() if taken is None else taken, 0.004, prepare(snap, a.diagnoses, source))


def _watch(label: str, reading: Reading | None, ok: bool = True, kind: str = "backend") -> Watch:
    w = Watch(SourceSpec(label, kind, lambda: None), 1.0, Thresholds())
    w.reading, w.ok, w.reads, w.errors = reading, ok, 7, 0 if ok else 3
    return w


def _fleet_collector(watches, now):
    c = FleetCollector(lambda: watches, stale_after=4.0, drop_after=60.0, clock=lambda: now)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    return c, reg


def test_prepared_exposition_is_prometheus_clients_generate_latest_byte_for_byte():
    t = time.time()
    now = time.monotonic()
    odd = 'vm "a"\\b\nc'   # a label value to escape: quote, backslash, newline
    q = _split(odd, 0, anomalies=[Anomaly(AnomalyKind.LOOP, "x", 3), Anomaly(AnomalyKind.LOOP, "y", 4),
                                  Anomaly(AnomalyKind.ZERO_LEN, "z", 5)])
    watches = [
        _watch("/run/a.sock", _reading([q, _split("net0", 1, dropped=5), _packed("net1", 0), _blk(), _iova()], t,
                                        "/run/a.sock", taken=now - 1)),
        _watch("/run/qemu.qmp", _reading([_split("/machine/peripheral/unet", 2)], t, "/run/qemu.qmp",
                                         taken=now - 2), kind="qemu"),
        _watch("/run/down.sock", None, ok=False),
        _watch("/run/old.sock", _reading([_split("net9", 0)], t - 100, "/run/old.sock", taken=now - 100), ok=False),
    ]
    c, reg = _fleet_collector(watches, now)
    mine = c.exposition()
    assert mine == generate_latest(reg)
    for w in watches:   # again, from the label caches the first rendering filled
        if w.reading is not None:
            r = w.reading
            w.reading = Reading(r.snapshot, r.diagnoses, r.taken, r.duration, prepare(r.snapshot, r.diagnoses, w.label))
    assert c.exposition() == mine
    # and what it says: parsed back, every family, the escaped label intact, the dropped source's queues gone
    fams = {f.name: f for f in text_string_to_metric_families(mine.decode())}
    size = {(s.labels["source"], s.labels["device"]) for s in fams["vqscope_queue_size"].samples}
    assert (("/run/a.sock", odd) in size and ("/run/qemu.qmp", "/machine/peripheral/unet") in size
            and not any(src == "/run/old.sock" for src, _ in size))
    up = {s.labels["source"]: s.value for s in fams["vqscope_source_up"].samples}
    assert up == {"/run/a.sock": 1, "/run/qemu.qmp": 1, "/run/down.sock": 0, "/run/old.sock": 0}
    anomalies = {(s.labels["device"], s.labels["kind"]): s.value for s in fams["vqscope_queue_anomalies"].samples}
    assert anomalies == {(odd, "loop"): 2, (odd, "zero_len"): 1}
    pk = {s.name: s.value for f in fams.values() for s in f.samples
          if s.labels.get("device") == "net1"}
    assert pk["vqscope_queue_next_avail"] == 9 and pk["vqscope_queue_used_wrap_counter"] == 0
    io = {s.name: s.value for f in fams.values() for s in f.samples if s.labels.get("device") == "net7"}
    assert (io["vqscope_queue_iotlb_entries"], io["vqscope_queue_iotlb_misses_total"],
            io["vqscope_queue_iotlb_rejected_total"], io["vqscope_queue_iotlb_miss_waiting_seconds"]) == (14, 41, 2, 2.5)
    assert not any(s.labels.get("device") == "net0" for s in fams["vqscope_queue_iotlb_entries"].samples)
    assert "vqscope_queue_avail_idx" not in pk     # no split fields on a packed queue
    blk = {(s.name, s.labels.get("request") or s.labels.get("status") or s.labels.get("kind")): s.value
           for f in fams.values() for s in f.samples if s.labels.get("device") == "blk0"}
    assert blk[("vqscope_queue_blk_requests_total", "out")] == 7 and blk[("vqscope_queue_blk_inflight", None)] == 3
    assert blk[("vqscope_queue_blk_bad_requests_total", "unaligned")] == 2
    big = [s for s in fams["vqscope_queue_bytes"].samples if s.labels["device"] == "net0"]
    assert big[0].value == float(1 << 40)
    # one verdict gauge per verdict, exactly one of them 1, per queue
    per_queue: dict = {}
    for s in fams["vqscope_queue_verdict"].samples:
        per_queue.setdefault((s.labels["source"], s.labels["device"], s.labels["queue"]), []).append(s)
    for qid, ss in per_queue.items():
        assert sorted(s.labels["verdict"] for s in ss) == sorted(v.value for v in Verdict), qid
        assert sum(s.value for s in ss) == 1, qid
    # OpenMetrics (prometheus_client's encoder over collect()) says the same
    om = om_generate_latest(reg).decode()
    assert om.endswith("# EOF\n") and "vqscope_queue_kicks_total{" in om


def test_a_hung_source_delays_no_scrape_and_goes_stale():
    """A source whose snapshot() blocks (a SIGSTOPped back-end): the
    scrape answers from the others' readings; its reading ages and up
    drops; a failing source counts errors and recovers."""
    release = threading.Event()
    fail = threading.Event()

    class Hanging(Source):
        name = "hanging"
        calls = 0

        def snapshot(self):
            Hanging.calls += 1
            if Hanging.calls > 2:
                release.wait(30)
            return Snapshot(source="h", time=time.time(), queues=[_split("net0", 0)])

    class Flaky(Source):
        name = "flaky"

        def snapshot(self):
            if fail.is_set():
                raise SourceError("back-end at /x closed the introspection connection")
            return Snapshot(source="f", time=time.time(), queues=[_split("net0", 1)])

    fleet = Fleet([SourceSpec("/h", "backend", Hanging), SourceSpec("/f", "backend", Flaky),
                   SourceSpec("/h", "backend", Hanging)], interval=0.05, prepare=prepare).start()
    c = FleetCollector(fleet.watches, stale_after=0.5, drop_after=60.0)
    try:
        assert [w.label for w in fleet.watches()] == ["/h", "/f"]    # a label given twice: watched once

        def up():
            fams = {f.name: f for f in text_string_to_metric_families(c.exposition().decode())}
            return {s.labels["source"]: s.value for s in fams["vqscope_source_up"].samples}

        assert wait_for(lambda: Hanging.calls == 3 and up() == {"/h": 0, "/f": 1}, 10), up()
        # the third read still hangs ...
        h = fleet.watches()[0]
        assert h.age() > 0.5 and h.reading is not None              # ... its last reading is served, stale
        fail.set()
        assert wait_for(lambda: up()["/f"] == 0, 10)
        f = fleet.watches()[1]
        assert f.errors >= 1 and "closed the introspection connection" in f.last_error
        fail.clear()
        assert wait_for(lambda: up()["/f"] == 1, 10)
    finally:
        release.set()
        fleet.stop()


def test_qmp_glob_sources_come_and_go(tmp_path):
    """Sockets matching a glob start watches; one that nobody listens on any
    more (a killed QEMU leaves its file) or that is removed stops its
    watch; a new socket at the same path is watched again."""
    d = socket_dir()
    listeners = {}

    def listen(name):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"{d}/{name}.qmp")
        s.listen(4)
        listeners[name] = s

    fleet = Fleet([], [f"{d}/*.qmp"], interval=0.05, timeout=0.2, rescan=0.05).start()
    try:
        listen("a")
        listen("b")
        assert wait_for(lambda: sorted(w.label for w in fleet.watches()) == [f"{d}/a.qmp", f"{d}/b.qmp"], 10)
        assert all(w.spec.kind == "qemu" for w in fleet.watches())
        listeners.pop("a").close()              # the file stays, nobody listens
        assert os.path.exists(f"{d}/a.qmp")
        assert wait_for(lambda: [w.label for w in fleet.watches()] == [f"{d}/b.qmp"], 10)
        listeners.pop("b").close()
        os.unlink(f"{d}/b.qmp")                 # removed, as libvirt does
        assert wait_for(lambda: fleet.watches() == [], 10)
        os.unlink(f"{d}/a.qmp")
        listen("a")                             # a new VM at the old path
        assert wait_for(lambda: [w.label for w in fleet.watches()] == [f"{d}/a.qmp"], 10)
    finally:
        fleet.stop()
        for s in listeners.values():
            s.close()


# ---------------------------------------------------------------- HTTP

@pytest.fixture
def http():
    now = time.monotonic()
    watches = [_watch("/run/a.sock", _reading([_split("net0", 0)], time.time(), "/run/a.sock", taken=now))]
    watches[0].alive = lambda: True     # its reader thread, as if started
    c, reg = _fleet_collector(watches, now)
    httpd, t = serve("127.0.0.1", 0, make_app(reg, c, lambda: watches, lambda: True))
    yield f"http://127.0.0.1:{httpd.server_address[1]}", c, reg
    httpd.shutdown()
    httpd.server_close()


def _get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_metrics_formats_and_health(http):
    url, c, reg = http
    status, headers, body = _get(url + "/metrics", {"Accept": PROMETHEUS_ACCEPT})
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert body == c.exposition()
    status, headers, body = _get(url + "/metrics", {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip" and gzip.decompress(body) == c.exposition()
    status, headers, body = _get(url + "/metrics", {"Accept": "application/openmetrics-text;version=1.0.0"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n") and b"vqscope_queue_inflight{" in body
    status, _, body = _get(url + "/metrics?name[]=vqscope_source_up")
    assert status == 200 and body.count(b"\nvqscope_") == 1 and b"vqscope_source_up{" in body
    status, _, body = _get(url + "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["sources"][0]["source"] == "/run/a.sock"
    assert _get(url + "/nope")[0] == 404
    assert b"/metrics" in _get(url + "/")[2]
    req = urllib.request.Request(url + "/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_silent_clients_do_not_stop_scrapes(http):
    """Connections that never send a request hold a worker each until
    CLIENT_TIMEOUT; fewer than WORKERS of them leave /metrics answering."""
    from inspector.exporter.server import WORKERS
    url, c, reg = http
    host, port = url.rsplit("/", 1)[1].split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(WORKERS - 1)]
    try:
        status, _, body = _get(url + "/metrics")
        assert status == 200 and body == c.exposition()
    finally:
        for s in idle:
            s.close()


def test_accept_header_and_listen_parsing():
    assert wants_text(None) and wants_text(PROMETHEUS_ACCEPT) and wants_text("text/plain")
    assert not wants_text("application/openmetrics-text;version=1.0.0")
    assert parse_listen("127.0.0.1:9793") == ("127.0.0.1", 9793)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("9793", ":9793", "host:port", "h:70000"):
        with pytest.raises(Exception, match="--listen"):
            parse_listen(bad)


# ---------------------------------------------------------------- the command

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VQSCOPE, "exporter", *args], cwd=str(ROOT), capture_output=True, text=True, timeout=60)


def test_cli_errors_exit_2_with_one_line():
    r = _cli()
    assert r.returncode == 2 and "no source given" in r.stderr
    r = _cli("--connect", "/x", "--listen", "nope")
    assert r.returncode == 2 and "--listen 'nope'" in r.stderr
    r = _cli("--connect", "/x", "--interval", "0")
    assert r.returncode == 2 and "--interval 0" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        r = _cli("--connect", "/x", "--listen", f"127.0.0.1:{s.getsockname()[1]}")
    assert r.returncode == 2 and "cannot listen" in r.stderr


def test_exporter_serves_a_running_backend():
    """``vqscope demo --headless`` (back-end + built-in front-end) watched by
    the exporter process: its counters between two snapshots, and SIGTERM
    ends it with status 0."""
    d = socket_dir()
    sock = f"{d}/demo.sock"
    demo = subprocess.Popen([*VQSCOPE, "demo", "--headless", "--duration", "60", "--socket", sock], cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ex = None
    try:
        assert wait_for(lambda: os.path.exists(sock + ".introspect"), 30)
        # the exporter's request: the snapshot without its chains (they are most of a loaded reply)
        client = IntrospectionClient(sock + ".introspect")
        assert wait_for(lambda: len(client.request("snapshot")["queues"]) == 2, 30)   # both vrings set up
        full, bare = client.request("snapshot"), client.request("snapshot", chains=False)
        assert "chains_omitted" not in full
        assert bare["chains_omitted"] is True and all(q["chains"] == [] for q in bare["queues"])
        assert [q["index"] for q in bare["queues"]] == [q["index"] for q in full["queues"]]
        with pytest.raises(SourceError, match="chains 'no' is invalid"):
            client.request("snapshot", chains="no")
        client.close()
        ex = Exporter(["--interval", "0.2", "--connect", sock, "--connect", f"{d}/absent.sock"])

        def packets():
            return {int(s.labels["queue"]): s.value for s in ex.samples("vqscope_queue_packets_total")}

        assert wait_for(lambda: len(packets()) == 2 and min(packets().values()) > 0, 20), packets()
        before = json.loads(subprocess.run([*VQSCOPE, "snapshot", "--connect", sock, "--json"], cwd=str(ROOT),
                                           capture_output=True, text=True, timeout=30).stdout)
        time.sleep(0.5)
        got = packets()
        after = json.loads(subprocess.run([*VQSCOPE, "snapshot", "--connect", sock, "--json"], cwd=str(ROOT),
                                          capture_output=True, text=True, timeout=30).stdout)
        for qa, qb in zip(before["queues"], after["queues"]):
            assert qa["packets"] <= got[qa["index"]] <= qb["packets"], (qa["packets"], got, qb["packets"])
        up = {s.labels["source"]: s.value for s in ex.samples("vqscope_source_up")}
        assert up == {sock: 1, f"{d}/absent.sock": 0}
        status, health = ex.health()
        assert status == 200 and [s["up"] for s in health["sources"]] == [True, False]
        os.kill(ex.peer.proc.pid, signal.SIGTERM)
        assert ex.peer.proc.wait(15) == 0
    finally:
        if ex is not None:
            ex.close()
        demo.terminate()
        demo.wait(15)


def test_exporter_serves_a_blk_backends_request_counters():
    """``serve blk --memory`` under ``load blk``: the block queue's request,
    status and byte counters in /metrics lie between two snapshots taken
    around the scrape."""
    from tests.support.peers import VqscopeServe
    d = socket_dir()
    sock = f"{d}/blk.sock"
    with VqscopeServe(sock, "blk", ["--memory", "--size", "16M"]) as blk:
        load = subprocess.Popen([*VQSCOPE, "load", "blk", "--connect", sock, "--rw", "randrw", "--seconds", "30",
                                 "--iodepth", "4"], cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ex = Exporter(["--interval", "0.2", "--connect", sock])
        try:
            def served():
                return {(s.name, s.labels.get("request") or s.labels.get("status")): s.value
                        for s in ex.samples() if s.name.startswith("vqscope_queue_blk_")}

            assert wait_for(lambda: served().get(("vqscope_queue_blk_read_bytes_total", None), 0) > 0, 30), served()
            before = blk.snapshot()["queues"][0]["blk"]
            time.sleep(0.5)
            got = served()
            after = blk.snapshot()["queues"][0]["blk"]
            for name, key in (("vqscope_queue_blk_read_bytes_total", "bytes_read"),
                              ("vqscope_queue_blk_written_bytes_total", "bytes_written")):
                assert before[key] <= got[(name, None)] <= after[key], (name, before[key], got, after[key])
            for request in ("in", "out"):
                assert (before["requests"][request] <= got[("vqscope_queue_blk_requests_total", request)]
                        <= after["requests"][request]), (request, got)
            assert before["status"]["ok"] <= got[("vqscope_queue_blk_status_total", "ok")] <= after["status"]["ok"]
            assert after["requests"]["out"] > before["requests"]["out"]    # the load ran meanwhile
        finally:
            ex.close()
            load.terminate()
            load.wait(15)


def test_sources_that_come_and_go_leave_no_thread_or_fd(tmp_path):
    """Forty QMP-glob matches appearing and vanishing (nothing listens:
    each watch fails, is dropped, ends its thread): threads and fds go
    back to where they were."""
    d = socket_dir()
    fleet = Fleet([], [f"{d}/*.qmp"], interval=0.02, timeout=0.2, rescan=0.02).start()
    try:
        time.sleep(0.1)
        threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
        for i in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(f"{d}/vm{i}.qmp")
            s.close()                            # a socket file nobody listens on
            assert wait_for(lambda: len(fleet.watches()) == 1, 10)
            os.unlink(f"{d}/vm{i}.qmp")
            assert wait_for(lambda: fleet.watches() == [], 10)
        assert wait_for(lambda: threading.active_count() <= threads, 10), threading.active_count() - threads
        assert len(os.listdir("/proc/self/fd")) <= fds
    finally:
        fleet.stop()
