"""Encodings of the two packed columns of a recording (schema.py).

Snapshots (``snapshots.data``)
------------------------------
A snapshot is stored either whole (a *keyframe*: ``{"k": snapshot}``) or as
its changes from the previous one (a *delta*), as zlib-compressed JSON:

``{"t": {key: value}, "x": [key...], "o": [[device, index]...], "q": [[pos, qdelta]...]}``

- ``t``: top-level keys (``time``, ``source``, ``skipped`` ...) whose value
  changed or that are new; ``x``: top-level keys that disappeared. When
  either snapshot's ``queues`` is not a list it is an ordinary ``t`` key.
- ``o``: present only when the queues' identities ``(device, index)`` or
  their order changed: the new list of identities. A queue's base is the
  previous snapshot's queue with that identity (none: a new queue, stored
  whole); without ``o``, the queue at the same position.
- ``q``: per changed queue, at position ``pos`` of the new list:
  ``{"s": {field: value}, "x": [field...], "c": chains}``: fields that
  changed, fields that disappeared, and ``chains`` when it changed, either
  the whole list or ``{"drop": k, "keep": m, "add": [...]}`` meaning
  ``old[k:k+m] + add`` (a ring moves as a window: the device takes chains
  from the front, the driver adds at the back).

Decoding applies the same rules and gives a dict equal (``==``) to the
snapshot that was encoded. Decoded snapshots share unchanged queue dicts and
chain dicts with their predecessor: treat them as read-only.

Events (``event_blocks.data``)
------------------------------
The events of one (device, queue) from one interval, ``count`` = n of them,
as zlib of three columns, in the order the source gave them:
``time_ns`` (n int64 little-endian), kind ids (n bytes, ``event_kinds.id``),
``value`` (n int64). Both int64 columns are byte-shuffled (all first bytes,
then all second bytes ...), as HDF5/Blosc's shuffle filter does, so that
zlib sees long runs of the slowly changing high bytes: about 5 bytes per
event for a realistic kick/call stream.
"""

from __future__ import annotations

import json
import zlib
from array import array
from typing import Any

from ..errors import InspectorError

_ZLEVEL_SNAPSHOT = 6
_ZLEVEL_EVENTS = 1  # level 6 saves ~5 % bytes for ~4x the CPU on event columns
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


