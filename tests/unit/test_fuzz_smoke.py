"""A short run of each fuzzer (``make fuzz`` runs them for long).

- The libFuzzer harnesses (fuzz/fuzz_decoder.c, fuzz/fuzz_datapath.c) are
  built with clang-14 (``make fuzz-build``) and run a few thousand inputs
  from the checked-in seed corpus: exit 0, no sanitizer report.
- Each harness reads its inputs as fuzz/fuzz_inputs.py does (the decoder's
  per-input summary equals the Python wrapper's result for the same input),
  and the seeds do what their names say (the data-path traffic seed moves
  packets, each hostile seed breaks the queue with its reason).
- The vhost-user message fuzzer runs under hypothesis and its seeded-random
  driver without a finding, and it does report the failures it looks for
  (an exception that is not an InspectorError, an fd left open by a rejected
  message, a hang).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import fuzz_inputs
from fuzz import fuzz_messages as fm
from inspector.ring import decoder
from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.vhost_user.protocol import Request
from tests.conftest import ROOT, require

CORPUS = ROOT / "fuzz" / "corpus"
CLANG = os.environ.get("CLANG", "clang-14")


@pytest.fixture(scope="module")
def harnesses():
    """Build the harnesses (make fuzz-build); their paths by name."""
    require(shutil.which(CLANG) is not None, f"{CLANG} is not installed (make deps installs clang-14)")
    rt = subprocess.run([CLANG, "-print-runtime-dir"], check=False, capture_output=True, text=True).stdout.strip()
    require(any(Path(rt).glob("libclang_rt.fuzzer-*.a")),
            f"no libFuzzer runtime in {rt} (make deps installs libclang-rt-14-dev)")
    r = subprocess.run(["make", "-s", "fuzz-build", f"CLANG={CLANG}"], check=False, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return {n: ROOT / "build" / "fuzz" / f"fuzz_{n}" for n in ("decoder", "decoder_packed", "datapath", "blk")}


def run_harness(binary, *args, env=None, timeout=120):
    return subprocess.run([str(binary), *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name", ["decoder", "decoder_packed", "datapath", "blk"])
@pytest.mark.timeout(180)
def test_harness_runs_clean_over_the_seed_corpus(harnesses, name, tmp_path):
    """20000 mutated inputs (or 15 s, whichever first) from the seeds: no
    crash, no sanitizer report, no broken invariant. A fixed seed, so that
    CI runs the same inputs every time (make fuzz explores)."""
    r = run_harness(harnesses[name], "-seed=1", "-runs=20000", "-max_total_time=15", "-print_final_stats=1",
                    f"-artifact_prefix={tmp_path}/", tmp_path, CORPUS / name)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = int(re.search(r"stat::number_of_executed_units: (\d+)", r.stderr).group(1))
    assert runs >= 1000, r.stderr[-1000:]
    assert not list(tmp_path.glob("crash-*"))


@pytest.mark.parametrize("name,read,line", [("decoder", fuzz_inputs.decoder_case, "vqd_snapshot"),
                                             ("decoder_packed", fuzz_inputs.packed_case, "vqd_snapshot_packed")])
def test_decoder_harness_reads_inputs_like_the_python_wrapper(harnesses, name, read, line):
    """FUZZ_PRINT's summary of each seed equals inspector.ring.decoder's result for
    the same input read by fuzz_inputs.decoder_case (packed_case), so a crash
    file replays through Python as the harness ran it."""
    seeds = sorted(CORPUS.joinpath(name).iterdir())
    r = run_harness(harnesses[name], *seeds, env={"FUZZ_PRINT": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = re.findall(rf"Running: (\S+)\n{line} (.*)", r.stderr)
    assert len(got) == len(seeds)
    for path, summary in got:
        snap, unread = read(Path(path).read_bytes()).run(decoder)
        want = (f"rc=0 chains={len(snap.chain_head)} descs={len(snap.desc_addr)} "
                f"anomalies={len(snap.anomalies)} want={len(unread)}")
        assert summary == want, path


def test_decoder_seeds_cover_each_anomaly_kind():
    kinds = set()
    for f in CORPUS.joinpath("decoder").iterdir():
        snap, _ = fuzz_inputs.decoder_case(f.read_bytes()).run(decoder)
        kinds |= {a.kind for a in snap.anomalies}
    assert kinds >= {"avail_idx_jump", "head_out_of_range", "next_out_of_range", "loop", "indirect_len",
                     "nested_indirect", "zero_len", "addr_out_of_range", "indirect_not_read"}


def test_packed_seeds_cover_each_packed_anomaly_kind():
    kinds = set()
    positions = set()
    for f in CORPUS.joinpath("decoder_packed").iterdir():
        snap, _ = fuzz_inputs.packed_case(f.read_bytes()).run(decoder)
        kinds |= {a.kind for a in snap.anomalies}
        positions.add(snap.positions)
    assert kinds >= {"id_out_of_range", "chain_too_long", "avail_used_pattern", "used_not_available",
                     "indirect_len", "nested_indirect", "indirect_with_next", "zero_len", "addr_out_of_range"}
    assert positions == {"device", "derived", "flags"}


def test_datapath_seeds_move_packets_and_break_where_hostile(harnesses):
    seeds = sorted(CORPUS.joinpath("datapath").iterdir())
    r = run_harness(harnesses["datapath"], *seeds, env={"FUZZ_PRINT": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    runs = dict(re.findall(r"Running: \S+/seed-(\S+)\nvq0 (.*)\n", r.stderr))
    assert len(runs) == len(seeds)
    for name in ("traffic", "traffic-event-idx-mrg-inflight", "indirect"):
        assert re.match(r"packets=3 used_idx=3 broken=0", runs[name]), runs[name]
    reasons = {"loop": "loops", "head_out_of_range": "holds head 99", "next_out_of_range": "next 50",
               "outside_memory": "outside guest memory", "avail_idx_jump": "entries ahead",
               "zero_len": "length 0", "indirect_bad_len": "length 24"}
    for name, reason in reasons.items():
        assert "broken=1" in runs[name] and reason in runs[name], (name, runs[name])
    # behind an IOTLB: traffic through 256-byte pieces; all missing: nothing moves or breaks;
    # RX buffers read-only: RX breaks on the refused write, TX goes on
    rx = dict(re.findall(r"Running: \S+/seed-(\S+)\nvq0 .*\nvq1 (.*)\n", r.stderr))
    assert re.match(r"packets=3 used_idx=3 broken=0", runs["iotlb-traffic"]), runs["iotlb-traffic"]
    assert re.match(r"packets=0 used_idx=0 broken=0", runs["iotlb-miss"]), runs["iotlb-miss"]
    assert re.match(r"packets=0 used_idx=0 broken=0", rx["iotlb-miss"]), rx["iotlb-miss"]
    assert re.match(r"packets=3 used_idx=3 broken=0", runs["iotlb-write-ro"]), runs["iotlb-write-ro"]
    assert "broken=1" in rx["iotlb-write-ro"] and "perm ro" in rx["iotlb-write-ro"], rx["iotlb-write-ro"]


# --- the message fuzzer ---------------------------------------------------------

@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_message_fuzzer_hypothesis(data):
    fm.Fuzzer().run(fm.gen_session(fm.HypothesisDraw(data)))


@pytest.mark.timeout(120)
def test_message_fuzzer_bulk():
    res = fm.bulk(300, seed=12345, findings_dir=None)
    assert res["findings"] == []
    assert res["generated"] >= 300 and res["rejected"] > 0 and res["accepted"] > 0


def test_message_fuzzer_full_handshake_is_accepted():
    """The valid prefix really is valid: every message accepted, two vrings
    started on the device."""
    fz = fm.Fuzzer()
    s = fm.Session(fz.logger, fz.catcher)
    try:
        for spec in fm.handshake(int(fm._DEVICE_FEATURES) | 1 << p.VHOST_USER_F_PROTOCOL_FEATURES, 0):
            assert s.send(spec), (spec, s.conn.broken_reason)
        assert sorted(s.conn.device.started) == [0, 1]
    finally:
        s.close()


def _leaked_fuzz_fds() -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if fm.MEMFD_NAME in os.readlink(f"/proc/self/fd/{name}"):
                out.append(int(name))
        except OSError:
            pass
    return out


def test_message_fuzzer_reports_a_non_inspector_exception(monkeypatch):
    def broken_set_features(self, features):
        raise ValueError("device bug")

    monkeypatch.setattr(fm.FuzzDevice, "set_features", broken_set_features)
    specs = [fm.msg(Request.SET_FEATURES, p.pack_u64(0))]
    with pytest.raises(fm.Finding, match="not an InspectorError"):
        fm.replay(specs)


def test_message_fuzzer_reports_fds_left_open_on_rejection(monkeypatch):
    monkeypatch.setattr(t.Message, "close_fds", lambda self: None)
    specs = [fm.msg(Request.SET_OWNER, fds=["memfd4k"])]  # SET_OWNER carries no fd
    try:
        with pytest.raises(fm.Finding, match="rejected message left 1 more fd"):
            fm.replay(specs)
    finally:
        for fd in _leaked_fuzz_fds():
            os.close(fd)


def test_message_fuzzer_reports_a_hang(monkeypatch):
    import time

    monkeypatch.setattr(fm, "HANG_S", 0.2)
    monkeypatch.setattr(fm.FuzzDevice, "set_features", lambda self, f: time.sleep(5))
    with pytest.raises(fm.Finding, match="took more than 0.2 s"):
        fm.replay([fm.msg(Request.SET_FEATURES, p.pack_u64(0))])


def test_message_sessions_round_trip_as_json():
    import random

    specs = fm.gen_session(fm.RandomDraw(random.Random(7)))
    back = fm.spec_from_json(fm.spec_to_json(specs))
    assert [(s.request, s.flags, s.size, s.payload, s.fds, s.hangup) for s in back] == \
           [(s.request, s.flags, s.size, s.payload, s.fds, s.hangup) for s in specs]
