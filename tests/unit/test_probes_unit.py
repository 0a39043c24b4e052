"""Probe libraries without root or BCC: attach-point choice on kernels with
and without each function (fake kallsyms texts, the saved Debian 6.1 one),
the BTF reader on Debian 6.1's real vhost/vhost_net BTF (saved by booting
that kernel once under virtme-ng; checked against pahole), the C
generation, and the pure decoders of the eventfd and ioctl probes.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from probes import attach
from probes.attach import (CLONE_ARGS, NOT_FOUND, NOT_ROOT, NO_KPROBES, AttachPoint, KernelInfo,
                           choose_kprobe, clone_args_trusted, parse_format_offset, parse_kallsyms,
                           resolve_symbol)
from probes.base import ProbeError, define_prelude
from probes.btf import STRUCT, Btf, BtfError
from probes.eventfd import EventfdProbe, parse_fdinfo, process_eventfds
from probes.vhost_ioctl import (
    NUMBERS,
    IoctlRecord,
    VhostDevState,
    VhostIoctlProbe,
    apply_ioctl,
)
from probes.vhost_net import VQ_FIELDS, VhostNetProbe, arg_positions, btf_offsets

from tests.conftest import require

DATA = Path(__file__).resolve().parent.parent / "data" / "btf"
VER = "6.1.0-56-amd64"
KALLSYMS_61 = (DATA / f"kallsyms-{VER}.txt").read_text()
# The saved text is the vhost/eventfd lines of the guest's /proc/kallsyms;
# these two lines say what the rest of it said (kprobes, ring buffers).
KERNEL_LINES = "ffffffff8a000000 T register_kprobe\nffffffff8a000100 T bpf_ringbuf_output\n"


@pytest.fixture(scope="module")
def btf61():
    base_btf = Btf.load(DATA / f"vmlinux-{VER}.btf.xz")
    return {"vmlinux": base_btf,
            "vhost": Btf.load(DATA / f"vhost-{VER}.btf", base_btf),
            "vhost_net": Btf.load(DATA / f"vhost_net-{VER}.btf", base_btf)}


@pytest.fixture(scope="module")
def btf_dir(tmp_path_factory):
    """A /sys/kernel/btf look-alike with Debian 6.1's blobs."""
    d = tmp_path_factory.mktemp("btf")
    shutil.copy(DATA / f"vhost-{VER}.btf", d / "vhost")
    shutil.copy(DATA / f"vhost_net-{VER}.btf", d / "vhost_net")
    shutil.copy(DATA / f"vmlinux-{VER}.btf.xz", d / "vmlinux.xz")
    return str(d)


def kernel(text: str, btf_dir: str = "/nonexistent", root: bool = True, kprobes: bool = True) -> KernelInfo:
    return KernelInfo.from_texts((KERNEL_LINES if kprobes else "") + text, is_root=root, btf_dir=btf_dir)


# ------------------------------------------------------------------ kallsyms, clones

FAKE = """\
ffffffffc0001000 t handle_tx_kick\t[vhost_net]
ffffffffc0002000 t vhost_notify.constprop.0\t[vhost]
ffffffffc0003000 t vhost_signal.isra.0\t[vhost]
ffffffffc0004000 t vhost_exceeds_weight.part.0\t[vhost]
ffffffffc0004100 t vhost_exceeds_weight.cold\t[vhost]
ffffffffc0005000 T eventfd_signal
ffffffffc0006000 d some_data\t[vhost]
"""


def test_parse_kallsyms_keeps_code_only():
    syms = parse_kallsyms(FAKE)
    assert syms["handle_tx_kick"] == (0xffffffffc0001000, "vhost_net")
    assert syms["eventfd_signal"] == (0xffffffffc0005000, "")
    assert "some_data" not in syms                         # data, not code
    assert "vhost_exceeds_weight.cold" not in syms        # not an entry point


