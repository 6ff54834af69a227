"""Exporters read ``Snapshot`` objects and publish them (Prometheus, OpenTelemetry).

Each exporter lives in its own module and imports its client library only when used.
"""
