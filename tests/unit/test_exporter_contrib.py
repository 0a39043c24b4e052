"""contrib/: the Grafana dashboard, the alert rules and the example Prometheus
configurations for `vqscope exporter` (README "Fleet").

- every metric name the dashboard (any string in it: exprs, template
  variable queries, descriptions) and the rule and configuration files
  mention is one the exporter serves (inspector.exporter.metrics
  EXPOSED_NAMES), and every verdict word they match on is the doctor's
  (inspector.analysis.Verdict); the checker is shown to reject a bogus name;
- Debian's promtool accepts alerts.yml (`check rules`), prometheus.yml (with
  its rule_files) and federation.yml (`check config`), and parses every
  dashboard expr (as recording rules, the Grafana variables replaced);
- `promtool test rules` on series made here: VqscopeQueueStalled fires
  after a minute of device_stalled and not for a healthy queue nor one
  stalled for 45 s; the other four alerts fire on their verdicts, counters
  and source_up; each firing alert's labels (severity) and annotations
  (summary, description rendered from $labels) are as alerts.yml says;
- the dashboard is JSON with a uid, schemaVersion, unique panel ids, the
  datasource, host, source and device template variables, and at least one
  target per panel, every panel on the ${datasource} variable.

Under CI a missing promtool fails (tests.conftest.require); Debian's
`prometheus` package (scripts/install-deps.sh) brings it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from inspector.analysis import Verdict
from inspector.exporter.metrics import EXPOSED_NAMES
from tests.conftest import ROOT, require

DASHBOARD = ROOT / "contrib" / "grafana" / "vqscope.json"
PROM_DIR = ROOT / "contrib" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
FEDERATION = PROM_DIR / "federation.yml"
#: The alerts README "Fleet" documents (the integration test waits for VqscopeQueueStalled).
ALERT_NAMES = {"VqscopeQueueStalled", "VqscopeNotificationMissing", "VqscopeRingBroken", "VqscopeBlkErrors",
               "VqscopeSourceDown"}

# A metric name beginning with vqscope_ (PromQL identifiers: letters, digits, _ and :; a
# trailing colon is prose's, "vqscope_queue_inflight: buffers ...").
_NAME = re.compile(r"(?<![A-Za-z0-9_:])vqscope_(?:[A-Za-z0-9_:]*[A-Za-z0-9_])?")
# verdict="x" or verdict=~"x|y" in a selector.
_VERDICT_MATCH = re.compile(r'verdict\s*=~?\s*"([^"]*)"')


def unknown_metrics(text: str) -> set[str]:
    """The vqscope_* names in ``text`` the exporter does not serve."""
    return {n for n in _NAME.findall(text) if n not in EXPOSED_NAMES}


def unknown_verdicts(text: str) -> set[str]:
    """The words matched on the verdict label in ``text`` that are not verdicts."""
    words = {w for m in _VERDICT_MATCH.findall(text) for w in m.split("|")}
    return words - {v.value for v in Verdict}


def strings(node: Any) -> Iterator[str]:
    """Every string value in a JSON document, recursively."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def panels(dash: dict) -> Iterator[dict]:
    """Every panel, also those nested in rows."""
    for p in dash.get("panels", []):
        yield p
        yield from panels(p)


def dashboard_queries(dash: dict) -> list[str]:
    """Every PromQL expression of the dashboard: the targets' exprs and the
    template variables' queries (label_values(SELECTOR, label): SELECTOR)."""
    out = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip(), re.S)
        assert m, f"variable {var['name']}: not label_values(SELECTOR, label): {q!r}"
        out.append(m.group(1))
    return out


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    require(shutil.which("promtool") is not None, "promtool is not installed (Debian prometheus; make deps)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _ok(cp: subprocess.CompletedProcess) -> None:
    assert cp.returncode == 0, f"{cp.args}: exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


# ---- names


def test_checker_rejects_unknown_names():
    """The name check is real: a bogus metric or verdict is caught, real ones pass."""
    assert unknown_metrics('rate(vqscope_queue_packet_total{source="a"}[5m])') == {"vqscope_queue_packet_total"}
    assert unknown_metrics("vqscope_queue_kicks") == {"vqscope_queue_kicks"}  # a counter without _total
    assert unknown_metrics('rate(vqscope_queue_packets_total[5m]) / vqscope_queue_size') == set()
    assert unknown_metrics("not_vqscope_queue_bogus") == set()  # only names that begin vqscope_
    assert unknown_verdicts('vqscope_queue_verdict{verdict=~"device_stalled|stalled"}') == {"stalled"}
    assert unknown_verdicts('vqscope_queue_verdict{verdict="io_error"}') == set()


def test_dashboard_names_only_exposed_metrics(dash):
    texts = list(strings(dash))
    named = {n for t in texts for n in _NAME.findall(t)}
    # what README "Fleet" says the dashboard shows
    assert named >= {"vqscope_queue_size", "vqscope_queue_inflight", "vqscope_queue_avail_idx",
                     "vqscope_queue_used_idx", "vqscope_queue_verdict", "vqscope_queue_packets_total", "vqscope_queue_bytes_total",
                     "vqscope_queue_kicks_total", "vqscope_queue_calls_total", "vqscope_queue_calls_suppressed_total",
                     "vqscope_source_up", "vqscope_source_reading_age_seconds"}, named
    assert {n for t in texts for n in unknown_metrics(t)} == set()
    assert {w for t in texts for w in unknown_verdicts(t)} == set()
    # the verdict timeline's value mappings name every verdict, and only verdicts
    timeline = [p for p in panels(dash) if p["type"] == "state-timeline"]
    assert timeline
    for p in timeline:
        texts = {o["text"] for m in p["fieldConfig"]["defaults"]["mappings"] for o in m["options"].values()}
        assert texts == {v.value for v in Verdict}


def test_rules_and_configs_name_only_exposed_metrics():
    for path in (ALERTS, PROM_CONFIG):
        text = path.read_text()
        assert unknown_metrics(text) == set(), path
        assert unknown_verdicts(text) == set(), path
    assert set(re.findall(r"^\s*- alert:\s*(\w+)\s*$", ALERTS.read_text(), re.M)) == ALERT_NAMES
    # federation pulls every exposed name
    match = re.search(r"""__name__=~"([^"]+)\"""", FEDERATION.read_text())
    assert match and all(re.fullmatch(match.group(1), n) for n in EXPOSED_NAMES)


# ---- the dashboard


def test_dashboard_shape(dash):
    assert dash["uid"] and isinstance(dash["uid"], str)
    assert dash["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert re.fullmatch(r"label_values\(vqscope_source_up(\{[^}]*\})?, source\)", variables["source"]["query"]["query"])
    assert {"host", "device"} <= set(variables)
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['id']} {p.get('title')!r} has no target"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