@pytest.mark.parametrize("name,want", [
    ("handle_tx_kick", ("handle_tx_kick", "")),
    ("vhost_notify", ("vhost_notify.constprop.0", ".constprop.0")),
    ("vhost_signal", ("vhost_signal.isra.0", ".isra.0")),
    ("vhost_exceeds_weight", ("vhost_exceeds_weight.part.0", ".part.0")),
    ("handle_rx_kick", (None, "")),
    ("vhost", (None, "")),                               # a prefix is not a clone
])
def test_resolve_symbol(name, want):
    assert resolve_symbol(name, parse_kallsyms(FAKE)) == want


def test_plain_symbol_preferred_over_clone():
    syms = parse_kallsyms("ffffffffc0000010 t vhost_signal.constprop.0\nffffffffc0000020 t vhost_signal\n")
    assert resolve_symbol("vhost_signal", syms) == ("vhost_signal", "")


@pytest.mark.parametrize("suffix,arg,ok", [
    ("", 3, True), (".constprop.0", None, True), (".constprop.0", 0, True), (".constprop.0", 1, False),
    (".isra.0", 0, False), (".part.0", 0, False), (".isra.0", None, True),
])
def test_clone_args_trusted(suffix, arg, ok):
    assert clone_args_trusted(suffix, arg) is ok


def test_choose_kprobe_reasons_in_order(btf_dir):
    k = kernel(FAKE, btf_dir)
    assert choose_kprobe("vhost_net", "kprobe", "handle_tx_kick", k, arg_index=0, btf_modules=["vhost"]).ok
    assert choose_kprobe("p", "kprobe", "handle_rx_kick", k).reason == NOT_FOUND
    ap = choose_kprobe("p", "kprobe", "vhost_notify", k, arg_index=1)
    assert ap.status == "unavailable" and ap.reason.startswith(CLONE_ARGS) and ap.target == "vhost_notify.constprop.0"
    assert choose_kprobe("p", "kretprobe", "vhost_notify", k).ok           # the return value is trustworthy
    assert choose_kprobe("p", "kprobe", "vhost_signal", k, arg_index=1).reason.startswith(CLONE_ARGS)
    nobtf = choose_kprobe("p", "kprobe", "handle_tx_kick", kernel(FAKE), btf_modules=["vhost"])
    assert nobtf.reason == "no BTF for module vhost (/nonexistent/vhost missing)"
    assert choose_kprobe("p", "kprobe", "handle_tx_kick", kernel(FAKE, btf_dir, root=False)).reason == NOT_ROOT
    assert choose_kprobe("p", "kprobe", "handle_tx_kick", kernel(FAKE, kprobes=False)).reason == NO_KPROBES


def test_kernel_facts_from_kallsyms():
    assert kernel("", kprobes=True).has_kprobes and kernel("", kprobes=True).has_ringbuf
    k = kernel(FAKE, kprobes=False)
    assert not k.has_kprobes and not k.has_ringbuf


# ------------------------------------------------------------------ vhost_net plan

def plan_of(probe) -> dict[tuple[str, str], AttachPoint]:
    return {(ap.kind, ap.wanted): ap for ap in probe.plan()}


def test_vhost_net_plan_on_debian_61(btf_dir):
    """Debian 6.1: vhost_notify exists only as vhost_notify.constprop.0,
    which dropped its unused dev argument: no entry probe (the vq is not
    where the source puts it), but the return probe; vhost_vq_work_queue is
    6.5+; eventfd_signal is left to eventfd_signal_mask."""
    p = VhostNetProbe(kernel=kernel(KALLSYMS_61, btf_dir))
    pl = plan_of(p)
    for fn in ("handle_tx_kick", "handle_rx_kick", "handle_tx", "handle_rx", "vhost_signal",
               "vhost_add_used_and_signal_n", "vhost_enable_notify", "vhost_disable_notify",
               "vhost_exceeds_weight", "vhost_poll_wakeup", "vhost_work_queue", "eventfd_signal_mask"):
        assert pl[("kprobe", fn)].ok, pl[("kprobe", fn)]
    n = pl[("kprobe", "vhost_notify")]
    assert (n.status, n.target) == ("unavailable", "vhost_notify.constprop.0") and CLONE_ARGS in n.reason
    assert pl[("kretprobe", "vhost_notify")].ok and pl[("kretprobe", "vhost_notify")].target == "vhost_notify.constprop.0"
    assert pl[("kprobe", "vhost_vq_work_queue")].reason == NOT_FOUND
    assert pl[("kprobe", "eventfd_signal")].status == "unavailable"


