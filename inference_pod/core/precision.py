"""The precisions an engine runs at, by name. Light on purpose (no torch): settings and command lines offer
them without importing the engine, which maps each to its torch dtype (core.engine.network.PRECISIONS)."""

PRECISION_NAMES = ("fp32", "fp16", "bf16")
