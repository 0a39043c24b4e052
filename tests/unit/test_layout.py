import json
import subprocess

import pytest

from inspector.errors import LayoutError
from inspector.layout import split_layout
from tests.conftest import ROOT, VQSCOPE


def test_pci_layout_256():
    lay = split_layout(256, 4096)
    assert lay.desc_offset == 0
    assert lay.avail_offset == 4096
    # avail: 6 + 2*256 = 518 bytes -> ends at 4614, aligned to 8192
    assert lay.used_offset == 8192
    assert lay.total_size == 8192 + 6 + 8 * 256
    assert not lay.mismatch


def test_align_4_seed_004():
    # QEMU's virtio_queue_update_rings omits used_event when aligning the used ring.
    # N=8: avail ends at 128 + 4 + 16 = 148 without used_event (aligned: 148),
    # at 150 with it (aligned to 4: 152).
    lay = split_layout(8, 4)
    assert lay.used_offset == 152
    assert lay.qemu_legacy_used_offset == 148
    assert lay.mismatch


@pytest.mark.parametrize("align", [1, 2, 4, 8, 16, 64, 4096])
@pytest.mark.parametrize("size", [1, 2, 4, 256, 1024, 32768])
def test_linux_vring_init_agrees(size, align):
    # Linux vring_init: used = ALIGN(&avail->ring[num] + sizeof(__virtio16), align)
    used = ((16 * size + 4 + 2 * size + 2) + align - 1) & ~(align - 1)
    lay = split_layout(size, align)
    assert lay.used_offset == used
    assert lay.mismatch == (lay.qemu_legacy_used_offset != used)
    # QEMU: used = ALIGN(&avail->ring[num], align) (no used_event)
    assert lay.qemu_legacy_used_offset == ((16 * size + 4 + 2 * size) + align - 1) & ~(align - 1)
    if align >= 8 and size >= 4:  # 18N + 4 is then 4 mod 8: both land on the same boundary
        assert not lay.mismatch


@pytest.mark.parametrize("size,align", [(0, 4), (3, 4), (65536, 4), (32769, 4), (256, 0), (256, 3), (256, -4)])
def test_rejects(size, align):
    with pytest.raises(LayoutError):
        split_layout(size, align)


def test_cli_json():
    out = subprocess.run(VQSCOPE + ["layout", "--size", "8", "--align", "4", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert set(d) == {"size", "align", "desc_offset", "avail_offset", "used_offset", "total_size",
                      "qemu_legacy_used_offset", "mismatch"}
    assert d["mismatch"] is True and d["used_offset"] == 152


@pytest.mark.parametrize("argv", [["--size", "3"], ["--size", "0"], ["--size", "65536"],
                                  ["--size", "256", "--align", "3"]])
def test_cli_rejects_with_status_2(argv):
    out = subprocess.run(VQSCOPE + ["layout", "--json"] + argv, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "power of two" in out.stderr
    assert "Traceback" not in out.stderr