def test_vhost_net_plan_newer_kernel(btf_dir):
    """A 6.5+-like kernel: vhost_vq_work_queue instead of vhost_work_queue,
    vhost_notify not a clone, eventfd_signal an inline (only the _mask)."""
    text = KALLSYMS_61.replace("vhost_work_queue", "vhost_vq_work_queue").replace(
        "vhost_notify.constprop.0", "vhost_notify")
    text = "\n".join(line for line in text.splitlines() if not line.endswith(" eventfd_signal"))
    pl = plan_of(VhostNetProbe(kernel=kernel(text, btf_dir)))
    assert pl[("kprobe", "vhost_vq_work_queue")].ok
    assert pl[("kprobe", "vhost_work_queue")].reason == NOT_FOUND
    assert pl[("kprobe", "vhost_notify")].ok and pl[("kprobe", "vhost_notify")].target == "vhost_notify"
    assert pl[("kprobe", "eventfd_signal")].reason == NOT_FOUND


def test_vhost_net_plan_without_module_or_kprobes(btf_dir):
    no_mod = "\n".join(line for line in KALLSYMS_61.splitlines() if "[vhost" not in line)
    pl = plan_of(VhostNetProbe(kernel=kernel(no_mod, btf_dir)))
    assert pl[("kprobe", "handle_tx_kick")].reason == NOT_FOUND
    assert pl[("kprobe", "eventfd_signal_mask")].ok        # in vmlinux
    host = VhostNetProbe(kernel=kernel(KALLSYMS_61, btf_dir, kprobes=False))
    assert {ap.reason for ap in host.plan()} == {NO_KPROBES}
    nobtf = plan_of(VhostNetProbe(kernel=kernel(KALLSYMS_61, "/nonexistent")))
    assert nobtf[("kprobe", "handle_tx")].reason.startswith("no BTF for")
    assert nobtf[("kprobe", "eventfd_signal_mask")].ok     # reads no vhost struct
    norot = plan_of(VhostNetProbe(kernel=kernel(KALLSYMS_61, btf_dir, root=False)))
    assert norot[("kprobe", "handle_tx")].reason == NOT_ROOT


# ------------------------------------------------------------------ BTF

def pahole_offsets(text: str, struct_name: str) -> dict[str, tuple[int, int]]:
    """``{member: (offset, size)}`` of one struct in pahole's output."""
    m = re.search(r"^struct " + struct_name + r" \{\n(.*?)^\};", text, re.MULTILINE | re.DOTALL)
    assert m, f"struct {struct_name} not in pahole output"
    out = {}
    for line in m.group(1).splitlines():
        mm = re.search(r"\s\**(\w+)(?:\[\d+\])?;\s+/\*\s+(\d+)\s+(\d+)\s+\*/", line)
        if mm:
            out[mm.group(1)] = (int(mm.group(2)), int(mm.group(3)))
    return out


def test_split_btf_ids_and_strings_continue_the_base(btf61):
    base_btf, vhost = btf61["vmlinux"], btf61["vhost"]
    assert vhost.start_id == base_btf.start_id + len(base_btf)
    vq = vhost.find("vhost_virtqueue", STRUCT)
    assert vq.id >= vhost.start_id                         # defined in the module's part
    # "num" is a common name: its string lives in the base's section.
    assert vhost.field("vhost_virtqueue", "num").offset == 40


def test_vhost_virtqueue_offsets_equal_pahole_saved(btf61):
    """Our reader against pahole 1.24's reading of the same blobs (saved
    output: tests/data/btf/pahole-*.txt)."""
    pa = pahole_offsets((DATA / f"pahole-vhost-{VER}.txt").read_text(), "vhost_virtqueue")
    for f in VQ_FIELDS + ["poll", "handle_kick", "call_ctx"]:
        fld = btf61["vhost"].field("vhost_virtqueue", f)
        assert (fld.offset, fld.size) == pa[f], f
    pn = pahole_offsets((DATA / f"pahole-vhost_net-{VER}.txt").read_text(), "vhost_net")
    net = btf61["vhost_net"]
    assert net.field("vhost_net", "vqs").offset == pn["vqs"][0]
    assert net.field("vhost_net", "poll").offset == pn["poll"][0]
    assert net.struct_size("vhost_net") == 38288


