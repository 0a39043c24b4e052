"""The in-flight chains of one queue, one row per descriptor."""

from __future__ import annotations

from inspector.snapshot.model import Chain

from ..render import CHAIN_COLUMNS, chain_rows
from .line_table import LineTable


class ChainTable(LineTable):
    """Redrawn only when the chains change, and then only the rows that
    did; the cursor row is kept."""

    def __init__(self, **kwargs) -> None:
        super().__init__(CHAIN_COLUMNS, **kwargs)
        self._chains: list[Chain] | None = None

    def show(self, chains: list[Chain]) -> None:
        if chains == self._chains:
            return
        self._chains = chains
        n = 0
        for chain in chains:
            for row in chain_rows(chain):
                self.set_row(str(n), [(text, None) for text in row])
                n += 1
        self.remove_rows({str(i) for i in range(n, self.row_count)})
        self.refresh_rows()