class CodecError(InspectorError):
    """A packed column that does not decode (a damaged or foreign file)."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def _qkey(q: Any) -> tuple:
    if isinstance(q, dict):
        return (q.get("device"), q.get("index"))
    return (None, None)


# ------------------------------------------------------------------ snapshots

def _diff_chains(old: list, new: list) -> list | dict | None:
    """None when equal; else a window op or the whole new list."""
    if old == new:
        return None
    if new and old:
        first = new[0]
        for k, c in enumerate(old):
            if c == first:
                m = 1
                limit = min(len(old) - k, len(new))
                while m < limit and old[k + m] == new[m]:
                    m += 1
                return {"drop": k, "keep": m, "add": new[m:]}
    return new


def _apply_chains(old: Any, op: list | dict) -> list:
    if isinstance(op, list):
        return op
    k, m = op["drop"], op["keep"]
    return old[k:k + m] + op["add"]


def _diff_members(old: dict, new: dict, out: dict, changed_key: str, special: str | None = None,
                  special_diff=None) -> None:
    """Into ``out``: ``changed_key`` -> the members of ``new`` that ``old``
    lacks or has with another type or value, ``"x"`` -> the members of
    ``old`` that ``new`` lacks (each only when not empty). Member
    ``special`` is left to ``special_diff(old, new)`` when both are lists."""
    changed = {}
    for k, v in new.items():
        if k == special and isinstance(v, list) and isinstance(old.get(k), list):
            special_diff(old[k], v)
        elif k not in old or type(old[k]) is not type(v) or old[k] != v:
            changed[k] = v
    if changed:
        out[changed_key] = changed
    gone = [k for k in old if k not in new]
    if gone:
        out["x"] = gone


def _diff_queue(base: dict, q: dict) -> dict:
    out: dict[str, Any] = {}

    def chains(old: list, new: list) -> None:
        c = _diff_chains(old, new)
        if c is not None:
            out["c"] = c

    _diff_members(base, q, out, "s", "chains", chains)
    return out


def encode_delta(prev: dict, cur: dict) -> dict:
    """The changes that turn snapshot ``prev`` into ``cur`` (module docstring)."""
    d: dict[str, Any] = {}
    pq, cq = prev.get("queues"), cur.get("queues")
    by_queue = isinstance(pq, list) and isinstance(cq, list)
    # "queues" (when a list on both sides) is diffed queue by queue below.
    _diff_members(prev, cur, d, "t", "queues" if by_queue else None, lambda old, new: None)
    if by_queue:
        pk = [_qkey(q) for q in pq]
        ck = [_qkey(q) for q in cq]
        if pk == ck:
            bases = pq
        else:
            d["o"] = [list(k) for k in ck]
            pmap = dict(zip(pk, pq))
            bases = [pmap.get(k) for k in ck]
        qd = []
        for pos, q in enumerate(cq):
            base = bases[pos]
            if not isinstance(base, dict) or not isinstance(q, dict):
                if base is not q:
                    qd.append([pos, {"w": q}])  # new queue (or not a dict): whole
                continue
            diff = _diff_queue(base, q)
            if diff:
                qd.append([pos, diff])
        if qd:
            d["q"] = qd
    return d


def apply_delta(prev: dict, d: dict) -> dict:
    """The snapshot that delta ``d`` makes of ``prev`` (a new dict; ``prev``
    is not modified)."""
    new = dict(prev)
    for k in d.get("x", ()):
        del new[k]
    if "t" in d:
        new.update(d["t"])
    if ("o" in d or "q" in d) and "queues" not in d.get("t", {}):
        pq = prev["queues"]
        if "o" in d:
            pmap = {_qkey(q): q for q in pq}
            queues = [pmap.get(tuple(k)) for k in d["o"]]
        else:
            queues = list(pq)
        for pos, qd in d.get("q", ()):
            if "w" in qd:
                queues[pos] = qd["w"]
                continue
            base = queues[pos]
            q = dict(base)
            for k in qd.get("x", ()):
                del q[k]
            if "s" in qd:
                q.update(qd["s"])
            if "c" in qd:
                q["chains"] = _apply_chains(base.get("chains"), qd["c"])
            queues[pos] = q
        new["queues"] = queues
    return new


def pack_snapshot(obj: dict) -> bytes:
    """zlib(JSON) of a keyframe ``{"k": snapshot}`` or a delta."""
    return zlib.compress(_dumps(obj), _ZLEVEL_SNAPSHOT)


#: Most bytes one stored snapshot or event block may decompress to (a
#: recording is input like any other: a small zlib bomb must not take the
#: reader's memory). A 64-queue snapshot is ~1 MB of JSON, an event block of
#: an interval's events at 10M events/s ~17 MB.
MAX_INFLATED = 256 << 20


def inflate(data: bytes, what: str, limit: int = MAX_INFLATED) -> bytes:
    """zlib-decompress ``data``; CodecError naming ``what`` when it is not
    zlib or would inflate beyond ``limit`` bytes."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(data, limit)
    except (zlib.error, TypeError) as e:
        raise CodecError(f"{what} does not decode: {e}") from e
    if d.unconsumed_tail:
        raise CodecError(f"{what} inflates beyond {limit} bytes")
    if not d.eof:
        raise CodecError(f"{what} does not decode: the zlib stream is incomplete")
    return raw


def unpack_snapshot(data: bytes) -> dict:
    raw = inflate(data, "snapshot data")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CodecError(f"snapshot data does not decode: {e}") from e
    except RecursionError:
        raise CodecError("snapshot data does not decode: JSON nested too deeply") from None


# ------------------------------------------------------------------ events

def _shuffle8(b: bytes) -> bytes:
    return b"".join([b[i::8] for i in range(8)])


def _unshuffle8(b: bytes, n: int) -> bytes:
    out = bytearray(8 * n)
    for i in range(8):
        out[i::8] = b[i * n:(i + 1) * n]
    return bytes(out)


def encode_events(times: tuple | list, kind_ids: bytes, values: tuple | list) -> bytes:
    """Pack one block: ``times`` (ns) and ``values`` (ints in int64 range),
    ``kind_ids`` one byte per event. Raises CodecError for a value outside
    int64."""
    try:
        tb = array("q", times).tobytes()
        vb = array("q", values).tobytes()
    except OverflowError as e:
        bad = next((v for v in (*times, *values) if not _I64_MIN <= v <= _I64_MAX), None)
        raise CodecError(f"event time or value {bad} does not fit in int64") from e
    return zlib.compress(_shuffle8(tb) + kind_ids + _shuffle8(vb), _ZLEVEL_EVENTS)


def decode_events(data: bytes, count: int) -> tuple[array, bytes, array]:
    """``(times, kind_ids, values)`` of a block of ``count`` events."""
    if not isinstance(count, int) or count < 0 or 17 * count > MAX_INFLATED:
        raise CodecError(f"event block count {count!r} is not a count of at most {MAX_INFLATED // 17}")
    raw = inflate(data, "event block", 17 * count + 1)
    n8 = 8 * count
    if len(raw) != 17 * count:
        raise CodecError(f"event block holds {len(raw)} bytes, expected {17 * count} for {count} events")
    times = array("q")
    times.frombytes(_unshuffle8(raw[:n8], count))
    values = array("q")
    values.frombytes(_unshuffle8(raw[n8 + count:], count))
    return times, raw[n8:n8 + count], values
