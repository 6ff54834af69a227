"""Grafana dashboards, provisioning and Prometheus alert rules, shipped as package data.

Read them with ``importlib.resources.files("neuronwatch.grafana")``, or write them out with
``neuronwatch grafana export DIR``.
"""
