"""Measurement: paired timing, MAC counting, the accuracy/latency Pareto front, reports and charts.

``effivit bench`` (:mod:`effivit.bench.command`) is built from these parts; the scripts in ``benchmarks/``
use them to write ``docs/benchmarks.md``.
"""
