"""Offline tools: rendering, verification, training, the demo character, SyncTalk_2D dataset conversion, the
lip-sync quality gate, and the live demo that runs a pod and records a session from it. Used by commands and
benchmarks; never imported by the serving path."""
