"""Shared pytest setup.

Tests that need something this machine may lack (root, DPDK, QEMU, a kernel)
call :func:`require`; outside CI it skips with the reason, under CI (``CI``
set) it fails: CI runs as root on a machine where `make test` installed all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VQSCOPE = [sys.executable, "-m", "inspector"]


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (under CI) when ``condition`` is false."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def wait_for(cond, timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Poll ``cond()`` until it is true or ``timeout`` seconds pass; returns
    its last value (callers assert on it, so a timeout fails the test)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())