def test_dashboard_exprs_parse(dash, tmp_path):
    """promtool parses every dashboard query, the Grafana variables replaced
    ($__rate_interval by a range, $host, $source and $device by .*)."""
    exprs = dashboard_queries(dash)
    subst = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
             "$host": ".*", "$source": ".*", "$device": ".*"}
    rules = []
    for i, e in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        assert "$" not in e, f"an unknown variable in {e!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    f = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    f.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    cp = promtool("check", "rules", str(f))
    _ok(cp)
    assert f"{len(rules)} rules found" in cp.stdout


# ---- promtool: the rule and configuration files


def test_promtool_check_rules():
    cp = promtool("check", "rules", str(ALERTS))
    _ok(cp)
    assert f"{len(ALERT_NAMES)} rules found" in cp.stdout


@pytest.mark.parametrize("config", [PROM_CONFIG, FEDERATION], ids=lambda p: p.name)
def test_promtool_check_config(config, tmp_path):
    # from a copy beside a copy of alerts.yml: rule_files are relative to the config's folder
    for p in (config, ALERTS):
        shutil.copy(p, tmp_path / p.name)
    cp = promtool("check", "config", str(tmp_path / config.name), cwd=tmp_path)
    _ok(cp)
    if config == PROM_CONFIG:
        assert "1 rule files found" in cp.stdout and f"{len(ALERT_NAMES)} rules found" in cp.stdout
        assert "scrape_interval: 15s" in config.read_text()


# ---- promtool test rules

def alert_annotations() -> dict[str, dict[str, str]]:
    """Each alert's annotation templates, from alerts.yml as written there:
    ``summary: "..."`` on one line, ``description: >-`` folded over the
    more-indented lines below it (YAML folds them with single spaces)."""
    out: dict[str, dict[str, str]] = {}
    alert = None
    lines = ALERTS.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"\s*- alert:\s*(\w+)", line):
            alert = m.group(1)
            out[alert] = {}
        elif m := re.match(r'(\s*)(summary|description):\s*"(.*)"\s*$', line):
            out[alert][m.group(2)] = m.group(3)
        elif m := re.match(r"(\s*)(summary|description):\s*>-\s*$", line):
            indent, parts = len(m.group(1)), []
            while i + 1 < len(lines) and (len(lines[i + 1]) - len(lines[i + 1].lstrip())) > indent:
                i += 1
                parts.append(lines[i].strip())
            out[alert][m.group(2)] = " ".join(parts)
        i += 1
    return out


def render(template: str, labels: dict[str, str]) -> str:
    """A Prometheus annotation template that uses only ``{{ $labels.X }}``,
    rendered; a label the alert does not have is an error."""
    def sub(m: re.Match) -> str:
        assert m.group(1) in labels, f"annotation names $labels.{m.group(1)}, which the alert has not"
        return labels[m.group(1)]
    out = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", sub, template)
    assert "{{" not in out, f"a template this test cannot render: {template!r}"
    return out


SRC = "/run/vqscope/vm1.sock"


def _series(name: str, values: str, **labels: str) -> dict:
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
            "values": values}


def _queue(device: str, queue: str, **extra: str) -> dict[str, str]:
    return {"source": SRC, "device": device, "queue": queue, "layout": "split", **extra}


