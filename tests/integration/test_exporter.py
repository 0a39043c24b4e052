"""``vqscope exporter`` scraped by a real Prometheus (Debian's 2.42), watching
real sources (issue 16, README "Fleet").

One module set-up, shared by the tests in order:

- a QEMU guest (tests/support/peers.py AttachVM: virtio-net on user net,
  virtio-blk, and a vhost-user virtio-net on ``vqscope serve``, traffic
  from the guest) whose QMP socket the exporter finds through a glob;
- ``dpdk-testpmd`` virtio-user -> ``vqscope proxy`` -> ``vqscope serve net
  --loopback``, forwarding frames in a loop (io, tx_first): the loaded
  queues; the exporter watches both the serve and the proxy;
- the exporter (``--interval 1``) and Prometheus scraping it every 1 s with
  contrib/prometheus/alerts.yml loaded.

Then: rates and indices in Prometheus against snapshots; a VM appearing and
disappearing in the glob; the serve SIGSTOPped: scrapes still answer, its
source goes down, the proxy's view of the TX vring becomes stuck
(suppression_stuck: the device left VRING_USED_F_NO_NOTIFY set) and the
alert VqscopeQueueStalled fires in Prometheus.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, VQSCOPE, require
from tests.support.peers import (AttachVM, DpdkTestpmd, Peer, VqscopeNet, find_testpmd, require_guest,
                                 socket_dir, virtio_user_vdev, vq_rx, vq_tx, wait_path)
from tests.support.prometheus import ALERTS, Exporter, Prometheus
from tests.support.proxy import VqscopeProxy

pytestmark = [pytest.mark.qemu, pytest.mark.dpdk]

BURSTS = 4          # tx_first bursts of 32 frames looping between testpmd and the loopback back-end


def _wait(cond, timeout: float, what: str, interval: float = 0.5):
    """Poll ``cond()`` until it returns something true; return it, or fail
    with ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"{what} within {timeout:.0f} s (last: {last!r})")


