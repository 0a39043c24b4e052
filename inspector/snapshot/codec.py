"""The Snapshot JSON (README.md, "Snapshot JSON"): the only place it is
built from, or parsed into, the typed model of :mod:`.model`.

JSON is made where a snapshot leaves the process — the introspection
server's reply, ``vqscope snapshot --json``, the recorder (and its
``--tee-jsonl``), export — and parsed where one comes in: the back-end,
file and replay sources.

- :func:`to_json` / :func:`dumps`: a :class:`~.model.Snapshot` as the JSON
  object (dicts, lists, ints, floats, strings, None). The chains of a queue
  decoded from a ring come straight from the decoder's columns
  (:meth:`~inspector.ring.snapshot.RingSnapshot.chain_dicts`), never through
  Chain tuples.
- :func:`from_json` / :func:`loads`: the JSON object as a Snapshot, every
  member checked (the peer or the file is not trusted): SnapshotFormatError
  names the first member that breaks the contract. Parsed chains are
  checked and kept as they came; Chain tuples are built only when
  :attr:`QueueEntry.chains <inspector.snapshot.model.QueueEntry.chains>` is
  read.

``to_json(from_json(obj)) == obj`` for every object that follows the
contract. An anomaly's ``head`` is not in the JSON: it is None after a
round trip.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from ..errors import SnapshotFormatError
from ..ring.anomalies import Anomaly, AnomalyKind
from ..ring.blk_request import request_from_dict
from ..ring.snapshot import Chain, Descriptor
from .model import (CORE_FIELDS, LAYOUTS, OPTIONAL_FIELDS, PACKED_FIELDS, SPLIT_ONLY_FIELDS, BackendFds, QueueEntry,
                    Skipped, Snapshot)

__all__ = ["to_json", "queue_to_json", "dumps", "from_json", "queue_from_json", "loads"]

_MISSING = object()


# ------------------------------------------------------------------ model -> JSON

def to_json(snap: Snapshot, chains: bool = True) -> dict[str, Any]:
    """The Snapshot JSON object of ``snap``: ``source``, ``time``, ``pid``
    (when not None), ``queues``, ``skipped`` (when not None), then
    ``snap.extras``. New dicts, except that the chains of a queue parsed
    from JSON are its (checked) input's: treat the result as read-only.
    ``chains`` False: every queue's ``chains`` is ``[]`` and the object
    says ``"chains_omitted": true`` (a reader that wants indices, counters
    and anomalies only: the exporter; the chains are most of the bytes)."""
    out: dict[str, Any] = {"source": snap.source, "time": snap.time}
    if snap.pid is not None:
        out["pid"] = snap.pid
    out["queues"] = [queue_to_json(q, chains) for q in snap.queues]
    if snap.skipped is not None:
        out["skipped"] = [{"device": s.device, "index": s.index, "reason": s.reason} for s in snap.skipped]
    out.update(snap.extras)
    if not chains:
        out["chains_omitted"] = True
    return out


def queue_to_json(q: QueueEntry, chains: bool = True) -> dict[str, Any]:
    """One queue entry: the core fields in README order (with the optional
    ``device_type``, ``shadow_avail_idx``, ``calls_suppressed`` and
    ``dropped`` after ``device``, ``last_avail_idx``, ``calls`` and
    ``bytes`` when not None), ``chains`` (``[]`` when not ``chains``),
    ``anomalies`` (``kind``, ``detail``), ``q.extras``, then ``backend``
    (when not None)."""
    out: dict[str, Any] = {"device": q.device}
    if q.device_type is not None:
        out["device_type"] = q.device_type
    out.update({
        "index": q.index, "layout": q.layout, "size": q.size,
        "features": q.features, "event_idx": q.event_idx,
        "avail_idx": q.avail_idx, "used_idx": q.used_idx, "last_avail_idx": q.last_avail_idx})
    if q.shadow_avail_idx is not None:
        out["shadow_avail_idx"] = q.shadow_avail_idx
    out.update({
        "inflight": q.inflight, "avail_flags": q.avail_flags, "used_flags": q.used_flags,
        "used_event": q.used_event, "avail_event": q.avail_event,
    })
    if q.layout == "packed":
        for f in PACKED_FIELDS:
            out[f] = getattr(q, f)
    out["kicks"] = q.kicks
    out["calls"] = q.calls
    if q.calls_suppressed is not None:
        out["calls_suppressed"] = q.calls_suppressed
    out["packets"] = q.packets
    out["bytes"] = q.bytes
    if q.dropped is not None:
        out["dropped"] = q.dropped
    out["chains"] = _chains_json(q) if chains else []
    out["anomalies"] = [{"kind": a.kind.value, "detail": a.detail} for a in q.anomalies]
    out.update(q.extras)
    if q.backend is not None:
        out["backend"] = {"kick_fd": q.backend.kick_fd, "call_fd": q.backend.call_fd}
    return out


def _chains_json(q: QueueEntry) -> list[dict[str, Any]]:
    """A queue's chain dicts: from a decoder's columns or the parsed JSON
    (their ``chain_dicts()``: no Chain tuple is built), else from Chain
    tuples. Split: ``head`` (the avail->ring entry), descriptors with
    ``next``; packed: ``head`` (the buffer id), ``slot`` (the ring slot of
    its first descriptor), descriptors with their ``id``; both: the
    virtio-blk ``request`` when the chain has one."""
    chain_dicts = getattr(q.chain_source, "chain_dicts", None)
    if chain_dicts is not None:
        return chain_dicts()
    if q.layout == "packed":
        out = [{"head": c.head, "slot": c.slot,
                "descs": [{"addr": d.addr, "len": d.len, "flags": d.flags, "id": d.next} for d in c.descs],
                "out_bytes": c.out_bytes, "in_bytes": c.in_bytes} for c in q.chains]
    else:
        out = [{"head": c.head,
                "descs": [{"addr": d.addr, "len": d.len, "flags": d.flags, "next": d.next} for d in c.descs],
                "out_bytes": c.out_bytes, "in_bytes": c.in_bytes} for c in q.chains]
    for d, c in zip(out, q.chains):
        if c.request is not None:
            d["request"] = c.request.as_dict()
    return out


def dumps(snap: Snapshot, **kw) -> str:
    """``json.dumps(to_json(snap), **kw)``."""
    return json.dumps(to_json(snap), **kw)


# ------------------------------------------------------------------ JSON -> model

class _JsonChains:
    """The chain source of a parsed queue: its checked chain dicts, turned
    into Chain tuples on first access (a packed descriptor's ``id`` in
    Descriptor's 4th field, the chain's ``slot`` in Chain's 5th, its
    ``request`` a BlkRequest)."""

    def __init__(self, dicts: list[dict], packed: bool):
        self.dicts = dicts
        self.packed = packed

    @property
    def n_chains(self) -> int:
        return len(self.dicts)

    def chain_dicts(self) -> list[dict]:
        return self.dicts

    @cached_property
    def chains(self) -> list[Chain]:
        key = "id" if self.packed else "next"
        return [Chain(c["head"], tuple(Descriptor(d["addr"], d["len"], d["flags"], d[key]) for d in c["descs"]),
                      c["out_bytes"], c["in_bytes"], c.get("slot"),
                      request_from_dict(c["request"]) if "request" in c else None)
                for c in self.dicts]


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_opt_int(v: Any) -> bool:
    return v is None or type(v) is int


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def _is_list(v: Any) -> bool:
    return type(v) is list


def _is_dict(v: Any) -> bool:
    return type(v) is dict


_WHAT = {_is_int: "an int", _is_opt_int: "an int or null", _is_str: "a string", _is_bool: "true or false",
         _is_number: "a number", _is_list: "a list", _is_dict: "an object"}

#: Type check of each core queue field.
_CORE_CHECK = {f: _is_int for f in CORE_FIELDS} | {
    "device": _is_str, "layout": _is_str, "event_idx": _is_bool,
    "last_avail_idx": _is_opt_int, "used_event": _is_opt_int, "avail_event": _is_opt_int}
_KNOWN_QUEUE = (frozenset(CORE_FIELDS) | frozenset(OPTIONAL_FIELDS) | frozenset(PACKED_FIELDS)
                | {"chains", "anomalies", "backend"})
_OPTIONAL_CHECK = {"device_type": _is_str, "shadow_avail_idx": _is_int, "calls_suppressed": _is_int,
                   "dropped": _is_int}
_POSITIONS = ("device", "derived", "flags")


def _is_positions(v: Any) -> bool:
    return v is None or v in _POSITIONS


def _is_null(v: Any) -> bool:
    return v is None


_WHAT[_is_positions] = f"one of {', '.join(_POSITIONS)} or null"
_WHAT[_is_null] = "null (a packed queue has no avail or used ring)"
#: Type check of each packed field (present exactly when layout is packed).
_PACKED_CHECK = {f: _is_opt_int for f in PACKED_FIELDS} | {"positions": _is_positions}
_KNOWN_TOP = frozenset({"source", "time", "pid", "queues", "skipped"})
_CHAIN_KEYS = {"head": None, "descs": None, "out_bytes": None, "in_bytes": None}.keys()
_DESC_KEYS = {"addr": None, "len": None, "flags": None, "next": None}.keys()
_PACKED_CHAIN_KEYS = {"head": None, "slot": None, "descs": None, "out_bytes": None, "in_bytes": None}.keys()
_PACKED_DESC_KEYS = {"addr": None, "len": None, "flags": None, "id": None}.keys()
_KINDS = {k.value: k for k in AnomalyKind}


def _bad(where: str, value: Any, what: str) -> SnapshotFormatError:
    v = repr(value)
    if len(v) > 60:
        v = v[:57] + "..."
    return SnapshotFormatError(f"snapshot JSON: {where} is {v} ({type(value).__name__}), not {what}")


def _get(d: dict, key: str, check, where: str) -> Any:
    v = d.get(key, _MISSING)
    if v is _MISSING:
        raise SnapshotFormatError(f"snapshot JSON: {where} has no {key!r}")
    if not check(v):
        raise _bad(f"{where}.{key}", v, _WHAT[check])
    return v


def _dict(v: Any, where: str) -> dict:
    if type(v) is not dict:
        raise _bad(where, v, "an object")
    return v


def from_json(obj: Any) -> Snapshot:
    """The Snapshot of a Snapshot JSON object (as ``json.loads`` gives it).
    Raises SnapshotFormatError naming the first member missing or of the
    wrong type, or an unknown anomaly kind. The result shares the chain
    dicts of ``obj``: do not modify ``obj`` afterwards."""
    obj = _dict(obj, "the snapshot")
    source = _get(obj, "source", _is_str, "the snapshot")
    t = _get(obj, "time", _is_number, "the snapshot")
    queues = [queue_from_json(q, f"queues[{i}]")
              for i, q in enumerate(_get(obj, "queues", _is_list, "the snapshot"))]
    pid = _get(obj, "pid", _is_int, "the snapshot") if "pid" in obj else None
    skipped = None
    if "skipped" in obj:
        skipped = []
        for i, s in enumerate(_get(obj, "skipped", _is_list, "the snapshot")):
            w = f"skipped[{i}]"
            _dict(s, w)
            skipped.append(Skipped(_get(s, "device", _is_str, w), _get(s, "index", _is_opt_int, w),
                                   _get(s, "reason", _is_str, w)))
    extras = {k: v for k, v in obj.items() if k not in _KNOWN_TOP}
    return Snapshot(source=source, time=t, queues=queues, pid=pid, skipped=skipped, extras=extras)


_INT_CORE = tuple(f for f in CORE_FIELDS if _CORE_CHECK[f] is _is_int)
_OPT_INT_CORE = tuple(f for f in CORE_FIELDS if _CORE_CHECK[f] is _is_opt_int)


def _split_core(q: dict) -> dict | None:
    """A split queue's core fields when every one is there with its type
    (the common case, checked in one pass); None otherwise."""
    try:
        core = {f: q[f] for f in CORE_FIELDS}
    except KeyError:
        return None
    if (all(type(core[f]) is int for f in _INT_CORE)
            and all(core[f] is None or type(core[f]) is int for f in _OPT_INT_CORE)
            and type(core["device"]) is str and type(core["event_idx"]) is bool):
        return core
    return None


def queue_from_json(q: Any, where: str = "queue") -> QueueEntry:
    """One queue entry of the Snapshot JSON (``where`` names it in errors)."""
    q = _dict(q, where)
    layout = q.get("layout")
    if layout not in LAYOUTS:
        raise _bad(f"{where}.layout", layout, f"one of {', '.join(LAYOUTS)}")
    packed = layout == "packed"
    if packed:
        core = {f: _get(q, f, _is_null if f in SPLIT_ONLY_FIELDS else _CORE_CHECK[f], where)
                for f in CORE_FIELDS}
        core.update((f, _get(q, f, _PACKED_CHECK[f], where)) for f in PACKED_FIELDS)
    else:
        core = _split_core(q)
        if core is None:   # something is missing or of the wrong type: say which
            core = {f: _get(q, f, _CORE_CHECK[f], where) for f in CORE_FIELDS}
        for f in PACKED_FIELDS:
            if f in q:
                raise SnapshotFormatError(f"snapshot JSON: {where} is split and has the packed field {f!r}")
    chains = _JsonChains(_check_chains(_get(q, "chains", _is_list, where), f"{where}.chains", packed), packed)
    anomalies = []
    for i, a in enumerate(_get(q, "anomalies", _is_list, where)):
        w = f"{where}.anomalies[{i}]"
        kind = _KINDS.get(_get(_dict(a, w), "kind", _is_str, w))
        if kind is None:
            raise _bad(f"{w}.kind", a["kind"], "an anomaly kind (inspector.ring.anomalies.AnomalyKind)")
        anomalies.append(Anomaly(kind, _get(a, "detail", _is_str, w)))
    optional = {f: _get(q, f, _OPTIONAL_CHECK[f], where) for f in OPTIONAL_FIELDS if f in q}
    backend = None
    if "backend" in q:
        b = _get(q, "backend", _is_dict, where)
        backend = BackendFds(_get(b, "kick_fd", _is_opt_int, f"{where}.backend"),
                             _get(b, "call_fd", _is_opt_int, f"{where}.backend"))
    extras = {k: v for k, v in q.items() if k not in _KNOWN_QUEUE}
    return QueueEntry(**core, **optional, chains=chains, anomalies=anomalies, backend=backend,
                      extras=extras)


def _check_chains(raw: list, where: str, packed: bool = False) -> list[dict]:
    """``raw`` (a list) if its items are chain dicts of exactly the
    contract's members, every value an int (``descs`` a list of descriptor
    dicts; packed: a ``slot`` per chain and an ``id`` per descriptor
    instead of ``next``; optionally a virtio-blk ``request``,
    :func:`inspector.ring.blk_request.request_from_dict`); else
    SnapshotFormatError naming the first bad member."""
    chain_keys, desc_keys = (_PACKED_CHAIN_KEYS, _PACKED_DESC_KEYS) if packed else (_CHAIN_KEYS, _DESC_KEYS)
    ints = ("head", "slot", "out_bytes", "in_bytes") if packed else ("head", "out_bytes", "in_bytes")
    last = "id" if packed else "next"
    for k, c in enumerate(raw):
        if type(c) is not dict or c.keys() != chain_keys:
            if type(c) is not dict or c.keys() - {"request"} != chain_keys or "request" not in c:
                raise _bad(f"{where}[{k}]", c, f"an object of {', '.join(chain_keys)}[, request]")
            try:
                request_from_dict(c["request"])
            except ValueError as e:
                raise SnapshotFormatError(f"snapshot JSON: {where}[{k}].request{e}") from None
        if not all(type(c[m]) is int for m in ints):
            bad = next(m for m in ints if type(c[m]) is not int)
            raise _bad(f"{where}[{k}].{bad}", c[bad], "an int")
        if type(c["descs"]) is not list:
            raise _bad(f"{where}[{k}].descs", c["descs"], "a list")
        for j, d in enumerate(c["descs"]):
            if type(d) is not dict or d.keys() != desc_keys or not (
                    type(d["addr"]) is int and type(d["len"]) is int and type(d["flags"]) is int
                    and type(d[last]) is int):
                raise _bad(f"{where}[{k}].descs[{j}]", d, f"an object of int addr, len, flags, {last}")
    return raw


def loads(text: str | bytes) -> Snapshot:
    """:func:`from_json` of a JSON text; SnapshotFormatError when it is not
    JSON either."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SnapshotFormatError(f"snapshot JSON does not parse: {e}") from None
    return from_json(obj)