def test_vhost_offsets_equal_pahole_live(btf61, tmp_path):
    """pahole reading the saved blobs now (a second, independent BTF reader)."""
    require(shutil.which("pahole") is not None, "pahole is not installed (Debian dwarves; make deps)")
    vml = tmp_path / "vmlinux"
    vml.write_bytes(lzma.decompress((DATA / f"vmlinux-{VER}.btf.xz").read_bytes()))
    for mod, structs in (("vhost", ["vhost_virtqueue", "vhost_poll", "vhost_dev", "vhost_work"]),
                         ("vhost_net", ["vhost_net", "vhost_net_virtqueue"])):
        for s in structs:
            out = subprocess.run(["pahole", "--btf_base", str(vml), "-C", s, str(DATA / f"{mod}-{VER}.btf")],
                                 capture_output=True, text=True, timeout=120).stdout
            pa = pahole_offsets(out, s)
            assert pa, out
            for member, (off, size) in pa.items():
                fld = btf61[mod].field(s, member)
                assert (fld.offset, fld.size) == (off, size), f"{s}.{member}"


def test_btf_offsets_defines(btf61):
    d = btf_offsets(btf61["vhost"], btf61["vhost_net"])
    assert d["VQ_LAST_AVAIL_IDX_OFF"] == 304 and d["VQ_LAST_AVAIL_IDX_SIZE"] == 2
    assert d["VQ_SIGNALLED_USED_VALID_OFF"] == 314 and d["VQ_SIGNALLED_USED_VALID_SIZE"] == 1
    assert d["VQ_POLL_OFF"] == 192 and d["POLL_WORK_FN_OFF"] == 64 + 8 and d["POLL_WAIT_OFF"] == 24
    # vhost_net.vqs[i].vq: vqs at 200, sizeof(struct vhost_net_virtqueue) 18920, vq first.
    assert (d["NET_VQ_RX_OFF"], d["NET_VQ_TX_OFF"]) == (200, 200 + 18920)
    assert d["NET_POLL_TX_WORK_OFF"] == 38040 + 104 + 64


def test_func_prototypes_give_argument_positions(btf61):
    v = btf61["vhost"]
    assert v.func_params("vhost_signal") == [("dev", "struct vhost_dev *"), ("vq", "struct vhost_virtqueue *")]
    args = arg_positions(v)
    assert args["vhost_exceeds_weight"]["vq"] == 0 and args["vhost_add_used_and_signal_n"]["count"] == 3
    with pytest.raises(BtfError, match="no func named 'vhost_notify'"):
        v.func_params("vhost_notify")                     # the clone has no BTF prototype


