"""Benchmarks: ``lipsync bench engine`` (in-process) and ``lipsync bench service`` (over gRPC)."""
