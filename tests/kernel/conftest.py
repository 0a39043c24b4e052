"""Tests that run INSIDE a virtme-ng guest booted with Debian's kernel
(vhost-net, kprobes): tests/integration/test_kernel.py boots the guest once and runs
this directory there with ``VQSCOPE_IN_VM=1``, then reports each test here
as a host test of its own.

On the host (no vhost-net, no kprobes) nothing here is collected: a plain
``pytest`` run neither runs nor skips these files.
"""

from __future__ import annotations

import os

IN_VM = os.environ.get("VQSCOPE_IN_VM") == "1"

if not IN_VM:
    collect_ignore_glob = ["test_*.py"]
