"""qemu-storage-daemon as a real vhost-user-blk back-end (libvhost-user
underneath; Debian qemu-system-common), for tests and benchmarks of the
built-in blk front-end and ``vqscope load blk``."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager

QSD = shutil.which("qemu-storage-daemon")


def qsd_command(image: str, sock: str, *, writable: bool = True, num_queues: int = 1,
                logical_block_size: int | None = None) -> list[str]:
    """The command line exporting raw ``image`` as vhost-user-blk on ``sock``."""
    export = (f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
              f"writable={'on' if writable else 'off'},num-queues={num_queues}")
    if logical_block_size:
        export += f",logical-block-size={logical_block_size}"
    return [QSD or "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off",
            "--export", export]


@contextmanager
def running_qsd(image: str, sock: str, **kw):
    """Run qemu-storage-daemon on ``image`` until the block ends; yields the
    Popen once ``sock`` exists. RuntimeError if it does not come up in 10 s."""
    proc = subprocess.Popen(qsd_command(image, sock, **kw), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
