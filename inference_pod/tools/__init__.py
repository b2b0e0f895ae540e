"""Offline tools: rendering, verification, training, the demo character, SyncTalk_2D dataset conversion and
the lip-sync quality gate. Used by commands and benchmarks; never imported by the serving path."""
