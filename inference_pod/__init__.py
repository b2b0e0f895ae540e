"""Inference pod: serves SyncTalk_2D lip-sync characters over gRPC and HTTP."""

__version__ = "0.1.0"
