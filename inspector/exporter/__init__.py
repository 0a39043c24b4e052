"""``vqscope exporter``: every queue of many sources as Prometheus metrics
(README "Fleet"). metrics.py is the vocabulary; the rest reads sources in
the background and serves /metrics and /healthz.
"""
