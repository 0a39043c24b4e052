"""The anomalies the decoder found in one queue (kind, detail)."""

from __future__ import annotations

from textual.widgets import DataTable

from inspector.snapshot.model import Anomaly


class AnomalyTable(DataTable):
    """Rebuilt only when the anomalies change."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self._anomalies: list[Anomaly] | None = None

    def on_mount(self) -> None:
        self.add_column("kind", key="kind")
        self.add_column("detail", key="detail")

    def show(self, anomalies: list[Anomaly]) -> None:
        if anomalies == self._anomalies:
            return
        self._anomalies = list(anomalies)
        self.clear()
        self.add_rows([a.kind.value, a.detail] for a in anomalies)
        self.set_class(bool(anomalies), "-found")
