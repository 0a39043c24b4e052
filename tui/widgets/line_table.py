"""A table drawn line by line, for tables that change every refresh (the
queue table, the chain table).

A DataTable renders every visible cell again after any cell changes (its
render cache is keyed by one update counter for the whole table): for 256
queues whose counters all move, a tenth of a second a frame. Here a row is
drawn again only when one of its cells, the cursor, or a column's width
changed, as one strip; a frame costs the rows that changed and are visible.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

PADDING = 1  # cells each side of a column

Cell = tuple[str, str | None]
"""A cell: its text and its style (None: the row's)."""


class _Row:
    """One row's cells as shown, and a version that moves when they change."""

    __slots__ = ("cells", "version")

    def __init__(self, cells: list[Cell]):
        self.cells = cells
        self.version = 0


class LineTable(ScrollView, can_focus=True):
    """Rows of cells under a header that stays on top, a row cursor, rows
    keyed by strings and shown in :meth:`set_order`'s order (default: as
    added). ``columns``: ``(key, label)`` in order; ``right``: the keys of
    right-aligned columns (numbers). Columns widen for a wider cell and never
    narrow (no jitter). Keys: ↑ ↓ PgUp PgDn Home End move the cursor; enter,
    or a click on the cursor's row, calls :meth:`selected`."""

    COMPONENT_CLASSES = {"line-table--header", "line-table--cursor", "line-table--even-row"}

    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "cursor_to(0)", "Top", show=False),
        Binding("end", "cursor_to(-1)", "Bottom", show=False),
        Binding("enter", "select", "Open", show=False),
    ]

    def __init__(self, columns: Sequence[tuple[str, str]], right: frozenset[str] | set[str] = frozenset(),
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self._widths_version = 0
        self._init_columns(columns, right)

    def _init_columns(self, columns: Sequence[tuple[str, str]], right: frozenset[str] | set[str]) -> None:
        self._columns = list(columns)
        self._keys = [k for k, _ in self._columns]
        self._col = {k: i for i, k in enumerate(self._keys)}
        self._right = [k in right for k in self._keys]
        self._rows: dict[str, _Row] = {}
        self._order: list[str] = []
        self._widths = [cell_len(label) for _, label in self._columns]
        self._widths_version += 1
        self._strips: dict[str, tuple[tuple, Strip]] = {}  # row key -> (what it was drawn from, strip)
        self._cursor = 0

    def set_columns(self, columns: Sequence[tuple[str, str]], right: frozenset[str] | set[str] = frozenset()) -> None:
        """Replace the columns; every row is dropped (set them again)."""
        self._init_columns(columns, right)
        self.refresh_rows()

    # --- rows -----------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._order)

    @property
    def cursor_row(self) -> int:
        """The cursor's row (0 = the first under the header)."""
        return self._cursor

    @property
    def order(self) -> list[str]:
        """The row keys in the order shown (do not modify)."""
        return self._order

    def set_row(self, key: str, cells: Sequence[Cell]) -> None:
        """Add the row ``key`` (at the end) or change its cells (one per column)."""
        cells = list(cells)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(cells)
            self._order.append(key)
        elif row.cells != cells:
            row.cells = cells
            row.version += 1
        else:
            return
        widths = self._widths
        for i, (text, _) in enumerate(cells):
            w = cell_len(text)
            if w > widths[i]:
                widths[i] = w
                self._widths_version += 1

    def remove_rows(self, keys: set[str]) -> None:
        """Drop the rows ``keys``."""
        if not keys:
            return
        for key in keys:
            self._rows.pop(key, None)
            self._strips.pop(key, None)
        self._order = [k for k in self._order if k not in keys]
        self.move_cursor(self._cursor)

    def set_order(self, order: list[str], keep_cursor: bool = True) -> None:
        """Show the rows in ``order`` (every row key once); with
        ``keep_cursor`` the cursor follows the row it was on."""
        at = self._order[self._cursor] if keep_cursor and self._cursor < len(self._order) else None
        self._order = list(order)
        self.move_cursor(self._order.index(at) if at is not None and at in self._rows else self._cursor)

    def get_cell(self, row_key: str, column_key: str) -> Text:
        """The cell at ``row_key``, ``column_key`` with its style."""
        text, style = self._rows[row_key].cells[self._col[column_key]]
        return Text(text, style=style or "")

    def get_row_at(self, row: int) -> list[str]:
        """The texts of the row shown at ``row`` (0-based)."""
        return [text for text, _ in self._rows[self._order[row]].cells]

    def refresh_rows(self) -> None:
        """After changing rows: resize the scrollable area and redraw."""
        self.virtual_size = Size(sum(w + 2 * PADDING for w in self._widths), len(self._order) + 1)
        self.refresh()

    # --- cursor ---------------------------------------------------------------

    def move_cursor(self, row: int) -> None:
        """Put the cursor on ``row`` (clamped) and scroll it into view."""
        n = len(self._order)
        self._cursor = max(0, min(row, n - 1)) if n else 0
        body = max(self.scrollable_content_region.height - 1, 1)
        y = self.scroll_y
        if self._cursor < y:
            self.scroll_to(y=self._cursor, animate=False)
        elif self._cursor >= y + body:
            self.scroll_to(y=self._cursor - body + 1, animate=False)
        self.refresh()

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self._cursor + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self._cursor + direction * max(self.scrollable_content_region.height - 2, 1))

    def action_cursor_to(self, row: int) -> None:
        self.move_cursor(row if row >= 0 else len(self._order) - 1)

    def action_select(self) -> None:
        if self._order:
            self.selected(self._order[self._cursor])

    def selected(self, row_key: str) -> None:
        """Enter on the row ``row_key`` (override; default: nothing)."""

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1:
            return
        row = int(self.scroll_y) + offset.y - 1
        if row < len(self._order):
            if row == self._cursor:
                self.action_select()
            else:
                self.move_cursor(row)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # --- drawing ---------------------------------------------------------------

    def _line(self, cells: Sequence[Cell], base: Style) -> Strip:
        segments = []
        pad = " " * PADDING
        for (text, style), width, right in zip(cells, self._widths, self._right):
            fill = " " * (width - cell_len(text))
            cell = f"{pad}{fill}{text}{pad}" if right else f"{pad}{text}{fill}{pad}"
            segments.append(Segment(cell, base + Style.parse(style) if style else base))
        return Strip(segments)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            header = base + self.get_component_rich_style("line-table--header")
            strip = self._line([(label, None) for _, label in self._columns], header)
        else:
            row = scroll_y + y - 1
            if row >= len(self._order):
                return Strip.blank(width, base)
            key = self._order[row]
            r = self._rows[key]
            cursor, even = row == self._cursor, row % 2 == 1
            sig = (r.version, self._widths_version, cursor, even, self.has_focus, base)
            cached = self._strips.get(key)
            if cached is not None and cached[0] == sig:
                strip = cached[1]
            else:
                style = base
                if even:
                    style += self.get_component_rich_style("line-table--even-row")
                if cursor:
                    style += self.get_component_rich_style("line-table--cursor")
                strip = self._line(r.cells, style)
                self._strips[key] = (sig, strip)
        return strip.crop_extend(scroll_x, scroll_x + width, base)
