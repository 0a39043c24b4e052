"""The Source base class (inspector.sources.base): every source subclasses
it, its defaults are those of a source without events or messages, and the
recorder relies on them instead of probing for methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspector.errors import SourceError
from inspector.record import Recording
from inspector.record.recorder import Recorder, source_kind
from inspector.snapshot import Snapshot, from_json, to_json
from inspector.sources.backend import BackendSource
from inspector.sources.base import Source
from inspector.sources.file import FileSource
from inspector.sources.qemu import QemuSource
from inspector.sources.replay import ReplaySource
from inspector.sources.vhost_net import VhostNetSource

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "snapshot_sample.json"


@pytest.mark.parametrize("cls", [BackendSource, FileSource, QemuSource, ReplaySource, VhostNetSource])
def test_every_source_is_a_source(cls):
    assert issubclass(cls, Source)
    assert cls.snapshot is not Source.snapshot


def test_snapshot_is_abstract():
    class Half(Source):
        pass

    with pytest.raises(TypeError):
        Half()


class Fixed(Source):
    name = "fixed"

    def __init__(self):
        self.closed = 0

    def snapshot(self) -> Snapshot:
        return from_json(json.loads(SAMPLE.read_text()))

    def close(self) -> None:
        self.closed += 1


def test_defaults_and_context_manager():
    src = Fixed()
    assert (src.events(), src.events_lost(), src.new_messages()) == ([], 0, [])
    assert (src.has_events, src.has_messages) == (False, False)
    with src as s:
        assert s is src
    assert src.closed == 1


def test_recorder_uses_the_defaults(tmp_path):
    """A source with none of the optional methods of its own records
    snapshots only, and says so in the header."""
    src = Fixed()
    rec = Recorder(src, str(tmp_path / "f.vqs"), interval=0.001, duration=0.05, progress=None)
    assert rec.run() == 0
    with Recording(str(tmp_path / "f.vqs")) as r:
        assert (r.header["has_events"], r.header["has_messages"], r.header["source_kind"]) == (False, False, "fixed")
        assert r.header["source"] == "fixed"
        assert r.snapshot(0) == to_json(src.snapshot()) == json.loads(SAMPLE.read_text())
        assert list(r.events()) == [] and r.messages() == []
    assert source_kind(src) == "fixed"


def test_file_source_refuses_what_is_not_a_snapshot(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"source": "x", "time": 1.0}))
    with pytest.raises(SourceError, match="is not a vqscope snapshot: .*has no 'queues'"):
        FileSource(str(bad))
    bad.write_text("{")
    with pytest.raises(SourceError, match="does not parse"):
        FileSource(str(bad))
    with pytest.raises(SourceError, match="cannot read snapshot file"):
        FileSource(str(tmp_path / "missing.json"))
    with FileSource(str(SAMPLE)) as src:
        assert src.snapshot() is src.snapshot() and to_json(src.snapshot()) == json.loads(SAMPLE.read_text())