def test_btf_errors(btf61):
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0" * 32)
    blob = (DATA / f"vhost-{VER}.btf").read_bytes()
    with pytest.raises(BtfError, match="past the blob"):
        Btf(blob[:len(blob) // 2], btf61["vmlinux"])
    with pytest.raises(BtfError, match="parse it with its vmlinux base"):
        Btf(blob).field("vhost_virtqueue", "num")
    with pytest.raises(BtfError, match="no member 'nosuch'"):
        btf61["vhost"].field("vhost_virtqueue", "nosuch")


def test_host_kernel_btf_parses():
    require(Path("/sys/kernel/btf/vmlinux").exists(), "this kernel has no BTF (CONFIG_DEBUG_INFO_BTF)")
    k = Btf.load("/sys/kernel/btf/vmlinux")
    f = k.field("task_struct", "pid")
    assert f.size == 4 and 0 < f.offset < k.struct_size("task_struct")


# ------------------------------------------------------------------ C generation

def test_define_prelude():
    text = define_prelude({"B_TWO": 2, "A_ONE": True, "C_ADDR": "0xffffffffc0000000ULL", "D_NEG": -1})
    assert text.splitlines() == ["#define A_ONE 1", "#define B_TWO 2", "#define C_ADDR 0xffffffffc0000000ULL",
                                 "#define D_NEG -1"]
    with pytest.raises(ProbeError, match="bad #define name"):
        define_prelude({"lower": 1})


def test_vhost_net_c_has_btf_offsets_and_no_struct_copies(btf_dir):
    p = VhostNetProbe(pids=[1234], kernel=kernel(KALLSYMS_61, btf_dir))
    c = p.ebpf_text()
    assert "#define VQ_LAST_AVAIL_IDX_OFF 304\n" in c and "#define VQ_NUM_SIZE 4\n" in c
    assert "#define HAVE_KPROBE_VHOST_NOTIFY 0\n" in c and "#define HAVE_KRETPROBE_VHOST_NOTIFY 1\n" in c
    assert "#define FILTER_PIDS 1\n" in c and "#define HANDLE_TX_KICK_ADDR 0xffffffffc09d93f0ULL\n" in c
    assert "#define INNER_TX 1\n" in c
    assert "struct vhost_virtqueue {" not in c and "struct vhost_poll {" not in c
    # every #if HAVE_X in the source has its define in the prelude
    for name in set(re.findall(r"\bHAVE_[A-Z0-9_]+", c)):
        assert f"#define {name} " in c, name


def test_vhost_net_c_without_kprobes_compiles_to_nothing():
    p = VhostNetProbe(kernel=kernel(KALLSYMS_61, kprobes=False))
    c = p.ebpf_text()
    assert "#define HAVE_KPROBE_HANDLE_TX 0\n" in c and "#define VQ_NUM_OFF 0\n" in c


FORMAT = """name: sys_exit_read
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;
"""


def test_tracepoint_format_offsets():
    assert parse_format_offset(FORMAT, "ret") == 16
    assert parse_format_offset(FORMAT, "__syscall_nr") == 8
    assert parse_format_offset(FORMAT, "nosuch", 99) == 99


def test_eventfd_and_ioctl_c():
    k = kernel("", kprobes=False)
    c = EventfdProbe(stream=True, kernel=k).ebpf_text()
    assert "#define STREAM 1\n" in c and "#define KIND_KICK 1\n" in c and "#define HAVE_KPROBE_IRQFD_WAKEUP 0\n" in c
    c = VhostIoctlProbe(kernel=k).ebpf_text()
    assert f"#define VHOST_SET_MEM_TABLE {NUMBERS['VHOST_SET_MEM_TABLE']}\n" in c and "#define VHOST_VIRTIO 175\n" in c


# ------------------------------------------------------------------ eventfd, ioctl decoding

def test_parse_fdinfo():
    assert parse_fdinfo("pos:\t0\nflags:\t02\neventfd-count:               1f\neventfd-id: 42\n") == (42, 0x1f)
    assert parse_fdinfo("pos:\t0\nflags:\t02\n") == (None, None)


def test_process_eventfds_of_this_process():
    fd = os.eventfd(3)
    other = os.dup(fd)
    try:
        fds = process_eventfds(os.getpid())
        assert fds[fd].count == 3 and fds[fd].id == fds[other].id   # one eventfd, two fds
    finally:
        os.close(fd)
        os.close(other)
    with pytest.raises(ProbeError, match="cannot list the fds"):
        process_eventfds(2 ** 22 + 7)


def rec(name: str, data: bytes, ret: int = 0) -> IoctlRecord:
    return IoctlRecord(0, 100, 5, NUMBERS[name], name, ret, data)


def test_apply_ioctls_builds_the_device():
    d = VhostDevState(100, 5)
    apply_ioctl(d, rec("VHOST_SET_OWNER", b""))
    apply_ioctl(d, rec("VHOST_SET_FEATURES", struct.pack("<Q", 1 << 32 | 1 << 15)))
    apply_ioctl(d, rec("VHOST_SET_MEM_TABLE", struct.pack("<II", 2, 0) + struct.pack("<4Q", 0, 1 << 20, 0x7f00_0000_0000, 0)
                       + struct.pack("<4Q", 1 << 32, 1 << 21, 0x7f00_1000_0000, 0)))
    apply_ioctl(d, rec("VHOST_SET_VRING_NUM", struct.pack("<II", 1, 256)))
    apply_ioctl(d, rec("VHOST_SET_VRING_ADDR", struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x3000, 0x2000, 0)))
    apply_ioctl(d, rec("VHOST_SET_VRING_BASE", struct.pack("<II", 1, 7)))
    apply_ioctl(d, rec("VHOST_SET_VRING_KICK", struct.pack("<Ii", 1, 9)))
    apply_ioctl(d, rec("VHOST_SET_VRING_CALL", struct.pack("<Ii", 1, 10)))
    apply_ioctl(d, rec("VHOST_NET_SET_BACKEND", struct.pack("<Ii", 1, 11)))
    apply_ioctl(d, rec("VHOST_GET_VRING_BASE", struct.pack("<II", 1, 39)))
    apply_ioctl(d, rec("VHOST_SET_VRING_NUM", struct.pack("<II", 0, 512), ret=-22))
    assert d.owner_set and d.features == 1 << 32 | 1 << 15
    assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in d.mem_table] == [
        (0, 1 << 20, 0x7f00_0000_0000), (1 << 32, 1 << 21, 0x7f00_1000_0000)]
    v = d.vrings[1]
    assert (v.num, v.desc, v.avail, v.used, v.base, v.last_avail_idx) == (256, 0x1000, 0x2000, 0x3000, 7, 39)
    assert (v.kick_fd, v.call_fd, v.backend_fd) == (9, 10, 11)
    assert 0 not in d.vrings and d.errors == ["VHOST_SET_VRING_NUM failed: errno 22"]
    apply_ioctl(d, rec("VHOST_NET_SET_BACKEND", struct.pack("<Ii", 1, -1)))
    assert d.vrings[1].backend_fd is None                 # fd -1 detaches the backend


