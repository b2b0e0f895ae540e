"""Benchmarks: ``lipsync bench engine`` (in-process), ``lipsync bench service`` and ``lipsync bench sessions``
(over gRPC), ``lipsync bench pool`` (simulated).

Only names live here, so that ``lipsync`` offers them without importing the benchmarks (and torch)."""

# What `lipsync bench service --scenarios` may name, in the order a run measures them (docs/BENCHMARKS.md).
SERVICE_SCENARIOS = ("sequential", "batch5", "batch50", "engine", "concurrent", "multi-sequential",
                     "multi-concurrent", "multi-mixed", "stress", "cache", "outputs", "live")

# What `lipsync bench sessions --transport` may name: one class each in bench.session_transport.TRANSPORTS.
SESSION_TRANSPORTS = ("grpc", "webrtc")
