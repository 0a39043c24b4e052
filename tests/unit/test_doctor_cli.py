"""`vqscope doctor` as a command: exit statuses, text and JSON, on a real
back-end process driven by the built-in front-end and on snapshot files.
The faults made by real peers are in tests/integration/test_doctor.py."""

from __future__ import annotations

import json
import subprocess

from inspector.snapshot.codec import to_json
from inspector.snapshot.model import Anomaly, AnomalyKind, QueueEntry, Snapshot
from inspector.vhost_user.frontend import VhostUserFrontend
from tests.conftest import ROOT, VQSCOPE
from tests.unit.test_cli_e2e import FRAME, served  # noqa: F401  (fixture)


def doctor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(VQSCOPE + ["doctor", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def write_snapshot(path, queues) -> str:
    path.write_text(json.dumps(to_json(Snapshot(source="file", time=1.7e9, queues=queues))))
    return str(path)


def test_healthy_backend_exits_0_and_json_lists_every_queue(served):  # noqa: F811
    sock, _ = served
    with VhostUserFrontend(sock) as fe:
        fe.post_rx_buffers(0, 32)
        fe.send_frames(0, [FRAME] * 8)
        r = doctor("--connect", sock, "--duration", "1.5", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    verdicts = {(q["device"], q["index"]): q["verdict"] for q in out["queues"]}
    assert len(verdicts) == 2 and set(verdicts.values()) <= {"healthy", "idle"}, verdicts
    assert out["watched_s"] >= 1.5


def test_broken_queue_in_a_file_exits_1_with_the_evidence(tmp_path):
    broken = QueueEntry(device="net0", index=1, size=256, features=0, event_idx=False, device_type="net",
                        anomalies=[Anomaly(AnomalyKind.QUEUE_BROKEN, "descriptor loop at head 3")])
    fine = QueueEntry(device="net0", index=0, size=256, features=0, event_idx=False, device_type="net")
    r = doctor("--file", write_snapshot(tmp_path / "s.json", [fine, broken]), "--duration", "0.3")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("net0 q1 ring_broken since ") and "descriptor loop at head 3" in lines[0]
    assert lines[-1].startswith("1 problem: 2 queues of ")
    assert not any(line.startswith("net0 q0") for line in lines)


def test_could_not_look_exits_2(tmp_path):
    r = doctor("--connect", str(tmp_path / "missing.sock"), "--duration", "0.3")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("vqscope doctor: cannot connect")
    r = doctor("--file", write_snapshot(tmp_path / "e.json", []), "--duration", "0.3")
    assert r.returncode == 2 and "no queue to look at" in r.stderr
    r = doctor("--file", str(tmp_path / "e.json"), "--stall-after", "0")
    assert r.returncode == 2 and "--stall-after 0.0 is invalid" in r.stderr
