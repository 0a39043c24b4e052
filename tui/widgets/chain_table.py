"""The in-flight chains of one queue, one row per descriptor (a block
queue's with each chain's virtio-blk request)."""

from __future__ import annotations

from inspector.snapshot.model import Chain

from ..render import BLK_CHAIN_COLUMNS, CHAIN_COLUMNS, chain_rows
from .line_table import LineTable


class ChainTable(LineTable):
    """Redrawn only when the chains change, and then only the rows that
    did; the cursor row is kept. Once shown a block queue's chains
    (``show(..., blk=True)``) it keeps a request column
    (BLK_CHAIN_COLUMNS)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(CHAIN_COLUMNS, **kwargs)
        self._blk = False
        self._chains: list[Chain] | None = None

    def show(self, chains: list[Chain], blk: bool = False) -> None:
        if blk and not self._blk:
            self._blk = True
            self.set_columns(BLK_CHAIN_COLUMNS)
            self._chains = None
        if chains == self._chains:
            return
        self._chains = chains
        n = 0
        for chain in chains:
            for row in chain_rows(chain, self._blk):
                self.set_row(str(n), [(text, None) for text in row])
                n += 1
        self.remove_rows({str(i) for i in range(n, self.row_count)})
        self.refresh_rows()
