"""``vqscope exporter`` and a real Prometheus server as test peers
(tests/integration/test_exporter.py, tests/bench/bench_exporter.py).

:class:`Exporter` runs ``python -m inspector exporter`` on a free loopback
port and scrapes it; :class:`Prometheus` runs Debian's ``prometheus`` with a
scrape config for that exporter (and optional rule files) and asks its HTTP
API (``/api/v1/query``, ``/api/v1/alerts``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, VQSCOPE
from tests.support.peers import Peer, PeerError, PeerHandle

#: The files the exporter ships for Prometheus (checked by promtool).
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Exporter(PeerHandle):
    """``vqscope exporter --listen 127.0.0.1:PORT ARGS...``, up once
    /healthz answers."""

    def __init__(self, args: list[str], startup_timeout: float = 30):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [*VQSCOPE, "exporter", "--listen", f"127.0.0.1:{self.port}", *args]
        self.peer = Peer(argv, "vqscope exporter", env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=str(ROOT))
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if http_get(self.url + "/healthz", timeout=2)[0] in (200, 503):
                    break
            except OSError:
                pass
            if not self.peer.alive() or time.monotonic() > deadline:
                self.peer.close()
                raise PeerError(f"the exporter did not answer /healthz\n{self.peer.tail()}")
            time.sleep(0.1)

    def metrics_text(self, timeout: float = 10.0) -> str:
        status, body = http_get(self.url + "/metrics", timeout)
        assert status == 200, f"/metrics answered {status}: {body[:200]!r}"
        return body.decode()

    def samples(self, name: str | None = None) -> list:
        """Every sample of /metrics (prometheus_client's parser), or those
        of one sample name."""
        out = []
        for fam in text_string_to_metric_families(self.metrics_text()):
            out += [s for s in fam.samples if name is None or s.name == name]
        return out

    def health(self) -> tuple[int, dict]:
        status, body = http_get(self.url + "/healthz")
        return status, json.loads(body)


class Prometheus(PeerHandle):
    """Debian's ``prometheus`` on a free loopback port, scraping ``targets``
    (host:port) every ``interval`` as job ``vqscope``, evaluating
    ``rule_files`` every ``interval``; up once ``/-/ready`` answers 200."""

    def __init__(self, targets: list[str], *, interval: str = "1s", rule_files: list[str] = (),
                 startup_timeout: float = 60):
        self.dir = tempfile.mkdtemp(prefix="vqsprom")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = f"{self.dir}/prometheus.yml"
        rules = "".join(f"\n  - {json.dumps(str(r))}" for r in rule_files)
        with open(self.config, "w") as f:
            f.write(f"""global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
rule_files:{rules or " []"}
scrape_configs:
  - job_name: vqscope
    static_configs:
      - targets: {json.dumps(targets)}
""")
        argv = [shutil.which("prometheus") or "prometheus", f"--config.file={self.config}",
                f"--storage.tsdb.path={self.dir}/data", f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn"]
        self.peer = Peer(argv, "prometheus", cwd=self.dir)
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if http_get(self.url + "/-/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if not self.peer.alive() or time.monotonic() > deadline:
                self.close()
                raise PeerError(f"prometheus did not become ready\n{self.peer.tail()}")
            time.sleep(0.2)

    def api(self, path: str, **params) -> dict:
        """``/api/v1/PATH?params``'s ``data`` (AssertionError unless status success)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        reply = json.loads(body)
        assert status == 200 and reply.get("status") == "success", f"{url}: {status} {reply}"
        return reply["data"]

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict, float]]:
        """An instant query's vector: [(labels, value)]."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        assert data["resultType"] == "vector", data
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def alerts(self) -> list[dict]:
        """The alerts (pending and firing) of ``/api/v1/alerts``."""
        return self.api("alerts")["alerts"]

    def close(self) -> None:
        self.peer.close()
        shutil.rmtree(self.dir, ignore_errors=True)
