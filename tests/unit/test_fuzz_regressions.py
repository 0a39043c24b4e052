"""Inputs the fuzzers found, kept literally (fuzz/regressions/).

- ``decoder/*``: fuzz_decoder.c inputs, run through the harness (ASan,
  UBSan, its output checks) and through the Python wrapper, whose result
  must equal the pure-Python reference's (inspector.ring.decoder vs inspector.ring.reference).
- ``datapath/*``: fuzz_datapath.c inputs, run through the harness.
- ``messages/*.json``: vhost-user sessions of the message fuzzer
  (``{"what": ..., "session": [...]}``), replayed through a BackendConnection.

An input whose fix belongs to code another change owns is listed in XFAIL
with the finding; its test is ``xfail(strict=True)``, so the fix turns it
into a failure that asks for the mark to be removed.

Next to the findings, ``canary-*`` inputs are edge cases written on
purpose (fuzz/fuzz_inputs.py encoders): a ring at the top of the 64-bit
address space with buffers across 2**64, indirect tables overlapping
readable and validate-only memory with a loop, a mergeable-RX frame whose
header straddles descriptors, the full handshake with every valid request,
a 9-region memory table with 8 fds. They keep each directory non-empty and
the replay paths exercised.
"""

from __future__ import annotations

import json

import pytest

from fuzz import fuzz_inputs
from fuzz import fuzz_messages as fm
from inspector.ring import decoder, reference
from tests.conftest import ROOT
from tests.unit.test_fuzz_smoke import harnesses, run_harness  # noqa: F401 (fixture)

REGRESSIONS = ROOT / "fuzz" / "regressions"

#: file name -> why it is expected to fail (the finding, until fixed).
_OVERLAP = ("vqd_net.c deliver(): the loopback copies a TX buffer into an RX buffer with memcpy; "
            "a driver whose RX buffer overlaps its TX buffer makes the ranges overlap (undefined "
            "behaviour, ASan memcpy-param-overlap). Fix: memmove there.")
_INFLIGHT = ("vqd_vq_impl.h vqd_avail_count(): with inflight tracking it returns avail->idx - last_avail_idx "
             "plus the heads to resubmit without bounding the sum by the queue size, so a hostile inflight "
             "area (4 heads in flight) with avail->idx 10 ahead of used->idx on a ring of 8 makes "
             "vqd_vq_avail_count/set_notification report 10 > 8 available instead of breaking the queue. "
             "Fix: break the queue when n + vqd_inflight_pending(vq) > vq->num.")
XFAIL: dict[str, str] = {}  # all fixed: _OVERLAP (memmove) and _INFLIGHT (bounded), kept as regressions


def inputs(kind: str, pattern: str = "*"):
    paths = sorted(p for p in REGRESSIONS.joinpath(kind).glob(pattern) if p.is_file())
    return [pytest.param(p, id=p.name, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[p.name])]
                         if p.name in XFAIL else []) for p in paths]


def test_every_kind_has_inputs():
    for kind, pattern in (("decoder", "*"), ("datapath", "*"), ("messages", "*.json")):
        assert inputs(kind, pattern), f"fuzz/regressions/{kind} is empty"


@pytest.mark.parametrize("path", inputs("decoder"))
def test_decoder_input_through_the_harness(harnesses, path):  # noqa: F811
    r = run_harness(harnesses["decoder"], path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("path", inputs("decoder"))
def test_decoder_input_through_the_python_wrapper(path):
    case = fuzz_inputs.decoder_case(path.read_bytes())
    c, py = fuzz_inputs.outcome(decoder, case), fuzz_inputs.outcome(reference, case)
    assert c == py


@pytest.mark.parametrize("path", inputs("datapath"))
def test_datapath_input_through_the_harness(harnesses, path):  # noqa: F811
    r = run_harness(harnesses["datapath"], path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("path", inputs("messages", "*.json"))
def test_message_session_replays_clean(path):
    fm.replay(json.loads(path.read_text())["session"])
