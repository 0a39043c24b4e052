"""The typed snapshot model (inspector.snapshot.model) and its JSON codec
(inspector.snapshot.codec): the README contract kept exactly, hostile JSON
refused with the member named, chains built only when asked for."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from inspector.errors import InspectorError, SnapshotFormatError
from inspector.ring import decoder
from inspector.ring.anomalies import Anomaly, AnomalyKind
from inspector.snapshot import (BackendFds, Chain, Descriptor, QueueEntry, Skipped, Snapshot, dumps,
                                from_json, loads, to_json)
from tests.support.ringbuilder import RingBuilder

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLES = [DATA / "snapshot_sample.json", DATA / "snapshot_sample_later.json"]

#: The README's queue members, in its order.
README_QUEUE = ["device", "index", "layout", "size", "features", "event_idx", "avail_idx", "used_idx",
                "last_avail_idx", "inflight", "avail_flags", "used_flags", "used_event", "avail_event",
                "kicks", "calls", "packets", "bytes", "chains", "anomalies"]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_files_round_trip_exactly(path):
    text = path.read_text()
    obj = json.loads(text)
    snap = from_json(obj)
    assert to_json(snap) == obj
    assert json.dumps(to_json(snap), indent=1, ensure_ascii=False) == json.dumps(obj, indent=1, ensure_ascii=False)
    assert [list(q) for q in to_json(snap)["queues"]] == [README_QUEUE] * len(obj["queues"])
    assert loads(dumps(snap)) == snap


def test_parsed_sample_is_typed():
    snap = from_json(json.loads(SAMPLES[0].read_text()))
    rx, tx = snap.queues
    assert (snap.source, snap.pid, snap.skipped, snap.extras) == ("backend:/tmp/vq.sock.introspect", None, None, {})
    assert (tx.device, tx.index, tx.id, tx.size, tx.inflight, tx.event_idx) == ("net0", 1, ("net0", 1), 256, 3, True)
    assert tx.n_chains == 3 and tx.chains[0] == Chain(12, (Descriptor(34153431040, 12, 1, 13),
                                                           Descriptor(34153504768, 1514, 0, 0)), 1526, 0)
    assert tx.anomalies[0].kind is AnomalyKind.NEXT_OUT_OF_RANGE and tx.anomalies[0].head is None
    assert tx.has_anomaly(AnomalyKind.NEXT_OUT_OF_RANGE) and not rx.has_anomaly(AnomalyKind.LOOP)
    assert snap.queue("net0", 1) is tx and snap.queue("net0", 2) is None


def test_per_source_members_round_trip_in_place():
    """pid, skipped, calls_suppressed, backend and any other member (QEMU's
    ``qemu``, vhost-net's ``device_state`` ...) come back where they were."""
    obj = json.loads(SAMPLES[0].read_text())
    obj = {"source": obj["source"], "time": obj["time"], "pid": 42, "queues": obj["queues"],
           "skipped": [{"device": "ctl", "index": 2, "reason": "not set up"},
                       {"device": "gone", "index": None, "reason": "unplugged"}], "later": [1]}
    q0, q1 = obj["queues"]
    obj["queues"][0] = {**{k: q0[k] for k in README_QUEUE[:16]}, "calls_suppressed": 7,
                        **{k: q0[k] for k in README_QUEUE[16:]}, "backend": {"kick_fd": 12, "call_fd": None}}
    q1["qemu"] = {"path": "/machine/peripheral/net0/virtio-backend", "vhost": False, "used_idx": 7418}
    q1["histograms"] = {"handle_tx": {"1024": 3}}
    snap = from_json(obj)
    assert snap.pid == 42 and snap.skipped == [Skipped("ctl", 2, "not set up"), Skipped("gone", None, "unplugged")]
    assert snap.extras == {"later": [1]}
    a, b = snap.queues
    assert a.calls_suppressed == 7 and a.backend == BackendFds(12, None) and a.extras == {}
    assert b.calls_suppressed is None and b.backend is None and list(b.extras) == ["qemu", "histograms"]
    out = to_json(snap)
    assert out == obj and list(out) == list(obj)
    assert [list(q) for q in out["queues"]] == [list(q) for q in obj["queues"]]


def _entry(**kw) -> QueueEntry:
    return QueueEntry(device="net0", index=1, size=16, features=1 << 29, event_idx=True, **kw)


def _ring() -> RingBuilder:
    rb = RingBuilder(16)
    rb.add_chain([(100, False), (200, True)])
    h = rb.add_chain([(10, False)])
    rb.add_indirect_chain([(16, False), (32, True)])
    rb.publish()
    rb.zero_len(h)
    return rb


def test_entry_from_ring_builds_no_chain_until_asked():
    ring = _ring().snapshot(decoder, 0)
    e = _entry(kicks=5, anomalies=[Anomaly(AnomalyKind.QUEUE_BROKEN, "stopped")]).fill_from_ring(ring)
    assert (e.avail_idx, e.used_idx, e.inflight, e.last_avail_idx) == (3, 0, 3, 0)
    assert (e.used_event, e.avail_event) == (ring.used_event, ring.avail_event)
    assert e.n_chains == 3 and ring._chains is None
    j = to_json(Snapshot("s", 1.0, [e]))["queues"][0]
    assert ring._chains is None                      # the JSON came from the columns
    assert j["chains"] == ring.chain_dicts() and j["kicks"] == 5
    assert j["anomalies"] == [{"kind": "queue_broken", "detail": "stopped"},
                              {"kind": "zero_len", "detail": ring.anomalies[0].detail}]
    assert e.anomalies[1].head == ring.anomalies[0].head is not None   # the head stays out of the JSON
    assert e.chains is ring.chains and [c.head for c in e.chains] == ring.chain_head.tolist()
    back = from_json(json.loads(json.dumps(to_json(Snapshot("s", 1.0, [e])))))
    assert to_json(back) == to_json(Snapshot("s", 1.0, [e])) and back.queues[0].chains == e.chains


def test_entry_without_event_idx_keeps_event_fields_null():
    e = QueueEntry(device="d", index=0, size=16, features=0, event_idx=False).fill_from_ring(
        _ring().snapshot(decoder))
    assert e.used_event is None and e.avail_event is None and e.last_avail_idx is None


def test_entries_compare_by_value_whatever_the_chain_source():
    ring = _ring().snapshot(decoder, 0)
    from_ring = _entry().fill_from_ring(ring)
    given = _entry(avail_idx=3, inflight=3, last_avail_idx=0, used_event=ring.used_event,
                   avail_event=ring.avail_event, chains=list(ring.chains),
                   anomalies=[a._replace(head=None) for a in ring.anomalies])
    assert to_json(Snapshot("s", 1.0, [given])) == to_json(Snapshot("s", 1.0, [from_ring]))
    assert given != from_ring                        # the anomalies' heads differ
    given.anomalies = list(ring.anomalies)
    assert given == from_ring
    given.chains = ring.chains[:2]
    assert given != from_ring and given.n_chains == 2


def test_no_chains():
    e = _entry()
    assert e.chains == [] and e.n_chains == 0
    assert to_json(Snapshot("s", 1.0, [e]))["queues"][0]["chains"] == []


def _sample() -> dict:
    return json.loads(SAMPLES[0].read_text())


def _bad(mutate, match: str):
    obj = _sample()
    mutate(obj)
    with pytest.raises(SnapshotFormatError, match=match) as e:
        from_json(obj)
    assert isinstance(e.value, InspectorError)


@pytest.mark.parametrize("mutate, match", [
    (lambda o: o.pop("queues"), r"the snapshot has no 'queues'"),
    (lambda o: o.update(time="now"), r"the snapshot\.time is 'now' \(str\), not a number"),
    (lambda o: o.update(pid=None), r"the snapshot\.pid is None"),
    (lambda o: o["queues"][1].update(avail_idx=True), r"queues\[1\]\.avail_idx is True \(bool\), not an int"),
    (lambda o: o["queues"][0].pop("used_idx"), r"queues\[0\] has no 'used_idx'"),
    (lambda o: o["queues"][0].update(event_idx=1), r"queues\[0\]\.event_idx is 1 \(int\), not true or false"),
    (lambda o: o["queues"][0].update(last_avail_idx="7"), r"last_avail_idx is '7' \(str\), not an int or null"),
    (lambda o: o["queues"][1]["anomalies"][0].update(kind="desc_loop"),
     r"queues\[1\]\.anomalies\[0\]\.kind is 'desc_loop' \(str\), not an anomaly kind"),
    (lambda o: o["queues"][1]["chains"][2].update(head=-1.5), r"queues\[1\]\.chains\[2\]\.head is -1\.5"),
    (lambda o: o["queues"][1]["chains"][1]["descs"][0].update(addr="0x1"),
     r"queues\[1\]\.chains\[1\]\.descs\[0\] is .*not an object of int addr, len, flags, next"),
    (lambda o: o["queues"][1]["chains"][1].update(extra=1), r"queues\[1\]\.chains\[1\] is .*not an object of head"),
    (lambda o: o["queues"][1]["chains"][1].update(descs={}), r"chains\[1\]\.descs is \{\} \(dict\), not a list"),
    (lambda o: o["queues"][0].update(backend=[3, 4]), r"queues\[0\]\.backend is \[3, 4\] \(list\), not an object"),
    (lambda o: o["queues"][0].update(calls_suppressed=None), r"calls_suppressed is None"),
    (lambda o: o.update(skipped=[{"device": "x", "index": 1}]), r"skipped\[0\] has no 'reason'"),
    (lambda o: o["queues"].append("net1"), r"queues\[2\] is 'net1' \(str\), not an object"),
])
def test_contract_breaches_are_named(mutate, match):
    _bad(mutate, match)


def test_not_json_and_not_an_object():
    with pytest.raises(SnapshotFormatError, match="does not parse"):
        loads("{")
    with pytest.raises(SnapshotFormatError, match="the snapshot is \\[\\] \\(list\\), not an object"):
        loads("[]")
    with pytest.raises(SnapshotFormatError, match="does not parse"):
        loads("[" * 100_000)


def test_from_json_shares_chain_dicts_but_builds_chains_once():
    obj = _sample()
    snap = from_json(obj)
    q = snap.queues[0]
    assert to_json(snap)["queues"][0]["chains"] is obj["queues"][0]["chains"]
    assert q.chains is q.chains and len(q.chains) == 2


def test_snapshot_equality_and_copy():
    a = from_json(_sample())
    b = from_json(copy.deepcopy(_sample()))
    assert a == b
    b.queues[0].kicks += 1
    assert a != b


def test_anomaly_kinds_are_members_not_strings_in_the_code():
    """Outside the codec (and the enum itself), code names a kind by its
    AnomalyKind member: no string token equal to a kind's value. The
    built-in front-end's names of the hostile rings it writes are its own
    vocabulary (some coincide), hence excepted."""
    import io
    import tokenize

    root = Path(__file__).resolve().parents[2]
    values = {k.value for k in AnomalyKind}
    allowed = {"inspector/ring/anomalies.py", "inspector/snapshot/codec.py", "inspector/vhost_user/net_driver.py"}
    found = []
    for path in sorted([*root.joinpath("inspector").rglob("*.py"), *root.joinpath("tui").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel in allowed:
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING and tok.string.strip("\"'") in values:
                found.append(f"{rel}:{tok.start[0]}: {tok.string}")
    assert found == []


# --- packed queues (README "Packed virtqueues") -----------------------------------

def _packed_json(**over) -> dict:
    q = {"device": "net0", "index": 1, "layout": "packed", "size": 256, "features": 1 << 34,
         "event_idx": True, "avail_idx": None, "used_idx": None, "last_avail_idx": 5, "inflight": 7,
         "avail_flags": None, "used_flags": None, "used_event": None, "avail_event": None,
         "next_avail": 10, "avail_wrap_counter": 1, "next_used": 3, "used_wrap_counter": 1,
         "last_avail_wrap_counter": 1, "driver_event_flags": 2, "driver_event_off": 9,
         "driver_event_wrap": 1, "device_event_flags": 0, "device_event_off": 0, "device_event_wrap": 1,
         "positions": "device", "kicks": 4, "calls": 2, "packets": 11, "bytes": 704,
         "chains": [{"head": 17, "slot": 5,
                     "descs": [{"addr": 0x1000, "len": 12, "flags": 0x81, "id": 0},
                               {"addr": 0x2000, "len": 64, "flags": 0x80, "id": 17}],
                     "out_bytes": 76, "in_bytes": 0}],
         "anomalies": []}
    q.update(over)
    return {"source": "test", "time": 1.5, "queues": [q]}


def test_packed_queue_round_trips_and_is_typed():
    obj = _packed_json()
    snap = from_json(copy.deepcopy(obj))
    q = snap.queues[0]
    assert q.packed and q.avail_idx is None and q.used_event is None
    assert (q.next_avail, q.avail_wrap_counter, q.next_used, q.used_wrap_counter) == (10, 1, 3, 1)
    assert (q.driver_event_flags, q.driver_event_off, q.positions) == (2, 9, "device")
    c = q.chains[0]
    assert c.head == 17 and c.slot == 5 and c.descs[1] == Descriptor(0x2000, 64, 0x80, 17)
    assert to_json(snap) == obj
    assert to_json(from_json(json.loads(dumps(snap)))) == obj
    # built from Chain tuples rather than parsed dicts, the JSON is the same
    rebuilt = QueueEntry(**{k: v for k, v in obj["queues"][0].items() if k not in ("chains", "anomalies")},
                         chains=list(q.chains))
    assert to_json(Snapshot("test", 1.5, [rebuilt])) == obj
    assert rebuilt == q


def test_split_queue_json_has_no_packed_members():
    q = QueueEntry(device="d", index=0, size=8, features=0, event_idx=False)
    out = to_json(Snapshot("s", 0.0, [q]))["queues"][0]
    assert "next_avail" not in out and "positions" not in out and q.next_avail is None


@pytest.mark.parametrize("mutate, match", [
    (lambda q: q.update(avail_idx=3), r"queues\[0\]\.avail_idx is 3 .*null"),
    (lambda q: q.pop("next_used"), r"queues\[0\] has no 'next_used'"),
    (lambda q: q.update(positions="guess"), r"queues\[0\]\.positions is 'guess'"),
    (lambda q: q.update(layout="ring"), r"queues\[0\]\.layout is 'ring'"),
    (lambda q: q["chains"][0].pop("slot"), r"queues\[0\]\.chains\[0\]"),
    (lambda q: q["chains"][0]["descs"][0].update(next=1), r"queues\[0\]\.chains\[0\]\.descs\[0\]"),
])
def test_packed_contract_breaches_are_named(mutate, match):
    obj = _packed_json()
    mutate(obj["queues"][0])
    with pytest.raises(SnapshotFormatError, match=match):
        from_json(obj)


def test_split_queue_with_a_packed_member_is_refused():
    q = QueueEntry(device="d", index=0, size=8, features=0, event_idx=False)
    obj = to_json(Snapshot("s", 0.0, [q]))
    obj["queues"][0]["next_avail"] = 1
    with pytest.raises(SnapshotFormatError, match="split and has the packed field 'next_avail'"):
        from_json(obj)


def test_packed_entry_nulls_split_fields_and_refuses_unknown_keywords():
    q = QueueEntry(device="d", index=0, size=8, features=0, event_idx=True, layout="packed", avail_idx=4,
                   next_avail=2)
    assert q.avail_idx is None and q.next_avail == 2
    with pytest.raises(TypeError, match="next_avial"):
        QueueEntry(device="d", index=0, size=8, features=0, event_idx=True, next_avial=1)