def test_mem_table_longer_than_read_is_reported():
    d = VhostDevState(1, 3)
    apply_ioctl(d, rec("VHOST_SET_MEM_TABLE", struct.pack("<II", 70, 0) + bytes(32)))
    assert len(d.mem_table) == 1 and "70 regions" in d.errors[0]


def test_print_points_under_80_columns(btf_dir, capsys):
    p = VhostNetProbe(kernel=kernel(KALLSYMS_61, btf_dir))
    attach.print_points(p.plan() + EventfdProbe(kernel=kernel("", root=False)).plan())
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) < 80
    assert "vhost_notify.constprop.0" in out and "not root" in out


def test_vhost_net_entry_does_not_decode_from_a_stale_last_avail(monkeypatch):
    """vhost's last_avail_idx comes from the probe's last handler run; the
    ring read after it may show the device further on (used_idx past it).
    The entry then decodes the ring's in-flight chains without it (null at
    the top, the probe's value in device_state), not the returned chain."""
    import ctypes

    from inspector.memory.process import ProcessMemory, RamRange
    from inspector.ring.remote import snapshot_remote_split
    from inspector.sources.vhost_net import VhostNetSource
    from probes.vhost_net import VhostVqState
    from tests.support.ringbuilder import RingBuilder

    rb = RingBuilder(8)
    heads = [rb.add_chain(((64, False),)) for _ in range(3)]
    rb.publish()
    rb.device_use([(heads[0], 0)])                 # used_idx 1, avail_idx 3
    asked = []

    ram = [RamRange(r.gpa, r.size, ctypes.addressof((ctypes.c_char * len(r.buf)).from_buffer(r.buf)))
           for r in rb.mem.regions]
    pm = ProcessMemory(os.getpid())       # the rings as another process's memory: this one's

    def read_ring(st, mem_table):
        asked.append(st.last_avail_idx)
        return snapshot_remote_split(pm, ram, 8, *rb.addrs, st.last_avail_idx)

    src = VhostNetSource.__new__(VhostNetSource)
    monkeypatch.setattr(src, "_read_ring", read_ring, raising=False)
    desc, avail, used = rb.addrs
    for last, want_top, want_heads in ((0, None, heads[1:]), (2, 2, heads[2:])):
        asked.clear()
        st = VhostVqState(vq=1, owner_pid=1, index=1, num=8, desc=desc, avail=avail, used=used,
                          last_avail_idx=last, avail_idx=3, last_used_idx=1, used_flags=0,
                          signalled_used=0, signalled_used_valid=False, notify_enabled=True,
                          time_ns=0)
        entry = src._entry("vhost-net:1:3", None, st, {}, {})
        assert entry.last_avail_idx == want_top and entry.extras["device_state"]["last_avail_idx"] == last
        # vhost's vq->avail_idx is what the device last read of avail->idx
        assert entry.shadow_avail_idx == 3 and entry.device_type == "net"
        assert [c.head for c in entry.chains] == want_heads
        assert asked == [last]                  # one read, whichever last_avail_idx it keeps
    pm.close()


