"""Benchmarks: ``lipsync bench engine`` (in-process) and ``lipsync bench service`` (over gRPC).

Only names live here, so that ``lipsync`` offers them without importing the benchmarks (and torch)."""

# What `lipsync bench service --scenarios` may name, in the order a run measures them (docs/BENCHMARKS.md).
SERVICE_SCENARIOS = ("sequential", "batch5", "batch50", "engine", "concurrent", "multi-sequential",
                     "multi-concurrent", "multi-mixed", "stress", "cache", "outputs", "live")
