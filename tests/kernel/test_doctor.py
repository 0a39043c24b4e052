"""``vqscope doctor --vhost-net PID`` names a lost kick on the kernel's
vhost-net (runs in the VM only, see conftest.py).

The driver is the load tool's (:class:`VhostNetDriver`, what ``vqscope load
vhost-net`` runs), in this process, so that the kicks stop at the right
moment: the vhost-net source learns a vring from vhost's handlers once its
kprobes are attached, and the doctor's two BPF compiles take about a minute
under TCG here, longer than any fixed ``--withhold-after`` could safely
guess without making the test wait that long twice. So both vrings move
kicked frames until the doctor's kprobes are in (its perf_event fds stand
still), a little longer so the handlers ran under them, then
``publish_tx(kick=False)``, what ``--withhold-kicks`` does: TX entries
published without the kick vhost asked for (no EVENT_IDX,
VRING_USED_F_NO_NOTIFY clear while it waits: VIRTIO 1.2 §2.7.10). vhost
never looks; the doctor must say kick_missing on TX (vring 1), and not name
RX, which goes on receiving.
"""

from __future__ import annotations

import os
import re
import time

from inspector.spec.virtio import VRING_USED_F_NO_NOTIFY
from inspector.tools.vhost_net_load import VHOST_NET_VQ_RX, VHOST_NET_VQ_TX, VhostNetDriver
from tests.conftest import ROOT, VQSCOPE
from tests.support.peers import Peer

WITHHELD = 4
ATTACH_TIMEOUT = 600.0   # the doctor's BPF compiles under TCG


def perf_event_fds(pid: int) -> int:
    """How many perf_event fds process ``pid`` holds (one per attached
    kprobe, kretprobe or tracepoint)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            pass
    return n


def test_doctor_vhost_net_names_withheld_tx_kicks_kick_missing():
    with VhostNetDriver(size=64) as drv:
        device = f"vhost-net:{os.getpid()}:{drv.vhost_fd}"
        drv.send(8)
        drv.receive(8)
        with Peer([*VQSCOPE, "doctor", "--vhost-net", str(os.getpid()), "--stall-after", "1", "--duration", "4"],
                  "vqscope doctor", cwd=ROOT) as doctor:
            # Kicked traffic both ways until the kprobes are in and have seen it.
            start = time.monotonic()
            count, steady = 0, None
            while steady is None or time.monotonic() - steady < 3:
                assert doctor.alive(), doctor.tail()
                assert time.monotonic() - start < ATTACH_TIMEOUT, f"the doctor attached no probe\n{doctor.tail()}"
                drv.send(1)
                drv.receive(1)
                n = perf_event_fds(doctor.proc.pid)
                if n != count:
                    count, steady = n, (time.monotonic() if n else None)
                time.sleep(0.3)
            ring = drv.rings[VHOST_NET_VQ_TX]
            assert not ring.used_flags & VRING_USED_F_NO_NOTIFY      # vhost waits for a kick
            assert len(drv.publish_tx(WITHHELD, kick=False)) == WITHHELD
            while doctor.alive():
                drv.receive(1)
                time.sleep(0.3)
            rc = doctor.proc.wait(10)
            out = doctor.output
    print(f"$ vqscope doctor --vhost-net PID --stall-after 1 --duration 4\n{out}(exit status {rc})")
    assert rc == 1, out
    m = re.search(rf"^{re.escape(device)} q{VHOST_NET_VQ_TX} kick_missing since .* — (.*)$", out, re.M)
    assert m, out
    assert re.search(rf"{WITHHELD} entries published past shadow_avail_idx \d+ under VRING_USED_F_NO_NOTIFY "
                     r"clear \(§2\.7\.10\) required a kick; none came", m.group(1)), m.group(1)
    assert f" q{VHOST_NET_VQ_RX} " not in out, out
    assert re.search(r"^1 problem: 2 queues of vhost-net pid ", out, re.M), out
