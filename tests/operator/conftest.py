"""Fixtures for the operator tests; the emulator, the registry and the helpers live in lsm_harness.py."""

from lsm_harness import cluster, operator, operator_env, pytest_configure, registry, start_operator  # noqa: F401
