"""The block-queue parts of the TUI and ``vqscope snapshot`` (VIRTIO 1.2
§5.2; README "Block queues in the inspector"): a virtio-blk back-end's
counters (a queue's ``extras["blk"]``: requests by type, statuses, bad
requests by kind, in flight, recent completions) as the queue screen's blk
panel and as ``vqscope snapshot``'s one line per block queue. The request
of one chain in words (:func:`tui.render.request_text`) stays with the
chain table's formatting in tui/render.py.
"""

from __future__ import annotations

from rich.text import Text

from inspector.snapshot.model import QueueEntry

from .render import ANOMALY_STYLE, request_text

#: How many of a blk queue's recent completions the queue screen lists.
BLK_RECENT_SHOWN = 8


def blk_stats(queue: QueueEntry | None) -> dict | None:
    """A block queue's back-end counters (``extras["blk"]``), or None."""
    if queue is None:
        return None
    blk = queue.extras.get("blk")
    return blk if isinstance(blk, dict) else None


def _int(v: object) -> int:
    return v if type(v) is int else 0


def counts_text(counts: object, highlight: str | None = None, skip_zero: bool = False) -> Text:
    """``{name: n}`` as ``in 10  out 5  flush 0``; non-zero counts in the
    ``highlight`` style; only non-zero ones with ``skip_zero`` ("none" when
    nothing is left)."""
    text = Text()
    if isinstance(counts, dict):
        for name, n in counts.items():
            n = _int(n)
            if skip_zero and not n:
                continue
            if text:
                text.append("  ")
            text.append(f"{name} {n}", style=highlight if highlight and n else "")
    return text if text else Text("none", style="dim")


def blk_rows(blk: dict, recent: int = BLK_RECENT_SHOWN) -> list[tuple[str, Text | str]]:
    """The blk panel of the queue screen as labeled rows: requests by type,
    statuses (IOERR/UNSUPP highlighted), bad requests by kind (non-zero
    ones highlighted), in flight, resubmitted, bytes, and the last
    ``recent`` completions with their status, oldest first."""
    status = blk.get("status")
    status_text = Text()
    if isinstance(status, dict):
        for name, n in status.items():
            if status_text:
                status_text.append("  ")
            status_text.append(f"{name} {_int(n)}", style=ANOMALY_STYLE if name != "ok" and _int(n) else "")
    rows: list[tuple[str, Text | str]] = [
        ("requests", counts_text(blk.get("requests"))),
        ("status", status_text or Text("none", style="dim")),
        ("bad", counts_text(blk.get("bad_requests"), highlight=ANOMALY_STYLE)),
        ("in flight", f"{_int(blk.get('in_flight'))} · resubmitted {_int(blk.get('resubmitted'))} · "
                      f"read {_int(blk.get('bytes_read'))} B · written {_int(blk.get('bytes_written'))} B"),
    ]
    done = blk.get("recent")
    done = [r for r in done if isinstance(r, dict)] if isinstance(done, list) else []
    for i, r in enumerate(done[-recent:]):
        line = Text(f"head {r.get('head')}: " + request_text(r.get("type"), r.get("sector"), r.get("data_len"),
                                                             r.get("status"), r.get("bad")),
                    style=ANOMALY_STYLE if r.get("bad") is not None else "")
        rows.append(("recent" if i == 0 else "", line))
    return rows


def blk_summary(queue: QueueEntry) -> Text | None:
    """One line about a block queue for ``vqscope snapshot``: its counters
    (non-zero request types and statuses, bad requests by kind, in flight)
    and its in-flight requests by type; None for a queue without either."""
    blk = blk_stats(queue)
    pending: dict[str, int] = {}
    malformed = 0
    for c in queue.chains if queue.n_chains and (blk is not None or queue.device_type == "block") else ():
        if c.request is None:
            continue
        if c.request.malformed is not None:
            malformed += 1
        else:
            pending[str(c.request.type)] = pending.get(str(c.request.type), 0) + 1
    if blk is None and not pending and not malformed:
        return None
    parts = []
    if blk is not None:
        parts.append(Text.assemble("requests ", counts_text(blk.get("requests"), skip_zero=True),
                                   " · status ", counts_text(blk.get("status"), skip_zero=True),
                                   " · bad ", counts_text(blk.get("bad_requests"), ANOMALY_STYLE, True),
                                   f" · in flight {_int(blk.get('in_flight'))}"))
    if pending or malformed:
        text = Text("pending " + "  ".join(f"{t} {n}" for t, n in pending.items()))
        if malformed:
            text.append(f"  malformed {malformed}", style=ANOMALY_STYLE)
        parts.append(text)
    return Text.assemble((f"{queue.device} q{queue.index}: ", "bold"), Text(" · ").join(parts))
