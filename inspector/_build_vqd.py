"""cffi out-of-line API-mode build of the C decoder and data path.

Every ``inspector/csrc/*.h`` declares its exported ``vqd_`` API between
``/* CDEF BEGIN */`` and ``/* CDEF END */``; that text is given to cffi's
cdef, and every ``*.c`` is compiled into the private module ``inspector._vqd``,
imported only by ``inspector/_cffi.py`` (the C/Python seam). The blk data
path (csrc/vqd_blk.c) links liburing (Debian liburing-dev, scripts/install-deps.sh).
"""

import pathlib
import re

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = pathlib.Path("inspector") / "csrc"
_CDEF = re.compile(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", re.S)

headers = sorted((ROOT / CSRC).glob("*.h"))
ffibuilder = FFI()
ffibuilder.cdef("\n".join(m.group(1) for h in headers for m in _CDEF.finditer(h.read_text())))
ffibuilder.set_source(
    "inspector._vqd",
    "\n".join(f'#include "{h.name}"' for h in headers),
    sources=[str(CSRC / c.name) for c in sorted((ROOT / CSRC).glob("*.c"))],
    include_dirs=[str(CSRC)],
    libraries=["uring"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT), verbose=False)
