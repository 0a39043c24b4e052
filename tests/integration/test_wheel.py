"""The wheel that ``pip install .`` builds installs a working vqscope.

One module fixture copies the checkout's files (git's tracked and untracked,
not ignored ones: no .venv, no in-place build of inspector/_vqd*.so), builds
the wheel from that copy, makes a new venv in a temporary directory and
installs the wheel there. The tests then check the wheel's contents and run
the commands a user would, from a temporary directory, with no PYTHONPATH
and nothing in the environment naming the checkout, checking each output.

How it stays reliable on a fresh machine:

- The wheel is built with ``pip wheel --no-deps --no-build-isolation`` by
  the interpreter running the tests (the project venv, to which `make venv`
  gives setuptools, wheel and cffi). Build isolation would download
  setuptools, wheel and cffi from the index on every run; here the build
  needs no network and compiles inspector/csrc with the same cffi as `make
  build`.
- The wheel's dependencies (cffi, rich, textual, qemu.qmp and theirs) are
  installed with ``--no-index`` from ``build/wheelhouse``, which `make venv`
  fills with ``pip download`` while it installs from the index anyway. Run
  without make (or with a wheelhouse that lacks something), the fixture
  fills it the same way first, which needs the index once.
- The venv is ``/usr/bin/python3 -m venv --system-site-packages`` (Debian's
  python3-venv), like `make venv`: BCC's binding (python3-bpfcc) comes from
  the system, for ``vqscope probe``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, require, wait_for

WHEELHOUSE = ROOT / "build" / "wheelhouse"
PACKAGES = ("inspector", "probes", "tui")
#: Subpackages that an old hand-written package list left out (every command
#: of a non-editable install then died with ModuleNotFoundError).
NAMED_PACKAGES = ("inspector", "inspector.ring", "inspector.memory", "inspector.datapath", "inspector.spec",
                  "inspector.snapshot", "inspector.introspect", "inspector.tools", "inspector.sources",
                  "inspector.sources.qemu", "inspector.record", "inspector.vhost_user", "inspector.devices",
                  "probes", "tui", "tui.screens", "tui.widgets")
#: Data files the package reads at run time or ships as its C source.
DATA_PATTERNS = ("probes/*.bpf.c", "probes/*.bpf.h", "tui/*.tcss", "inspector/csrc/*.c", "inspector/csrc/*.h")


def checkout_files() -> list[str]:
    """The checkout's files as git sees them: tracked, plus untracked ones
    that are not ignored (a new module not yet added must ship too)."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})


def copy_files(files: list[str], dest: Path) -> Path:
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


