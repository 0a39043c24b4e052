"""vhost_net probe: the kernel's vhost-net handlers and, at every hit, the
device-private state of the ``struct vhost_virtqueue`` they work on
(drivers/vhost/vhost.c, drivers/vhost/net.c).

Per virtqueue (key: the vq's kernel address) the program keeps the
last-seen ``num``, ``desc``/``avail``/``used`` (user addresses in the
owner's mm), ``last_avail_idx``, ``avail_idx``, ``last_used_idx``,
``used_flags``, ``signalled_used``, ``signalled_used_valid``, the owner's
pid (the worker is named ``vhost-<owner pid>``), the vq's index in its
device and whether kicks were last enabled. Counters: ``kicks``
(vhost_poll_wakeup on a vq's kick poll), ``handler_runs``, ``used_added``
(vhost_add_used_and_signal_n's count), ``calls`` (eventfd_signal inside
vhost_signal or vhost_add_used_and_signal_n, into which it may be inlined), ``calls_suppressed`` (vhost_notify returned false, or
vhost_signal signalled nothing), ``weight_exceeded`` (vhost_exceeds_weight
returned true: VHOST_NET_WEIGHT / VHOST_NET_PKT_WEIGHT), ``signals``,
``notify_enables``, ``notify_disables``, ``works_queued``. Histograms:
``kick_to_handler_ns``, ``handler_run_ns``, ``used_to_call_ns``.

The device IOTLB (``vq->iotlb``, drivers/vhost/iotlb.c): every
``vhost_iotlb_add_range_ctx`` / ``vhost_iotlb_del_range`` /
``vhost_iotlb_reset`` of the traced processes, and once per IOTLB a bounded
walk of the maps it already holds, go to user space in order (a ring
buffer of their own, read whether or not ``stream`` is on) and are mirrored
per IOTLB (:class:`probes.iotlb.IotlbMirror`, :meth:`VhostNetProbe.iotlb`);
``VhostVqState.iotlb`` says which IOTLB a vring translates through (0: its
addresses are not IOVAs).

Every offset comes from the running kernel's BTF (``/sys/kernel/btf/vhost``
and ``vhost_net``, split on ``vmlinux``) through :mod:`probes.btf` and goes
to the program as ``#define``s; argument positions come from the functions'
BTF prototypes. Compiler clones (``vhost_notify.constprop.0`` on Debian 6.1,
which dropped the unused ``dev``) are attached only where the argument read
keeps its position (see ``base.clone_args_trusted``); their return probes
always.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from inspector.events import monotonic_to_realtime_ns

from .attach import AttachPoint, KernelInfo, choose_kprobe, no_btf_reason, resolve_symbol
from .base import Probe, ProbeError
from .btf import Btf, BtfError
from .iotlb import (OP_ADD, OP_DEL, OP_RESET, OP_SEEN, OP_WALK_TRUNCATED, IotlbMirror, IotlbOp)

# (function, kprobe reads the vq pointer from this source argument (None:
# reads no vq argument), add a kretprobe?)
FUNCTIONS: list[tuple[str, int | None, bool]] = [
    ("handle_tx_kick", 0, True),
    ("handle_rx_kick", 0, True),
    ("handle_tx_net", 0, True),
    ("handle_rx_net", 0, True),
    ("handle_tx", 0, True),
    ("handle_rx", 0, True),
    ("vhost_add_used_and_signal_n", 1, True),
    ("vhost_signal", 1, True),
    ("vhost_notify", 1, True),
    ("vhost_enable_notify", 1, False),
    ("vhost_disable_notify", 1, False),
    ("vhost_exceeds_weight", 0, True),
    ("vhost_poll_wakeup", 0, False),
    ("vhost_work_queue", 1, False),
    ("vhost_vq_work_queue", 1, False),
    ("eventfd_signal_mask", None, False),
    ("eventfd_signal", None, False),
    # the device IOTLB (drivers/vhost/iotlb.c, module vhost_iotlb): scalar arguments only
    ("vhost_iotlb_add_range_ctx", None, False),
    ("vhost_iotlb_add_range", None, False),
    ("vhost_iotlb_del_range", None, False),
    ("vhost_iotlb_reset", None, False),
]
IOTLB_FUNCTIONS = {"vhost_iotlb_add_range_ctx", "vhost_iotlb_add_range", "vhost_iotlb_del_range",
                   "vhost_iotlb_reset"}
#: Most maps the walk of one IOTLB reads (the kernel's default limit is 2048).
IOTLB_WALK_MAX = 512
IOTLB_RINGBUF_PAGES = 64
HANDLERS = {"handle_tx_kick", "handle_rx_kick", "handle_tx_net", "handle_rx_net", "handle_tx", "handle_rx"}
# Where upstream puts the vq (or count) when the kernel's BTF has no
# prototype for a function (static clones are often left out of BTF).
DEFAULT_ARGS = {"vhost_add_used_and_signal_n": {"vq": 1, "count": 3}, "vhost_signal": {"vq": 1},
                "vhost_notify": {"vq": 1}, "vhost_enable_notify": {"vq": 1}, "vhost_disable_notify": {"vq": 1},
                "vhost_exceeds_weight": {"vq": 0}}
BTF_MODULES = ("vhost", "vhost_net")

# struct vhost_virtqueue members read at each hit: name -> #define stem.
VQ_FIELDS = ["num", "desc", "avail", "used", "last_avail_idx", "avail_idx", "last_used_idx", "used_flags",
             "signalled_used", "signalled_used_valid", "acked_features", "dev"]
VHOST_NET_VQ_RX, VHOST_NET_VQ_TX = 0, 1  # drivers/vhost/net.c
MAX_VQS = 4


@dataclass(frozen=True)
class VhostVqState:
    """Last-seen state of one ``struct vhost_virtqueue`` (device-private:
    vhost's own indices). Addresses are user addresses in the owner's mm;
    ``time_ns`` is CLOCK_MONOTONIC of the hit; ``acked_features`` the
    vq's negotiated feature bits (VIRTIO_RING_F_EVENT_IDX among them); ``iotlb`` the kernel
    address of ``vq->iotlb`` (nonzero: the device IOTLB is on and ``desc``/``avail``/``used``
    are IOVAs, see :meth:`VhostNetProbe.iotlb`); ``index`` the vq's position in
    its device (-1 unknown); ``notify_enabled`` None until vhost enabled or
    disabled kicks."""

    vq: int
    owner_pid: int
    index: int
    num: int
    desc: int
    avail: int
    used: int
    last_avail_idx: int
    avail_idx: int
    last_used_idx: int
    used_flags: int
    signalled_used: int
    signalled_used_valid: bool
    notify_enabled: bool | None
    time_ns: int
    acked_features: int = 0
    iotlb: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def btf_offsets(vhost: Btf, vhost_net: Btf) -> dict[str, int]:
    """The ``#define``s of every offset the program uses, from the two
    modules' BTF. Raises BtfError naming a member the kernel lacks."""
    d: dict[str, int] = {}
    for f in VQ_FIELDS:
        fld = vhost.field("vhost_virtqueue", f)
        d[f"VQ_{f.upper()}_OFF"] = fld.offset
        d[f"VQ_{f.upper()}_SIZE"] = fld.size
    d["VQ_POLL_OFF"] = vhost.field("vhost_virtqueue", "poll").offset
    for name, path in (("POLL_WAIT", "wait"), ("POLL_WORK", "work"), ("POLL_WORK_FN", "work.fn"),
                       ("POLL_MASK", "mask")):
        fld = vhost.field("vhost_poll", path)
        d[f"{name}_OFF"] = fld.offset
        d[f"{name}_SIZE"] = fld.size
    fld = vhost.field("vhost_work", "fn")
    d["WORK_FN_OFF"], d["WORK_FN_SIZE"] = fld.offset, fld.size
    for name, path in (("DEV_VQS", "vqs"), ("DEV_NVQS", "nvqs")):
        fld = vhost.field("vhost_dev", path)
        d[f"{name}_OFF"], d[f"{name}_SIZE"] = fld.offset, fld.size
    d["NET_VQ_RX_OFF"] = vhost_net.field("vhost_net", f"vqs[{VHOST_NET_VQ_RX}].vq").offset
    d["NET_VQ_TX_OFF"] = vhost_net.field("vhost_net", f"vqs[{VHOST_NET_VQ_TX}].vq").offset
    d["NET_POLL_RX_WORK_OFF"] = vhost_net.field("vhost_net", f"poll[{VHOST_NET_VQ_RX}].work").offset
    d["NET_POLL_TX_WORK_OFF"] = vhost_net.field("vhost_net", f"poll[{VHOST_NET_VQ_TX}].work").offset
    return d


#: struct vhost_iotlb / vhost_iotlb_map members the walk reads: #define stem -> (struct, member).
IOTLB_FIELDS = {"VQ_IOTLB": ("vhost_virtqueue", "iotlb"), "IOTLB_LIST": ("vhost_iotlb", "list"),
                "IOTLB_LIMIT": ("vhost_iotlb", "limit"), "IOTLB_FLAGS": ("vhost_iotlb", "flags"),
                "MAP_LINK": ("vhost_iotlb_map", "link"), "MAP_START": ("vhost_iotlb_map", "start"),
                "MAP_LAST": ("vhost_iotlb_map", "last"), "MAP_ADDR": ("vhost_iotlb_map", "addr"),
                "MAP_PERM": ("vhost_iotlb_map", "perm")}


def iotlb_offsets(vhost: Btf | None) -> dict[str, int | bool]:
    """The IOTLB ``#define``s from the vhost module's BTF
    (``HAVE_IOTLB_BTF`` 1 and ``*_OFF``/``*_SIZE`` of IOTLB_FIELDS), or
    ``HAVE_IOTLB_BTF`` 0 with zeros when a struct or member is missing
    (kernels before struct vhost_iotlb: no walk, no vq->iotlb)."""
    d: dict[str, int | bool] = {}
    try:
        if vhost is None:
            raise BtfError("no BTF")
        for stem, (struct_name, member) in IOTLB_FIELDS.items():
            fld = vhost.field(struct_name, member)
            d[f"{stem}_OFF"], d[f"{stem}_SIZE"] = fld.offset, fld.size
        d["HAVE_IOTLB_BTF"] = True
    except BtfError:
        d = {f"{stem}_{k}": 0 for stem in IOTLB_FIELDS for k in ("OFF", "SIZE")}
        d["HAVE_IOTLB_BTF"] = False
    return d


def arg_positions(vhost: Btf | None) -> dict[str, dict[str, int]]:
    """Source positions of the arguments read (``{"vhost_signal": {"vq":
    1}}``), from BTF prototypes where present (a parameter of type
    ``struct vhost_virtqueue *`` is the vq; one named ``count`` the count),
    else upstream's (DEFAULT_ARGS)."""
    out = {k: dict(v) for k, v in DEFAULT_ARGS.items()}
    if vhost is None:
        return out
    for fn in DEFAULT_ARGS:
        try:
            params = vhost.func_params(fn)
        except BtfError:
            continue
        for i, (pname, ptype) in enumerate(params):
            if ptype == "struct vhost_virtqueue *":
                out[fn]["vq"] = i
            if pname == "count":
                out[fn]["count"] = i
    return out


class VhostNetProbe(Probe):
    """Attach to vhost-net's handlers (kprobes; the kernel needs
    CONFIG_KPROBES, the vhost/vhost_net modules loaded, and their BTF).

    ``btf_dir``: where the BTF blobs are (default the kernel's
    /sys/kernel/btf; a directory of saved blobs for tests).
    ``counters()`` / ``histograms()`` are keyed by the vq's kernel address.
    """

    name = "vhost_net"
    COUNTERS = ["kicks", "handler_runs", "used_added", "calls", "calls_suppressed", "weight_exceeded",
                "signals", "notify_enables", "notify_disables", "works_queued"]
    EVENT_KINDS = ["kick", "handler_start", "handler_end", "used_add", "call", "call_suppressed",
                   "notify_enable", "notify_disable", "weight_exceeded"]

    def __init__(self, pids: list[int] | None = None, stream: bool = False, kernel: KernelInfo | None = None,
                 **kw):
        super().__init__(pids, stream, kernel, **kw)
        self._btf: dict[str, Btf] | None = None
        self._btf_error: str = ""
        self._mirrors: dict[int, IotlbMirror] = {}

    # ---- pure ------------------------------------------------------------
    def btf(self) -> dict[str, Btf] | None:
        """The vmlinux/vhost/vhost_net BTF, parsed once (None when missing;
        the reason is in ``btf_error``)."""
        if self._btf is None and not self._btf_error:
            root = Path(self.kernel.btf_dir)
            try:
                base = Btf.load(_pick(root, "vmlinux"))
                self._btf = {"vmlinux": base}
                for m in BTF_MODULES:
                    p = _pick(root, m)
                    if p is None:
                        raise BtfError(no_btf_reason(m, str(root)))
                    self._btf[m] = Btf.load(p, base)
            except (BtfError, TypeError) as e:
                self._btf = None
                self._btf_error = str(e) if isinstance(e, BtfError) else no_btf_reason("vmlinux", str(root))
        return self._btf

    @property
    def btf_error(self) -> str:
        self.btf()
        return self._btf_error

    def plan(self) -> list[AttachPoint]:
        k = self.kernel
        btf = self.btf() if k.has_kprobes else None
        args = arg_positions(btf["vhost"] if btf else None)
        pts = []
        for fn, vq_arg, ret in FUNCTIONS:
            if fn in args:
                vq_arg = args[fn]["vq"]
            mods = BTF_MODULES if vq_arg is not None or fn in HANDLERS else ()
            ap = choose_kprobe(self.name, "kprobe", fn, k, arg_index=vq_arg, btf_modules=mods)
            if ap.ok and mods and btf is None:
                ap = AttachPoint(self.name, "kprobe", fn, ap.target, "unavailable", self.btf_error)
            pts.append(ap)
            if ret:
                rp = choose_kprobe(self.name, "kretprobe", fn, k, btf_modules=mods)
                if rp.ok and mods and btf is None:
                    rp = AttachPoint(self.name, "kretprobe", fn, rp.target, "unavailable", self.btf_error)
                pts.append(rp)
        return _dedupe_alternatives(pts)

    def defines(self) -> dict[str, int | str | bool]:
        btf = self.btf() if self.kernel.has_kprobes else None
        d: dict[str, int | str | bool] = {"MAX_VQS": MAX_VQS, "IOTLB_WALK_MAX": IOTLB_WALK_MAX,
                                          "IOTLB_RINGBUF_PAGES": IOTLB_RINGBUF_PAGES,
                                          "IOTLB_OP_ADD": OP_ADD, "IOTLB_OP_DEL": OP_DEL,
                                          "IOTLB_OP_SEEN": OP_SEEN, "IOTLB_OP_RESET": OP_RESET,
                                          "IOTLB_OP_WALK_TRUNCATED": OP_WALK_TRUNCATED}
        d.update(iotlb_offsets(btf["vhost"] if btf is not None else None))
        if btf is not None:
            d.update(btf_offsets(btf["vhost"], btf["vhost_net"]))
        else:
            # Nothing is attached without BTF (every HAVE_* is 0); the
            # program still compiles.
            d.update({k: 0 for k in btf_offsets_names()})
        for fn, names in arg_positions(btf["vhost"] if btf else None).items():
            for what, i in names.items():
                d[f"ARG_{what.upper()}_{fn.upper()}"] = i
        for fn in ("handle_tx_kick", "handle_rx_kick"):
            target, _ = resolve_symbol(fn, self.kernel.symbols)
            d[f"{fn.upper()}_ADDR"] = f"{self.kernel.address(target) if target else 0:#x}ULL"
        plan = {(ap.kind, ap.wanted): ap.ok for ap in self.plan()}
        d["INNER_TX"] = plan.get(("kprobe", "handle_tx"), False) and plan.get(("kretprobe", "handle_tx"), False)
        d["INNER_RX"] = plan.get(("kprobe", "handle_rx"), False) and plan.get(("kretprobe", "handle_rx"), False)
        return d

    def _attach_point(self, bpf, ap: AttachPoint) -> None:
        if ap.kind == "kretprobe" and ap.wanted in HANDLERS:
            bpf.attach_kretprobe(event=ap.target.encode(), fn_name=b"kretprobe_handler", maxactive=64)
            return
        if ap.kind == "kretprobe" and ap.wanted in ("vhost_signal", "vhost_add_used_and_signal_n"):
            bpf.attach_kretprobe(event=ap.target.encode(), fn_name=b"kretprobe_signal", maxactive=64)
            return
        super()._attach_point(bpf, ap)

    def _after_attach(self) -> None:
        if self._use_ringbuf:
            self.bpf[b"iotlb_ops"].open_ring_buffer(self._on_iotlb)
        else:
            self.bpf[b"iotlb_ops"].open_perf_buffer(self._on_iotlb, page_cnt=IOTLB_RINGBUF_PAGES,
                                                   lost_cb=self._on_iotlb_lost)
        self._iotlb_lost_perf = 0

    def _on_iotlb_lost(self, n: int) -> None:
        self._iotlb_lost_perf += n

    def _on_iotlb(self, ctx, data, size) -> None:
        r = ctypes.cast(data, ctypes.POINTER(_IotlbRec)).contents
        op = IotlbOp(r.op, r.iotlb, r.start, r.last, r.addr, r.perm, r.limit, r.flags,
                     monotonic_to_realtime_ns(r.ts))
        with self._lock:
            self._mirrors.setdefault(op.iotlb, IotlbMirror()).apply(op)
            if len(self._mirrors) > 4 * 1024:      # bounded: forget the oldest IOTLB
                del self._mirrors[next(iter(self._mirrors))]

    def _poll_iotlb(self) -> None:
        bpf = self._need()
        if self._use_ringbuf:
            bpf.ring_buffer_consume()
        else:
            bpf.perf_buffer_poll(0)

    def iotlb(self, address: int) -> IotlbMirror | None:
        """The mirror of the device IOTLB at kernel ``address`` (a
        ``VhostVqState.iotlb``), None when the probes saw nothing of it;
        drains the IOTLB records first. The mirror is the probe's: read,
        do not change it."""
        self._poll_iotlb()
        with self._lock:
            return self._mirrors.get(address)

    def iotlb_lost(self) -> int:
        """IOTLB records the kernel could not deliver (the mirrors may then
        be wrong), cumulative since attach()."""
        bpf = self._need()
        n = getattr(self, "_iotlb_lost_perf", 0)
        for v in bpf[b"iotlb_lost"].values():
            n += sum(int(x) for x in v)
        return n

    # ---- live ------------------------------------------------------------
    def queue_states(self) -> dict[int, VhostVqState]:
        """``{vq address: VhostVqState}`` as last seen by any probe hit."""
        bpf = self._need()
        out = {}
        for k, s in bpf[b"vq_state"].items():
            out[k.value] = VhostVqState(
                vq=k.value, owner_pid=s.owner, index=s.index, num=s.num, desc=s.desc, avail=s.avail,
                used=s.used, last_avail_idx=s.last_avail_idx, avail_idx=s.avail_idx,
                last_used_idx=s.last_used_idx, used_flags=s.used_flags, signalled_used=s.signalled_used,
                signalled_used_valid=bool(s.signalled_used_valid),
                notify_enabled=None if s.notify_enabled < 0 else bool(s.notify_enabled),
                acked_features=s.acked_features, time_ns=s.time, iotlb=s.iotlb)
        return out

    def _event(self, rec):
        ev = super()._event(rec)
        return ev._replace(device=f"vhost-net:{rec.pid}")


class _IotlbRec(ctypes.Structure):
    """``struct iotlb_op`` of vhost_net.bpf.c."""

    _fields_ = [("ts", ctypes.c_uint64), ("iotlb", ctypes.c_uint64), ("start", ctypes.c_uint64),
                ("last", ctypes.c_uint64), ("addr", ctypes.c_uint64), ("perm", ctypes.c_uint32),
                ("op", ctypes.c_uint32), ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


def btf_offsets_names() -> list[str]:
    """Names of the offset #defines (for a program built without BTF)."""
    names = []
    for f in VQ_FIELDS:
        names += [f"VQ_{f.upper()}_OFF", f"VQ_{f.upper()}_SIZE"]
    names.append("VQ_POLL_OFF")
    for n in ("POLL_WAIT", "POLL_WORK", "POLL_WORK_FN", "POLL_MASK", "WORK_FN", "DEV_VQS", "DEV_NVQS"):
        names += [f"{n}_OFF", f"{n}_SIZE"]
    names += ["NET_VQ_RX_OFF", "NET_VQ_TX_OFF", "NET_POLL_RX_WORK_OFF", "NET_POLL_TX_WORK_OFF"]
    return names


def _pick(root: Path, name: str) -> Path | None:
    for cand in (root / name, root / f"{name}.xz"):
        if cand.exists():
            return cand
    return None


def _dedupe_alternatives(pts: list[AttachPoint]) -> list[AttachPoint]:
    """Of two functions that do the same job, attach one: eventfd_signal
    when eventfd_signal_mask is there, vhost_iotlb_add_range when
    vhost_iotlb_add_range_ctx is (the first calls the second)."""
    have = {(ap.kind, ap.wanted) for ap in pts if ap.ok}
    out = []
    for ap in pts:
        if ap.ok and ap.wanted == "eventfd_signal" and ("kprobe", "eventfd_signal_mask") in have:
            ap = AttachPoint(ap.probe, ap.kind, ap.wanted, ap.target, "unavailable",
                             "not needed: eventfd_signal_mask is probed (it is called from here)")
        if ap.ok and ap.wanted == "vhost_iotlb_add_range" and ("kprobe", "vhost_iotlb_add_range_ctx") in have:
            ap = AttachPoint(ap.probe, ap.kind, ap.wanted, ap.target, "unavailable",
                             "not needed: vhost_iotlb_add_range_ctx is probed (it is called from here)")
        out.append(ap)
    return out


__all__ = ["IOTLB_FIELDS", "ProbeError", "VhostNetProbe", "VhostVqState", "arg_positions", "btf_offsets",
           "iotlb_offsets"]
