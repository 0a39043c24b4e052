"""The exporter's HTTP endpoint: ``GET /metrics`` (the text format 0.0.4
from the collector's prepared lines; prometheus_client's WSGI app over the
exporter's registry for a scraper that takes only OpenMetrics or filters
with ``name[]``; gzip when accepted),
``GET /healthz`` (JSON: the exporter's threads and each source's state) and
``GET /`` (a link to both). A few long-lived threads answer (a slow client
holds one for at most CLIENT_TIMEOUT); nothing here reads a source.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, gzip_accepted

from ..errors import ArgumentError
from .collector import FleetCollector
from .poller import Watch


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6) -> (host, port); an
    ArgumentError names what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ArgumentError(f"--listen {text!r}: give HOST:PORT, e.g. 127.0.0.1:9793")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        n = int(port)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise ArgumentError(f"--listen {text!r}: port {port!r} is not 0..65535")
    return host, n


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Requests served at once; more wait in the listen backlog. Scrapers are
#: few (one or two Prometheus servers, a curl), and a fixed set of threads
#: bounds what a flood of connections can take (idle ones cost nothing).
WORKERS = 16
#: Seconds a client may take to send its request or read the reply: a
#: client that connects and says nothing holds a worker that long.
CLIENT_TIMEOUT = 5.0


class _Server(WSGIServer):
    """A WSGI server answering each connection on one of :data:`WORKERS`
    long-lived threads (socketserver's ThreadingMixIn starts a thread per
    request)."""

    allow_reuse_address = True
    request_queue_size = 64

    def server_activate(self) -> None:
        super().server_activate()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="exporter http")

    def process_request(self, request, client_address) -> None:
        request.settimeout(CLIENT_TIMEOUT)
        self._pool.submit(self._handle, request, client_address)

    def _handle(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:   # noqa: BLE001 - a broken client: log it, keep serving
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        pool = getattr(self, "_pool", None)   # none when binding failed
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):   # noqa: A002 - the base class's name
        pass


def health(watches: Iterable[Watch], threads_ok: bool) -> tuple[int, dict]:
    """/healthz: (HTTP status, JSON body). 200 while the exporter's threads
    run (sources being down is not the exporter's ill health: their ``up``
    says it), 503 when a reader or the glob scanner died."""
    now = time.monotonic()
    sources = []
    ok = threads_ok
    for w in watches:
        age = w.age(now)
        sources.append({"source": w.label, "kind": w.spec.kind, "up": w.ok,
                        "age_s": None if age is None else round(age, 3), "reads": w.reads,
                        "errors": w.errors, "last_error": w.last_error or None})
        ok = ok and w.alive()
    return (200 if ok else 503), {"status": "ok" if ok else "degraded", "sources": sources}


_INDEX = (b"<html><head><title>vqscope exporter</title></head><body><h1>vqscope exporter</h1>"
          b"<p><a href=\"/metrics\">/metrics</a> <a href=\"/healthz\">/healthz</a></p></body></html>\n")


def wants_text(accept: str | None) -> bool:
    """Whether an Accept header takes the text format 0.0.4 (text/plain,
    text/*, */* or no header: Prometheus offers it beside OpenMetrics)."""
    if not accept:
        return True
    return any(part.split(";")[0].strip() in ("text/plain", "text/*", "*/*") for part in accept.split(","))


def make_app(registry: CollectorRegistry, collector: FleetCollector, watches: Callable[[], Iterable[Watch]],
             threads_ok: Callable[[], bool]):
    """The WSGI app: /metrics, /healthz, /; 404 elsewhere, 405 for other
    methods than GET and HEAD. /metrics is the collector's prepared text
    exposition (gzip level 1 when accepted); a scraper that takes only
    OpenMetrics, or asks for ``name[]``, gets prometheus_client's own
    rendering of ``registry``."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"GET only\n"]
        if path == "/metrics":
            if "name[]" in environ.get("QUERY_STRING", "") or not wants_text(environ.get("HTTP_ACCEPT")):
                return metrics_app(environ, start_response)
            body = collector.exposition()
            headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                body = gzip.compress(body, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
            start_response("200 OK", headers)
            return [body]
        if path == "/healthz":
            status, body = health(watches(), threads_ok())
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", "application/json")])
            return [json.dumps(body).encode() + b"\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html")])
            return [_INDEX]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


def serve(host: str, port: int, app) -> tuple[WSGIServer, threading.Thread]:
    """Bind ``host:port`` and serve ``app`` from a daemon thread; returns
    (server, thread). OSError (address in use, ...) propagates."""
    cls = _Server6 if ":" in host else _Server
    httpd = make_server(host, port, app, server_class=cls, handler_class=_QuietHandler)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="exporter http",
                         daemon=True)
    t.start()
    return httpd, t