def check(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; a non-zero status fails the test with its output."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}: status {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def outside_env(venv: Path, cwd: Path) -> dict[str, str]:
    """The environment of a user of the installed package: no PYTHON*
    variable, no variable naming the checkout, the venv's bin first."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k != "VIRTUAL_ENV" and str(ROOT) not in v}
    env["PATH"] = f"{venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["PWD"] = str(cwd)
    return env


@dataclass
class Installed:
    files: list[str]  # the checkout's files the wheel was built from
    wheel: Path
    sdist: Path
    venv: Path
    cwd: Path  # where the commands run: outside the checkout
    env: dict[str, str]

    def python(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return check([self.venv / "bin" / "python", *args], timeout, cwd=self.cwd, env=self.env)

    def vqscope(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return check([self.venv / "bin" / "vqscope", *args], timeout, cwd=self.cwd, env=self.env)

    def popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen([str(self.venv / "bin" / "vqscope"), *map(str, args)], cwd=self.cwd, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    venv_ok = subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True).returncode == 0
    require(venv_ok, "/usr/bin/python3 with venv and ensurepip (Debian: python3-venv)")
    require(shutil.which("git") is not None and (ROOT / ".git").exists(), "a git checkout and git")
    tmp = tmp_path_factory.mktemp("wheel")
    files = checkout_files()
    build_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}

    sdist_src = copy_files(files, tmp / "sdist-src")
    check([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
           tmp / "sdist"], 120, cwd=sdist_src, env=build_env)
    (sdist,) = (tmp / "sdist").glob("vqscope-*.tar.gz")

    src = copy_files(files, tmp / "src")
    check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
          300, cwd=tmp, env=build_env)
    (wheel,) = (tmp / "dist").glob("vqscope-*.whl")

    venv, cwd = tmp / "venv", tmp / "run"
    cwd.mkdir()
    env = outside_env(venv, cwd)
    check(["/usr/bin/python3", "-m", "venv", "--system-site-packages", venv], 120, cwd=cwd, env=env)
    install = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEELHOUSE, wheel]
    first = subprocess.run([str(c) for c in install], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    if first.returncode != 0:  # no wheelhouse yet (pytest run without make), or one from older dependencies
        check([sys.executable, "-m", "pip", "download", "-q", "--no-build-isolation", "-d", WHEELHOUSE, src],
              300, cwd=tmp, env=build_env)
        check(install, 300, cwd=cwd, env=env)
    return Installed(files, wheel, sdist, venv, cwd, env)


# --- what was built ----------------------------------------------------------


def test_wheel_holds_every_module_and_data_file(installed):
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        metadata = z.read(f"{dist_info}/METADATA").decode()
    shipped = [f for f in installed.files if f.split("/")[0] in PACKAGES]
    assert [f for f in shipped if f not in names] == []
    for pkg in NAMED_PACKAGES:
        assert pkg.replace(".", "/") + "/__init__.py" in names
    for pattern in DATA_PATTERNS:
        assert fnmatch.filter(names, pattern), pattern
    assert [n for n in names if re.fullmatch(r"inspector/_vqd\.[\w.-]+\.so", n)], "the compiled C module"
    assert [n for n in names if n.split("/")[0] not in (*PACKAGES, dist_info)] == []
    assert [n for n in names if n.endswith((".o", ".pyc"))] == []
    assert re.search(r"^vqscope = inspector\.cli:main$", entry_points, re.M)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    assert [d for d in deps if d not in requires] == []


def test_sdist_holds_every_source(installed):
    with tarfile.open(installed.sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = [f for f in installed.files if f.split("/")[0] in PACKAGES] + ["pyproject.toml", "setup.py", "README.md"]
    assert [f for f in wanted if f not in names] == []


def test_the_installed_package_is_the_wheels(installed):
    out = installed.python("-c", textwrap.dedent("""
        import json, sys
        import inspector, inspector._cffi, inspector._vqd, probes, tui, tui.app
        print(json.dumps({"files": [m.__file__ for m in (inspector, inspector._vqd, probes, tui, tui.app)],
                          "path": sys.path}))
    """)).stdout
    got = json.loads(out)
    for f in got["files"]:
        assert Path(f).is_relative_to(installed.venv) and "site-packages" in Path(f).parts, f
    assert [p for p in got["path"] if p and Path(p).resolve().is_relative_to(ROOT)] == []
    assert (installed.venv / "bin" / "vqscope").read_text().startswith(f"#!{installed.venv}/bin/python")


# --- what it does, run from outside the checkout ------------------------------


def test_help_lists_every_command(installed):
    out = installed.vqscope("--help").stdout
    for command in ("layout", "serve", "snapshot", "tui", "demo", "load", "probe", "record", "export"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command


def test_layout_json(installed):
    lay = json.loads(installed.vqscope("layout", "--size", "256", "--json").stdout)
    # VIRTIO 1.2 §2.7: descriptor table 16N bytes, avail ring 6+2N after it,
    # used ring (6+8N) at the next multiple of the alignment (4096).
    n = 256
    used = -(-(16 * n + 6 + 2 * n) // 4096) * 4096
    assert lay["size"] == n and lay["align"] == 4096
    assert (lay["desc_offset"], lay["avail_offset"], lay["used_offset"]) == (0, 16 * n, used) == (0, 4096, 8192)
    assert lay["total_size"] == used + 6 + 8 * n
    assert lay["mismatch"] is False


def check_demo_snapshot(snap: dict) -> None:
    """The demo's loopback pair after some traffic: RX 0 and TX 1 of net1,
    frames sent and echoed, no anomaly."""
    assert snap["source"].startswith("vqscope serve ")
    rx, tx = sorted(snap["queues"], key=lambda q: q["index"])
    assert [(q["device"], q["index"], q["size"], q["event_idx"]) for q in (rx, tx)] == [
        ("net1", 0, 256, True), ("net1", 1, 256, True)]
    assert tx["kicks"] > 0 and tx["packets"] > 0 and tx["bytes"] > 0
    assert rx["packets"] > 0 and rx["calls"] > 0
    assert rx["anomalies"] == [] and tx["anomalies"] == []


def test_demo_headless_json(installed):
    check_demo_snapshot(json.loads(installed.vqscope("demo", "--headless", "--duration", "2", "--json").stdout))


def test_record_a_demo_and_export_it(installed):
    sock = installed.cwd / "demo.sock"
    demo = installed.popen("demo", "--headless", "--duration", "120", "--json", "--socket", sock)
    try:
        assert wait_for(lambda: Path(f"{sock}.introspect").exists() or demo.poll() is not None, timeout=60)
        assert demo.poll() is None, demo.communicate()
        rec = installed.vqscope("record", "-o", "run.vqs", "--connect", sock, "--duration", "2", timeout=60)
    finally:
        demo.send_signal(signal.SIGTERM)  # ends a headless demo like --duration: final snapshot, exit 0
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0, err
    check_demo_snapshot(json.loads(out))
    assert "duration reached" in rec.stderr

    db = sqlite3.connect(installed.cwd / "run.vqs")
    header = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM header")}
    assert (header["format"], header["source_kind"], header["has_events"]) == ("vqscope-recording", "backend", True)
    n_snapshots = db.execute("SELECT count(*) FROM snapshots").fetchone()[0]
    n_events = db.execute("SELECT sum(count) FROM event_blocks").fetchone()[0]
    n_messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    db.close()
    assert n_snapshots >= 5 and n_events > 0 and n_messages > 0

    installed.vqscope("export", "run.vqs", "--format", "chrome-trace", "-o", "run.json")
    trace = json.loads((installed.cwd / "run.json").read_text())["traceEvents"]
    events = [e for e in trace if e.get("cat") == "event"]
    assert len(events) == n_events
    assert {e["name"] for e in events} <= {"kick", "call", "call_suppressed"}
    assert {"kick", "call"} <= {e["name"] for e in events}
    assert len([e for e in trace if e.get("cat") == "vhost-user"]) == n_messages
    assert [e for e in trace if e.get("ph") == "C"], "counter tracks"
    assert "net1" in {e["args"]["name"] for e in trace if e.get("name") == "process_name"}

    lines = installed.vqscope("export", "run.vqs", "--format", "jsonl", "-o", "-").stdout.splitlines()
    types = [json.loads(line)["type"] for line in lines]
    assert (types.count("snapshot"), types.count("event"), types.count("message")) == (n_snapshots, n_events, n_messages)


def test_tui_loads_its_stylesheet_and_shows_the_queues(installed):
    sample = ROOT / "tests" / "data" / "snapshot_sample.json"
    shutil.copy(sample, installed.cwd / "snap.json")
    out = installed.python("-c", textwrap.dedent("""
        import asyncio, json, sys
        from inspector.sources.file import FileSource
        from tui.app import VqscopeApp
        from tui.widgets.queue_table import QueueTable

        async def main():
            app = VqscopeApp(FileSource("snap.json"), interval=0.1)
            async with app.run_test(size=(160, 50)) as pilot:
                for _ in range(500):
                    if app.screen.query(QueueTable) and app.screen.query_one(QueueTable).row_count:
                        break
                    await pilot.pause(0.02)
                print(json.dumps({"rows": app.screen.query_one(QueueTable).row_count,
                                  "css": [str(p) for p in app.css_path]}))

        asyncio.run(main())
    """)).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["rows"] == len(json.loads(sample.read_text())["queues"])
    assert len(got["css"]) == 1 and Path(got["css"][0]).is_relative_to(installed.venv)
    assert Path(got["css"][0]).name == "vqscope.tcss" and Path(got["css"][0]).is_file()


def test_probes_list_and_generated_c(installed):
    points = json.loads(installed.vqscope("probe", "--list", "--json").stdout)
    assert {p["probe"] for p in points} == {"vhost_net", "eventfd", "vhost_ioctl"}
    assert {p["status"] for p in points} <= {"attached", "unavailable"}
    assert all(p["reason"] for p in points if p["status"] == "unavailable")
    # The generated programs are the package's .bpf.c / .bpf.h files with a
    # #define prelude: each file's first line is in them.
    text = installed.vqscope("probe", "--ebpf").stdout
    for f in installed.files:
        if fnmatch.fnmatch(f, "probes/*.bpf.[ch]"):
            assert (ROOT / f).read_text().splitlines()[0] in text, f
