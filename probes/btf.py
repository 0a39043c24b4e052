"""A small pure-Python reader of the kernel's BTF (BPF Type Format), enough
to take struct field offsets and function prototypes from the running
kernel instead of hand-copying struct layouts.

Format: Documentation/bpf/btf.rst (include/uapi/linux/btf.h). A blob is a
header (``magic 0xeB9F, version, flags, hdr_len, type_off, type_len,
str_off, str_len``; offsets relative to the header's end), a type section
(``struct btf_type`` records, each followed by kind-specific data) and a
string section (NUL-terminated names). Type id 0 is ``void``; ids count up
from 1 in section order.

Module BTF (``/sys/kernel/btf/vhost``) is *split* BTF on top of
``/sys/kernel/btf/vmlinux``: its type ids continue after the base's last id
and its string offsets continue after the base's string section (libbpf's
``btf__parse_split``). :class:`Btf` takes an optional ``base`` for that.

Only reading; nothing here needs root or BCC.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

from inspector.errors import InspectorError

BTF_MAGIC = 0xEB9F

# BTF_KIND_* (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
KIND_NAMES = {0: "unknown", INT: "int", PTR: "ptr", ARRAY: "array", STRUCT: "struct", UNION: "union",
              ENUM: "enum", FWD: "fwd", TYPEDEF: "typedef", VOLATILE: "volatile", CONST: "const",
              RESTRICT: "restrict", FUNC: "func", FUNC_PROTO: "func_proto", VAR: "var",
              DATASEC: "datasec", FLOAT: "float", DECL_TAG: "decl_tag", TYPE_TAG: "type_tag",
              ENUM64: "enum64"}
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BtfError(InspectorError):
    """A BTF blob that cannot be parsed, or a type/member it lacks."""


@dataclass(frozen=True)
class Member:
    """A struct/union member: ``bit_offset`` from the start of the
    aggregate, ``bitfield_size`` 0 for a plain member."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass
class BtfType:
    """One type record. ``size_or_type`` is the size in bytes for
    int/struct/union/enum/float/datasec and the referenced type id for
    ptr/typedef/modifiers/func/var. ``members`` for struct/union, ``params``
    ``[(name, type_id)]`` for func_proto, ``array`` ``(elem_type, nelems)``."""

    id: int
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    members: tuple[Member, ...] = ()
    params: tuple[tuple[str, int], ...] = ()
    array: tuple[int, int] | None = None


@dataclass(frozen=True)
class Field:
    """A resolved member path: byte ``offset`` from the outer struct's start,
    ``size`` in bytes of the member's type, and that type."""

    path: str
    offset: int
    size: int
    type_id: int