def _snapshot(*source_args: str) -> dict:
    r = subprocess.run([*VQSCOPE, "snapshot", *source_args, "--json"], cwd=str(ROOT), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def fleet():
    require_guest("reading QEMU's memory and the vhost-user guest need root")
    require(find_testpmd() is not None, "dpdk-testpmd is not installed (dpdk; make deps)")
    require(shutil.which("prometheus") is not None, "Debian's prometheus is not installed (make deps)")
    require(ALERTS.exists(), f"{ALERTS} is missing")
    ns = SimpleNamespace(vm=None, serve=None, proxy=None, testpmd=None, exporter=None, prom=None, extra=None)
    ns.dir = socket_dir()
    ns.vms = f"{ns.dir}/vms"
    os.mkdir(ns.vms)
    try:
        ns.vm = AttachVM()                       # boots first: testpmd's busy polling slows TCG
        ns.guest_qmp = f"{ns.vms}/guest.qmp"
        os.symlink(ns.vm.qmp, ns.guest_qmp)      # the glob finds the guest's QMP socket through the link
        ns.serve_sock = f"{ns.dir}/be.sock"
        ns.serve = VqscopeNet(ns.serve_sock)
        ns.proxy = VqscopeProxy(f"{ns.dir}/fe.sock", ns.serve_sock)
        ns.testpmd = DpdkTestpmd([virtio_user_vdev(ns.proxy.sock, 1)], main_lcore=1, name="testpmd virtio-user")
        ns.testpmd.start(tx_first=BURSTS)
        ns.exporter = Exporter(["--interval", "1", "--connect", ns.serve_sock, "--connect", ns.proxy.sock,
                                "--qmp", f"{ns.vms}/*.qmp"])
        ns.prom = Prometheus([f"127.0.0.1:{ns.exporter.port}"], interval="1s", rule_files=[str(ALERTS)])
        yield ns
    finally:
        if ns.serve is not None and ns.serve.peer.alive():
            os.kill(ns.serve.peer.proc.pid, signal.SIGCONT)
        for p in (ns.prom, ns.exporter, ns.extra, ns.testpmd, ns.proxy, ns.serve, ns.vm):
            if p is not None:
                try:
                    p.close()
                except Exception:   # noqa: BLE001 - close every peer
                    pass
        shutil.rmtree(ns.dir, ignore_errors=True)


def _tail(ns) -> str:
    """The peers' output and what Prometheus holds about the scrapes and the proxy's verdicts."""
    out = [p.tail() for p in (ns.exporter, ns.prom, ns.serve, ns.proxy) if p is not None]
    if ns.prom is not None:
        for expr in ('up{job="vqscope"}', 'avg_over_time(up{job="vqscope"}[1m])',
                     'max_over_time(scrape_duration_seconds{job="vqscope"}[1m])', "scrape_samples_scraped",
                     f'vqscope_queue_verdict{{source="{ns.proxy.sock}"}} == 1', "vqscope_source_up"):
            try:
                out.append(f"{expr}: {ns.prom.query(expr)}")
            except Exception as e:   # noqa: BLE001 - diagnostics only
                out.append(f"{expr}: {e}")
    return "\n".join(out)


def test_prometheus_scrapes_the_loaded_queues(fleet):
    ns = fleet
    expr = f'rate(vqscope_queue_packets_total{{source="{ns.serve_sock}"}}[5s])'
    rates = _wait(lambda: {int(m["queue"]): v for m, v in ns.prom.query(expr)} or None, 40,
                  f"Prometheus has no {expr}\n{_tail(ns)}")
    rates = _wait(lambda: (r := {int(m["queue"]): v for m, v in ns.prom.query(expr)}) and
                  all(r.get(q, 0) > 0 for q in (vq_rx(0), vq_tx(0))) and r, 30,
                  f"rate > 0 for the loaded RX and TX vrings ({rates})")
    assert set(rates) == {vq_rx(0), vq_tx(0)}, rates
    # every series carries the four queue labels and the exporter's job
    (m, _), *_ = ns.prom.query(f'vqscope_queue_inflight{{source="{ns.serve_sock}"}}')
    assert {"source", "device", "queue", "layout", "job", "instance"} <= set(m), m
    assert m["layout"] in ("split", "packed")
    # the QEMU guest came through the glob: its QEMU-serviced queues and the vhost-user one
    guest = ns.prom.query(f'vqscope_queue_size{{source="{ns.guest_qmp}"}}')
    assert len(guest) >= 4, guest
    info = ns.prom.query(f'vqscope_source_info{{source="{ns.guest_qmp}"}}')
    assert info and info[0][0]["kind"] == "qemu" and "qemu" in info[0][0]["name"], info
    up = {m["source"]: v for m, v in ns.prom.query("vqscope_source_up")}
    assert up == {ns.serve_sock: 1, ns.proxy.sock: 1, ns.guest_qmp: 1}, up


def _within(a: int, v: int, b: int, mod: int | None) -> bool:
    """a <= v <= b, in free-running arithmetic mod ``mod`` when given."""
    if mod is None:
        return a <= v <= b
    return (v - a) % mod <= (b - a) % mod


def test_stored_indices_equal_the_snapshots(fleet):
    """What Prometheus stored at time T lies between two snapshots taken
    around T (a reading is at most one refresh old): for the loaded serve,
    whose counters move ~10^5 per second (its u16 indices then wrap more
    than once in between: compared through ``packets``), and the guest's
    queues."""
    ns = fleet
    sources = {ns.serve_sock: ("--connect", ns.serve_sock), ns.guest_qmp: ("--qmp", ns.vm.qmp_test)}
    fields = (("used_idx", 1 << 16), ("avail_idx", 1 << 16), ("packets", None))
    moved = 0
    for label, args in sources.items():
        before = _snapshot(*args)
        time.sleep(4.0)
        after = _snapshot(*args)
        t = (before["time"] + after["time"]) / 2 + 1.0   # the reading Prometheus holds then was taken in between
        time.sleep(max(0.0, t + 2.0 - time.time()))      # ... and scraped by then
        qa = {(q["device"], q["index"]): q for q in before["queues"]}
        qb = {(q["device"], q["index"]): q for q in after["queues"]}
        checked = 0
        stored = {}
        for field, mod in fields:
            name = f"vqscope_queue_{field}" + ("_total" if field == "packets" else "")
            stored[field] = ns.prom.query(f'{name}{{source="{label}"}}', at=t)
            for m, v in stored[field]:
                key = (m["device"], int(m["queue"]))
                if key not in qa or key not in qb or qa[key][field] is None:
                    continue
                a, b = qa[key][field], qb[key][field]
                if mod is not None and qb[key]["packets"] - qa[key]["packets"] >= mod // 2:
                    continue   # a free-running index that may have wrapped more than once: packets says it
                assert _within(a, int(v), b, mod), (f"{label} {key} {field}: Prometheus has {int(v)} at {t:.1f}, "
                                                    f"snapshots {a} at {before['time']:.1f} and {b} at "
                                                    f"{after['time']:.1f}")
                checked += 1
                moved += a != b
        up_expr = 'vqscope_source_up{source="%s"}' % label
        assert checked >= 2, (f"{label}: only {checked} values compared; Prometheus at {t:.1f}: "
                              f"{ {f: len(v) for f, v in stored.items()} } series, e.g. {str(stored)[:300]}; "
                              f"snapshot queues {sorted(qa)[:5]} ...; up "
                              f"{ns.prom.query(up_expr)}")
    assert moved >= 2, "no index moved between the snapshots: the comparison proved nothing"


def test_a_vm_appears_and_disappears_with_its_qmp_socket(fleet):
    ns = fleet
    qmp = f"{ns.vms}/extra.qmp"
    ns.extra = Peer(["qemu-system-x86_64", "-M", "q35", "-S", "-nodefaults", "-display", "none", "-m", "64",
                     "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                     "-qmp", f"unix:{qmp},server=on,wait=off"], "qemu -S")
    wait_path(qmp, 30, ns.extra.alive)
    _wait(lambda: ns.prom.query(f'vqscope_source_up{{source="{qmp}"}} == 1'), 30,
          f"the new VM's source up in Prometheus\n{_tail(ns)}")
    assert ns.prom.query(f'vqscope_source_info{{source="{qmp}",kind="qemu"}}')
    os.kill(ns.extra.proc.pid, signal.SIGKILL)   # a killed QEMU leaves its socket file: nobody listens there
    ns.extra.proc.wait(30)
    assert os.path.exists(qmp)
    _wait(lambda: not any(s.labels.get("source") == qmp for s in ns.exporter.samples()), 30,
          "the exited VM's metrics gone from /metrics")
    _wait(lambda: not ns.prom.query(f'vqscope_source_info{{source="{qmp}"}}'), 30,
          "the exited VM's series stale in Prometheus")
    ns.extra.close()
    os.unlink(qmp)


def test_sigstopped_backend_goes_down_and_the_stall_alert_fires(fleet):
    ns = fleet
    tx = str(vq_tx(0))
    os.kill(ns.serve.peer.proc.pid, signal.SIGSTOP)
    stopped = time.time()
    try:
        # scrapes are not delayed: Prometheus's own `up` stays 1 at a 1 s scrape timeout
        _wait(lambda: ns.prom.query(f'vqscope_source_up{{source="{ns.serve_sock}"}} == 0'), 30,
              f"the SIGSTOPped back-end's source down\n{_tail(ns)}")
        age = ns.prom.query(f'vqscope_source_reading_age_seconds{{source="{ns.serve_sock}"}}')
        assert age and age[0][1] > 3, age
        # The loopback device had set VRING_USED_F_NO_NOTIFY while it was busy, so the doctor names it
        # suppression_stuck (the driver will never kick again); without it, device_stalled.
        verdict = (f'vqscope_queue_verdict{{source="{ns.proxy.sock}",queue="{tx}",'
                   f'verdict=~"device_stalled|suppression_stuck"}} == 1')
        _wait(lambda: ns.prom.query(verdict), 40, f"the proxy's TX vring stuck\n{_tail(ns)}")
        firing = _wait(lambda: [a for a in ns.prom.alerts()
                                if a["labels"].get("alertname") == "VqscopeQueueStalled" and a["state"] == "firing"
                                and a["labels"].get("source") == ns.proxy.sock], 120,
                       f"VqscopeQueueStalled firing\n{_tail(ns)}", interval=2)
        assert firing[0]["labels"]["queue"] == tx, firing
        assert ns.prom.query('min_over_time(up{job="vqscope"}[1m]) == 1'), \
            "a scrape failed (or timed out) while the back-end was stopped"
        status, health = ns.exporter.health()
        assert status == 200, health
        assert {s["source"]: s["up"] for s in health["sources"]}[ns.serve_sock] is False, health
        assert time.time() - stopped >= 60
    finally:
        os.kill(ns.serve.peer.proc.pid, signal.SIGCONT)
    _wait(lambda: ns.prom.query(f'vqscope_source_up{{source="{ns.serve_sock}"}} == 1'), 30,
          "the back-end's source up again after SIGCONT")
