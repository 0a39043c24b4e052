"""The in-flight chains of one queue, one row per descriptor."""

from __future__ import annotations

from textual.widgets import DataTable

from inspector.snapshot.model import Chain

from ..render import CHAIN_COLUMNS, chain_rows


class ChainTable(DataTable):
    """Rebuilt only when the chains change; the cursor row is kept."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self._chains: list[Chain] | None = None

    def on_mount(self) -> None:
        for key, label in CHAIN_COLUMNS:
            self.add_column(label, key=key)

    def show(self, chains: list[Chain]) -> None:
        if chains == self._chains:
            return
        self._chains = chains
        row = self.cursor_row
        self.clear()
        for chain in chains:
            self.add_rows(chain_rows(chain))
        if self.row_count:
            self.move_cursor(row=min(row, self.row_count - 1), animate=False, scroll=False)