def test_snapshot_eventfd_ids_maps_each_vring_fd_to_its_queue():
    from probes.base import ProbeError
    from probes.eventfd import parse_fdinfo, snapshot_eventfd_ids

    kick, call = os.eventfd(0), os.eventfd(0)
    r, w = os.pipe()
    try:
        ids = {fd: parse_fdinfo(open(f"/proc/self/fdinfo/{fd}").read())[0] for fd in (kick, call)}
        if None in ids.values():
            pytest.skip("this kernel gives no eventfd-id (before 5.16)")
        snap = {"pid": os.getpid(), "queues": [
            {"device": "net1", "index": 1, "backend": {"kick_fd": kick, "call_fd": call}},
            {"device": "net1", "index": 0, "backend": {"kick_fd": None, "call_fd": None}},
            {"device": "net1", "index": 2}]}
        assert snapshot_eventfd_ids(snap) == {ids[kick]: ("net1", 1, "kick"), ids[call]: ("net1", 1, "call")}
        with pytest.raises(ProbeError, match="no back-end pid"):
            snapshot_eventfd_ids({"queues": []})
        snap["queues"][1]["backend"]["call_fd"] = r
        with pytest.raises(ProbeError, match=f"fd {r} .*net1 queue 0 call.*no eventfd-id"):
            snapshot_eventfd_ids(snap)
    finally:
        for fd in (kick, call, r, w):
            os.close(fd)


def test_vhost_net_plan_follows_the_device_iotlb_on_debian_61(btf_dir):
    """Debian 6.1's vhost_iotlb module: the IOTLB's add (the _ctx variant,
    which vhost_iotlb_add_range calls: that one is left out), del and reset
    are probed; the walk's offsets come from the vhost BTF (HAVE_IOTLB_BTF);
    without kprobes none of it is attached."""
    pl = plan_of(VhostNetProbe(kernel=kernel(KALLSYMS_61, btf_dir)))
    for fn in ("vhost_iotlb_add_range_ctx", "vhost_iotlb_del_range", "vhost_iotlb_reset"):
        assert pl[("kprobe", fn)].ok, pl[("kprobe", fn)]
    plain = pl[("kprobe", "vhost_iotlb_add_range")]
    assert plain.status == "unavailable" and "vhost_iotlb_add_range_ctx is probed" in plain.reason
    # a kernel without the _ctx variant probes the plain one
    old = "\n".join(line for line in KALLSYMS_61.splitlines() if " vhost_iotlb_add_range_ctx" not in line)
    assert plan_of(VhostNetProbe(kernel=kernel(old, btf_dir)))[("kprobe", "vhost_iotlb_add_range")].ok
    c = VhostNetProbe(kernel=kernel(KALLSYMS_61, btf_dir)).ebpf_text()
    assert "#define HAVE_IOTLB_BTF 1\n" in c and "#define MAP_START_OFF 40\n" in c
    assert "#define HAVE_KPROBE_VHOST_IOTLB_ADD_RANGE_CTX 1\n" in c and "#define IOTLB_WALK_MAX 512\n" in c
    host = VhostNetProbe(kernel=kernel(KALLSYMS_61, btf_dir, kprobes=False)).ebpf_text()
    assert "#define HAVE_KPROBE_VHOST_IOTLB_DEL_RANGE 0\n" in host