def _verdicts(device: str, queue: str, held: dict[str, str], samples: int = 21) -> list[dict]:
    """The verdict family of one queue: ``held`` gives the value strings of
    some verdicts, every other verdict is 0 throughout."""
    zeros = f"0x{samples - 1}"
    return [_series("vqscope_queue_verdict", held.get(v.value, zeros), **_queue(device, queue, verdict=v.value))
            for v in Verdict]


def test_promtool_test_rules(tmp_path):
    annotations = alert_annotations()
    assert set(annotations) == ALERT_NAMES
    for name, a in annotations.items():
        assert set(a) == {"summary", "description"}, name
    # one sample every 15 s, 21 samples: 0 s .. 5 m
    series = (
        # net0 q0: device_stalled throughout -> VqscopeQueueStalled after 1 m
        _verdicts("net0", "0", {"device_stalled": "1x20", "healthy": "0x20"})
        # net0 q1: healthy throughout -> nothing
        + _verdicts("net0", "1", {"healthy": "1x20"})
        # net0 q2: device_stalled for 45 s (0, 15, 30 s), then healthy -> nothing (for: 1m)
        + _verdicts("net0", "2", {"device_stalled": "1 1 1 0x17", "healthy": "0 0 0 1x17"})
        # net1 q0: kick_missing throughout -> VqscopeNotificationMissing after 1 m
        + _verdicts("net1", "0", {"kick_missing": "1x20"})
        # net1 q1: ring_broken from 30 s -> VqscopeRingBroken at once
        + _verdicts("net1", "1", {"ring_broken": "0 0 1x18", "healthy": "1 1 0x18"})
        # blk0 q0: healthy, 2 unsupported requests at 45 s -> VqscopeBlkErrors for 5 m
        + _verdicts("blk0", "0", {"healthy": "1x20"})
        + [_series("vqscope_queue_blk_bad_requests_total", "0 0 0 2x17", **_queue("blk0", "0", kind="unsupported"))]
        # blk0 q1: io_error verdict, its counters not growing in the window -> VqscopeBlkErrors
        + _verdicts("blk0", "1", {"io_error": "1x20"})
        + [_series("vqscope_queue_blk_bad_requests_total", "3x20", **_queue("blk0", "1", kind="io_error"))]
        # vm1 up, vm2 down -> VqscopeSourceDown for vm2 after 1 m
        + [_series("vqscope_source_up", "1x20", source=SRC), _series("vqscope_source_up", "0x20", source="vm2.qmp")]
    )

    def alert(name: str, severity: str, **labels: str) -> dict:
        return {"exp_labels": {"severity": severity, **labels},
                "exp_annotations": {k: render(v, labels) for k, v in annotations[name].items()}}

    stalled = alert("VqscopeQueueStalled", "critical", **_queue("net0", "0", verdict="device_stalled"))
    kick = alert("VqscopeNotificationMissing", "critical", **_queue("net1", "0", verdict="kick_missing"))
    broken = alert("VqscopeRingBroken", "critical", **_queue("net1", "1", verdict="ring_broken"))
    blk = [alert("VqscopeBlkErrors", "warning", **_queue("blk0", "0")),
           alert("VqscopeBlkErrors", "warning", **_queue("blk0", "1"))]
    down = alert("VqscopeSourceDown", "warning", source="vm2.qmp")
    cases = [
        # 45 s: the 1 m alerts are pending, not firing; ring_broken (for: 0m) and blk fire
        ("45s", "VqscopeQueueStalled", []),
        ("45s", "VqscopeNotificationMissing", []),
        ("45s", "VqscopeSourceDown", []),
        ("45s", "VqscopeRingBroken", [broken]),
        ("45s", "VqscopeBlkErrors", blk),
        ("15s", "VqscopeRingBroken", []),
        ("30s", "VqscopeBlkErrors", [blk[1]]),  # the counter has not grown yet; the verdict holds
        # 1 m 15 s: every alert fires, and only for its queue
        ("75s", "VqscopeQueueStalled", [stalled]),
        ("75s", "VqscopeNotificationMissing", [kick]),
        ("75s", "VqscopeRingBroken", [broken]),
        ("75s", "VqscopeBlkErrors", blk),
        ("75s", "VqscopeSourceDown", [down]),
        ("5m", "VqscopeQueueStalled", [stalled]),
    ]
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": series,
                   "alert_rule_test": [{"eval_time": t, "alertname": n, "exp_alerts": exp} for t, n, exp in cases]}],
    }
    f = tmp_path / "alerts_test.yml"  # JSON is YAML
    f.write_text(json.dumps(spec, indent=1))
    cp = promtool("test", "rules", str(f))
    _ok(cp)
    assert "SUCCESS" in cp.stdout

    # and the test is real: the same file with the healthy queue expected to fire fails
    spec["tests"][0]["alert_rule_test"].append(
        {"eval_time": "75s", "alertname": "VqscopeQueueStalled",
         "exp_alerts": [stalled, alert("VqscopeQueueStalled", "critical", **_queue("net0", "1", verdict="healthy"))]})
    f.write_text(json.dumps(spec, indent=1))
    cp = promtool("test", "rules", str(f))
    assert cp.returncode != 0, cp.stdout
