"""The QEMU source on a guest behind a vIOMMU (issue 17, its QEMU part): a
q35 guest with ``-device intel-iommu`` booted with ``intel_iommu=on``, its
virtio-net-pci with ``iommu_platform=on`` on user networking, the guest
pinging through it. The driver maps its rings through the IOMMU, so QEMU
reports IOVAs for them: the snapshot says so per queue
(``iova_untranslated``) instead of reading them as guest-physical (which
gave ``ring_unmapped``, and the doctor ``ring_broken``), and takes the
indices from QEMU's own view; devices without VIRTIO_F_ACCESS_PLATFORM are
read as before."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, VQSCOPE
from tests.support.peers import Guest, require_guest, socket_dir, wait_path

pytestmark = pytest.mark.qemu

MAC = "52:54:00:12:34:61"

SCRIPT = f"""
IF=""
for d in /sys/class/net/*; do [ "$(cat $d/address)" = {MAC} ] && IF=${{d##*/}}; done
dmesg | grep -q "DMAR: IOMMU enabled" && echo VQS-DMAR
ip link set "$IF" up && ip addr add 10.0.2.15/24 dev "$IF"
ping -c 2 -W 2 10.0.2.2 > /dev/null && echo VQS-PING-OK
echo VQS-READY
while true; do ping -c 1 -W 1 10.0.2.2 > /dev/null; sleep 0.5; done &
read line
"""


@pytest.fixture(scope="module")
def guest():
    require_guest("reading QEMU's memory needs root")
    d = socket_dir()
    qmp, qmp_test = f"{d}/qmp.sock", f"{d}/qmpt.sock"
    with open(f"{d}/guest.sh", "w") as f:
        f.write(SCRIPT)
    extra = (f"-device intel-iommu,device-iotlb=on -netdev user,id=u0 "
             f"-device virtio-net-pci,netdev=u0,mac={MAC},id=inet,iommu_platform=on,ats=on,disable-legacy=on "
             f"-qmp unix:{qmp},server=on,wait=off -qmp unix:{qmp_test},server=on,wait=off")
    g = Guest(None, f"sh {d}/guest.sh", qemu_extra=extra, append="intel_iommu=on iommu=strict")
    try:
        out = g.expect(r"^VQS-READY", 240)
        wait_path(qmp, 10)
        yield g, qmp, qmp_test
    finally:
        try:
            g.proc.stdin.close()
        except OSError:
            pass
        g.close()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VQSCOPE, *args], cwd=str(ROOT), capture_output=True, text=True, timeout=120)


def test_rings_behind_the_viommu_are_said_to_be_iovas(guest):
    g, qmp, qmp_test = guest
    assert "VQS-DMAR" in g.output and "VQS-PING-OK" in g.output, g.tail()
    r = _run("snapshot", "--qmp", qmp, "--json")
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    inet = [q for q in snap["queues"] if q["device"] == "inet"]
    assert len(inet) >= 2, [q["device"] for q in snap["queues"]]
    for q in inet:
        kinds = [a["kind"] for a in q["anomalies"]]
        assert kinds == ["iova_untranslated"], q["anomalies"]
        detail = q["anomalies"][0]["detail"]
        assert "intel-iommu" in detail and f"desc {q['qemu']['desc']:#x}" in detail, detail
        assert q["chains"] == []
    # RX (queue 0) got the pings' replies: QEMU's own indices, not zeros
    rx = next(q for q in inet if q["index"] == 0)
    assert rx["used_idx"] > 0 and rx["avail_idx"] == rx["shadow_avail_idx"], rx
    # devices without VIRTIO_F_ACCESS_PLATFORM (virtme-ng's 9p, console) are read as guest-physical
    others = [q for q in snap["queues"] if q["device"] != "inet"]
    assert others and not any(a["kind"] == "iova_untranslated" for q in others for a in q["anomalies"])
    assert any(q["used_idx"] > 0 for q in others)


def test_doctor_does_not_call_the_iova_queues_broken(guest):
    g, qmp, qmp_test = guest
    r = _run("doctor", "--qmp", qmp, "--duration", "3", "--interval", "0.5", "--json")
    assert r.returncode in (0, 1), r.stderr
    verdicts = {(q["device"], q["index"]): q["verdict"] for q in json.loads(r.stdout)["queues"]}
    inet = {k: v for k, v in verdicts.items() if k[0] == "inet"}
    assert inet and "ring_broken" not in inet.values(), inet
