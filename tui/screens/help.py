"""The keys, over whatever screen is showing."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("↑ ↓ PgUp PgDn", "move between queues / descriptors"),
    ("enter", "open the queue under the cursor (ring, notifications, verdict, chains)"),
    ("s", "queue table: problems first / device order"),
    ("escape", "back to the queue table (or close this help)"),
    ("?", "this help"),
    ("q", "quit"),
)

REPLAY_KEYS = (
    ("space", "play / pause the recording (1× is recorded time)"),
    ("← →", "one snapshot back / forward (pauses)"),
    ("n  N or p", "next / previous snapshot where a new anomaly appeared or a verdict changed"),
    ("home end", "first / last snapshot"),
    ("+ −", "play faster / slower"),
)

LEGEND = (
    "health: ● healthy or idle (buffers move, or nothing to do); ▲ a problem, with\n"
    "how long it has held (the lines under the table give the evidence).\n"
    "inflight = (avail_idx − used_idx) mod 2^16: buffers the driver made available\n"
    "that the device has not returned. — : not known, or not negotiated\n"
    "(used_event / avail_event without VIRTIO_RING_F_EVENT_IDX).\n"
    "Rates are per second between the last two snapshots' times."
)

REPLAY_LEGEND = (
    "\nReplay: rates cover the recorded interval that ends at the cursor's\n"
    "snapshot; kicks/s and calls/s count recorded kick and call events when\n"
    "the recording holds them."
)


class HelpScreen(ModalScreen):
    """Key list and a short legend; escape or ? closes it."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("question_mark", "dismiss", "Close", show=False)]

    def compose(self) -> ComposeResult:
        keys, legend = (KEYS + REPLAY_KEYS, LEGEND + REPLAY_LEGEND) if self.app.replay else (KEYS, LEGEND)
        lines = "\n".join(f"[b]{key:>14}[/b]  {what}" for key, what in keys)
        yield Static(f"[b]vqscope keys[/b]\n\n{lines}\n\n[dim]{legend}[/dim]", id="help")
