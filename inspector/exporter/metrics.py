"""The exporter's vocabulary: every metric ``vqscope exporter`` serves, its
type, labels and help, in one table (README "Fleet"; the Grafana dashboard
and the alert rules in contrib/ name only these, checked by
tests/unit/test_exporter_contrib.py).

Names follow the Prometheus conventions: the ``vqscope_`` prefix, base units
(seconds, bytes), counters end in ``_total`` (the name here is the family
name without it, as prometheus_client's CounterMetricFamily wants; the
exposition adds ``_total``). Labels are bounded: ``source`` (one per
configured or discovered source), ``device`` and ``queue`` (the snapshot's
queue id), ``layout`` (split, packed), and for the few families that say so
a closed vocabulary (``verdict``, ``kind``, ``request``, ``status``).

Per-queue values come from the snapshot (inspector.snapshot.model, the
VIRTIO 1.2 names), the verdicts from the doctor's Analyzer
(inspector.analysis).
"""

from __future__ import annotations

from typing import NamedTuple

#: The labels of every per-queue metric.
QUEUE_LABELS = ("source", "device", "queue", "layout")
#: The labels of every per-source metric.
SOURCE_LABELS = ("source",)


class Metric(NamedTuple):
    """One metric family: ``name`` (for a counter without ``_total``),
    ``type`` ("gauge" or "counter"), ``labels`` (in order), ``help``, and
    ``exposed``: the name its samples have in the text format (counters:
    ``_total``; made by :func:`metric`)."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    exposed: str


def metric(name: str, type_: str, labels: tuple[str, ...], help_: str) -> Metric:
    """A :class:`Metric` with its ``exposed`` name."""
    return Metric(name, type_, labels, help_, name + "_total" if type_ == "counter" else name)


def _q(name: str, type_: str, help_: str, extra: tuple[str, ...] = ()) -> Metric:
    return metric("vqscope_queue_" + name, type_, QUEUE_LABELS + extra, help_)


def _s(name: str, type_: str, help_: str, extra: tuple[str, ...] = ()) -> Metric:
    return metric("vqscope_source_" + name, type_, SOURCE_LABELS + extra, help_)


# ---- per queue: the ring (VIRTIO 1.2 §2.7 split, §2.8 packed)
QUEUE_SIZE = _q("size", "gauge", "Queue size: descriptors in the ring (§2.7, §2.8)")
AVAIL_IDX = _q("avail_idx", "gauge", "Split ring: avail->idx, the driver's next available ring slot, "
                                     "free-running mod 2^16 (§2.7.6)")
USED_IDX = _q("used_idx", "gauge", "Split ring: used->idx, the device's next used ring slot, free-running "
                                   "mod 2^16 (§2.7.8)")
LAST_AVAIL_IDX = _q("last_avail_idx", "gauge", "The device's next slot to read (split: mod 2^16; packed: the "
                                               "descriptor slot), where the source knows it")
NEXT_AVAIL = _q("next_avail", "gauge", "Packed ring: the driver's next descriptor slot (§2.8.1)")
NEXT_USED = _q("next_used", "gauge", "Packed ring: the device's next used descriptor slot (§2.8.1)")
AVAIL_WRAP_COUNTER = _q("avail_wrap_counter", "gauge", "Packed ring: the Driver Ring Wrap Counter, 0 or 1 (§2.8.1)")
USED_WRAP_COUNTER = _q("used_wrap_counter", "gauge", "Packed ring: the Device Ring Wrap Counter, 0 or 1 (§2.8.1)")
INFLIGHT = _q("inflight", "gauge", "Buffers the driver made available and the device has not used yet")
# ---- per queue: notifications and traffic (cumulative; 0 where the source cannot count)
KICKS = _q("kicks", "counter", "Driver notifications (kicks) the device received")
CALLS = _q("calls", "counter", "Used buffer notifications (calls, interrupts) the device sent")
CALLS_SUPPRESSED = _q("calls_suppressed", "counter", "Calls the device did not send because the driver "
                                                     "suppressed them (VIRTQ_AVAIL_F_NO_INTERRUPT, used_event)")
PACKETS = _q("packets", "counter", "Buffers (frames, requests) the device used")
BYTES = _q("bytes", "counter", "Bytes the device moved through the queue's buffers")
DROPPED = _q("dropped", "counter", "Frames the device had for a queue it fills and no buffer to put them in")
# ---- per queue: what the decoder and the doctor say
ANOMALIES = _q("anomalies", "gauge", "Anomalies the decoder or source reports in the latest snapshot, by kind",
               ("kind",))
VERDICT = _q("verdict", "gauge", "The doctor's verdict: 1 for the queue's current verdict, 0 for every other",
             ("verdict",))
VERDICT_SECONDS = _q("verdict_seconds", "gauge", "Seconds the current verdict has held")
# ---- per queue: a block device's requests (vqscope's blk back-end)
BLK_REQUESTS = _q("blk_requests", "counter", "virtio-blk requests the device completed, by type (§5.2.6)",
                  ("request",))
BLK_STATUS = _q("blk_status", "counter", "virtio-blk request statuses the device wrote, by status", ("status",))
BLK_BAD_REQUESTS = _q("blk_bad_requests", "counter", "Malformed virtio-blk requests, by kind", ("kind",))
BLK_INFLIGHT = _q("blk_inflight", "gauge", "virtio-blk requests submitted to the disk and not completed")
BLK_READ_BYTES = _q("blk_read_bytes", "counter", "Bytes read from the disk for the guest")
BLK_WRITTEN_BYTES = _q("blk_written_bytes", "counter", "Bytes written to the disk for the guest")
# ---- per queue: VIRTIO_F_ACCESS_PLATFORM, the connection's device IOTLB (serve, proxy)
IOTLB_ENTRIES = _q("iotlb_entries", "gauge", "IOVA translations in the connection's device IOTLB")
IOTLB_UPDATES = _q("iotlb_updates", "counter", "IOTLB UPDATEs from the front-end that added a translation")
IOTLB_INVALIDATIONS = _q("iotlb_invalidations", "counter", "IOTLB INVALIDATEs from the front-end that dropped "
                                                           "at least one translation")
IOTLB_MISSES = _q("iotlb_misses", "counter", "IOTLB misses the back-end sent the front-end (BACKEND_IOTLB_MSG)")
IOTLB_REJECTED = _q("iotlb_rejected", "counter", "IOTLB messages refused as malformed or hostile")
IOTLB_MISS_WAITING = _q("iotlb_miss_waiting_seconds", "gauge", "Seconds the queue has waited for the "
                                                               "translation of an IOTLB miss (absent: none)")

# ---- per source
SOURCE_UP = _s("up", "gauge", "1 when the last read of the source succeeded and is not stale, else 0")
SOURCE_AGE = _s("reading_age_seconds", "gauge", "Seconds since the reading being served was taken")
SOURCE_READS = _s("reads", "counter", "Reads of the source attempted")
SOURCE_READ_ERRORS = _s("read_errors", "counter", "Reads of the source that failed")
SOURCE_READ_DURATION = _s("read_duration_seconds", "gauge", "Seconds the last completed read took")
SOURCE_QUEUES = _s("queues", "gauge", "Queues in the reading being served")
SOURCE_EVENTS_LOST = _s("events_lost", "counter", "Kick/call events the source could not deliver")
SOURCE_INFO = _s("info", "gauge", "The source: its kind (backend, qemu, vhost-net) and name; always 1",
                 ("kind", "name"))
# ---- the exporter itself
BUILD_INFO = metric("vqscope_build_info", "gauge", ("version", "python"), "The exporter's build; always 1")
EXPORTER_SOURCES = metric("vqscope_exporter_sources", "gauge", (), "Sources the exporter watches")

#: Every metric, in exposition order.
METRICS: tuple[Metric, ...] = (
    QUEUE_SIZE, AVAIL_IDX, USED_IDX, LAST_AVAIL_IDX, NEXT_AVAIL, NEXT_USED, AVAIL_WRAP_COUNTER,
    USED_WRAP_COUNTER, INFLIGHT, KICKS, CALLS, CALLS_SUPPRESSED, PACKETS, BYTES, DROPPED, ANOMALIES, VERDICT,
    VERDICT_SECONDS, BLK_REQUESTS, BLK_STATUS, BLK_BAD_REQUESTS, BLK_INFLIGHT, BLK_READ_BYTES, BLK_WRITTEN_BYTES,
    IOTLB_ENTRIES, IOTLB_UPDATES, IOTLB_INVALIDATIONS, IOTLB_MISSES, IOTLB_REJECTED, IOTLB_MISS_WAITING,
    SOURCE_UP, SOURCE_AGE, SOURCE_READS, SOURCE_READ_ERRORS, SOURCE_READ_DURATION, SOURCE_QUEUES,
    SOURCE_EVENTS_LOST, SOURCE_INFO, BUILD_INFO, EXPORTER_SOURCES,
)

#: The names samples carry in /metrics (counters with ``_total``).
EXPOSED_NAMES: frozenset[str] = frozenset(m.exposed for m in METRICS)