def read_blob(path: str | Path) -> bytes:
    """The bytes of a BTF file; ``.xz`` files are decompressed."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BtfError(f"cannot read BTF {p}: {e.strerror}") from e
    if p.suffix == ".xz":
        data = lzma.decompress(data)
    return data


class Btf:
    """A parsed BTF blob (optionally split on ``base``).

    Raises BtfError on a bad magic, a truncated section or an unknown kind.
    """

    def __init__(self, data: bytes, base: Btf | None = None, name: str = "btf"):
        self.name = name
        self.base = base
        if len(data) < 24:
            raise BtfError(f"{name}: {len(data)} bytes, too short for a BTF header (24)")
        magic, version, flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"{name}: magic {magic:#x}, expected {BTF_MAGIC:#x} (not BTF, or big-endian)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<4I", data, 8)
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data):
            raise BtfError(f"{name}: sections end past the blob ({len(data)} bytes): "
                           f"types {t0}+{type_len}, strings {s0}+{str_len}")
        self.version = version
        self._strs = data[s0:s0 + str_len]
        self.start_str_off = base.start_str_off + len(base._strs) if base else 0
        self.start_id = base.start_id + len(base._types) if base else 1
        self._types: list[BtfType] = []
        self._by_name: dict[str, list[int]] | None = None
        self._parse_types(data[t0:t0 + type_len])

    @classmethod
    def load(cls, path: str | Path, base: Btf | None = None) -> Btf:
        """Parse the BTF file at ``path`` (``/sys/kernel/btf/NAME`` or a saved
        copy, ``.xz`` allowed), split on ``base`` when given."""
        return cls(read_blob(path), base, name=str(path))

    # -------------------------------------------------------------- parsing
    def str_at(self, off: int) -> str:
        """The string at string-section offset ``off`` (split-aware)."""
        if off < self.start_str_off:
            return self.base.str_at(off)
        off -= self.start_str_off
        end = self._strs.find(b"\0", off)
        if off >= len(self._strs) or end < 0:
            raise BtfError(f"{self.name}: string offset {off + self.start_str_off} outside the string section "
                           "(module BTF is split BTF: parse it with its vmlinux base)")
        return self._strs[off:end].decode(errors="replace")

    def _parse_types(self, sec: bytes) -> None:
        pos, tid = 0, self.start_id
        n = len(sec)
        while pos < n:
            if pos + 12 > n:
                raise BtfError(f"{self.name}: type {tid} truncated at byte {pos}")
            name_off, info, st = struct.unpack_from("<3I", sec, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = bool(info >> 31)
            t = BtfType(tid, kind, self.str_at(name_off) if name_off else "", st, vlen, kflag)
            if kind == INT or kind in (VAR, DECL_TAG):
                pos += 4
            elif kind == ARRAY:
                elem, _idx, nelems = struct.unpack_from("<3I", sec, pos)
                t.array = (elem, nelems)
                pos += 12
            elif kind in (STRUCT, UNION):
                ms = []
                for _ in range(vlen):
                    mname, mtype, moff = struct.unpack_from("<3I", sec, pos)
                    pos += 12
                    if kflag:
                        ms.append(Member(self.str_at(mname) if mname else "", mtype, moff & 0xFFFFFF, moff >> 24))
                    else:
                        ms.append(Member(self.str_at(mname) if mname else "", mtype, moff))
                t.members = tuple(ms)
            elif kind == ENUM:
                pos += 8 * vlen
            elif kind == ENUM64:
                pos += 12 * vlen
            elif kind == FUNC_PROTO:
                ps = []
                for _ in range(vlen):
                    pname, ptype = struct.unpack_from("<2I", sec, pos)
                    pos += 8
                    ps.append((self.str_at(pname) if pname else "", ptype))
                t.params = tuple(ps)
            elif kind == DATASEC:
                pos += 12 * vlen
            elif kind in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
                pass
            else:
                raise BtfError(f"{self.name}: type {tid} has unknown kind {kind} (BTF newer than this reader)")
            if pos > n:
                raise BtfError(f"{self.name}: type {tid} ({KIND_NAMES.get(kind)}) truncated")
            self._types.append(t)
            tid += 1

    # -------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self._types)

    def type(self, tid: int) -> BtfType:
        """The type with id ``tid`` (from the base when below our ids);
        id 0 (void) is a pseudo-type of kind 0."""
        if tid == 0:
            return BtfType(0, 0, "void", 0, 0, False)
        if tid < self.start_id:
            if self.base is None:
                raise BtfError(f"{self.name}: type id {tid} is below this split BTF's first id {self.start_id} "
                               "and no base BTF was given")
            return self.base.type(tid)
        i = tid - self.start_id
        if i >= len(self._types):
            raise BtfError(f"{self.name}: type id {tid} out of range (last {self.start_id + len(self._types) - 1})")
        return self._types[i]

    def find(self, name: str, kind: int) -> BtfType:
        """The first type named ``name`` of ``kind`` (this blob first, then
        the base). Raises BtfError when there is none."""
        if self._by_name is None:
            idx: dict[str, list[int]] = {}
            for t in self._types:
                if t.name:
                    idx.setdefault(t.name, []).append(t.id)
            self._by_name = idx
        for tid in self._by_name.get(name, ()):
            t = self.type(tid)
            if t.kind == kind and not (kind in (STRUCT, UNION) and t.vlen == 0 and t.size_or_type == 0):
                return t
        if self.base is not None:
            return self.base.find(name, kind)
        raise BtfError(f"{self.name}: no {KIND_NAMES.get(kind, kind)} named {name!r} in BTF")

    def has(self, name: str, kind: int) -> bool:
        try:
            self.find(name, kind)
            return True
        except BtfError:
            return False

    def resolve(self, tid: int) -> BtfType:
        """Skip typedefs, const/volatile/restrict and type tags."""
        for _ in range(64):
            t = self.type(tid)
            if t.kind not in _MODIFIERS:
                return t
            tid = t.size_or_type
        raise BtfError(f"{self.name}: type {tid}: modifier chain longer than 64")

    def sizeof(self, tid: int) -> int:
        """Size in bytes of type ``tid`` (pointers: 8, this reader is for
        64-bit kernels)."""
        t = self.resolve(tid)
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return t.size_or_type
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            elem, n = t.array
            return self.sizeof(elem) * n
        raise BtfError(f"{self.name}: type {tid} ({KIND_NAMES.get(t.kind)} {t.name!r}) has no size")

    def struct_size(self, struct_name: str) -> int:
        return self.find(struct_name, STRUCT).size_or_type

    def _member(self, agg: BtfType, name: str) -> tuple[int, Member] | None:
        """Member ``name`` of ``agg`` with its bit offset, looking inside
        anonymous struct/union members."""
        for m in agg.members:
            if m.name == name:
                return m.bit_offset, m
            if not m.name:
                inner = self.resolve(m.type_id)
                if inner.kind in (STRUCT, UNION):
                    hit = self._member(inner, name)
                    if hit is not None:
                        return m.bit_offset + hit[0], hit[1]
        return None

    def field(self, struct_name: str, path: str) -> Field:
        """Byte offset and size of ``path`` (dotted, e.g. ``poll.work.fn``;
        ``vqs[1]`` indexes an array member) inside ``struct struct_name``.
        Raises BtfError naming the missing member, or for a bitfield."""
        t = self.find(struct_name, STRUCT)
        off_bits, tid = 0, t.id
        for part in path.split("."):
            index = None
            if part.endswith("]") and "[" in part:
                part, idx = part[:-1].split("[", 1)
                index = int(idx)
            agg = self.resolve(tid)
            if agg.kind not in (STRUCT, UNION):
                raise BtfError(f"{self.name}: {struct_name}.{path}: {part!r} is not inside a struct or union")
            hit = self._member(agg, part)
            if hit is None:
                raise BtfError(f"{self.name}: struct {agg.name or '(anonymous)'} has no member {part!r} "
                               f"(asked for {struct_name}.{path}; the kernel's layout changed)")
            bits, m = hit
            if m.bitfield_size:
                raise BtfError(f"{self.name}: {struct_name}.{path} is a bitfield; read it another way")
            off_bits += bits
            tid = m.type_id
            if index is not None:
                arr = self.resolve(tid)
                if arr.kind != ARRAY:
                    raise BtfError(f"{self.name}: {struct_name}.{path}: {part} is not an array")
                elem, n = arr.array
                if not 0 <= index < n:
                    raise BtfError(f"{self.name}: {struct_name}.{path}: index {index} outside [0, {n})")
                off_bits += 8 * index * self.sizeof(elem)
                tid = elem
        if off_bits % 8:
            raise BtfError(f"{self.name}: {struct_name}.{path} is not byte aligned (bit {off_bits})")
        return Field(f"{struct_name}.{path}", off_bits // 8, self.sizeof(tid), tid)

    def func_params(self, func_name: str) -> list[tuple[str, str]]:
        """The source-level parameters of function ``func_name`` as
        ``[(name, type as C-ish text)]`` (from its BTF FUNC → FUNC_PROTO).
        These are the *source* arguments: a compiler clone
        (``.isra``/``.constprop``) may take different ones."""
        f = self.find(func_name, FUNC)
        proto = self.type(f.size_or_type)
        return [(n, self.type_name(tid)) for n, tid in proto.params]

    def type_name(self, tid: int) -> str:
        """A readable C-ish name: ``struct vhost_virtqueue *``, ``u16``."""
        t = self.type(tid)
        if t.kind == 0:
            return "void"
        if t.kind == PTR:
            return self.type_name(t.size_or_type) + " *"
        if t.kind in (CONST, VOLATILE, RESTRICT, TYPE_TAG):
            return self.type_name(t.size_or_type)
        if t.kind in (STRUCT, UNION, ENUM, FWD):
            tag = {STRUCT: "struct", UNION: "union", ENUM: "enum"}.get(t.kind, "struct")
            return f"{tag} {t.name}" if t.name else f"{tag} (anonymous)"
        if t.kind == ARRAY:
            elem, n = t.array
            return f"{self.type_name(elem)}[{n}]"
        return t.name or KIND_NAMES.get(t.kind, "?")


def load_kernel_btf(modules: list[str], root: str | Path = "/sys/kernel/btf") -> dict[str, Btf]:
    """``{"vmlinux": base, module: split}`` from ``root`` (the running
    kernel's ``/sys/kernel/btf`` or a directory of saved blobs named the
    same, ``.xz`` allowed). Raises BtfError naming the first file missing."""
    root = Path(root)

    def pick(name: str) -> Path:
        for cand in (root / name, root / f"{name}.xz"):
            if cand.exists():
                return cand
        raise BtfError(f"no BTF for {'the kernel' if name == 'vmlinux' else 'module ' + name} "
                       f"({root / name} missing)")

    base = Btf.load(pick("vmlinux"))
    out = {"vmlinux": base}
    for m in modules:
        out[m] = Btf.load(pick(m), base)
    return out
