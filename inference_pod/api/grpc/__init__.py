"""The gRPC front door: lipsync.v1.LipSync, grpc.health.v1 over the data plane's health, reflection."""
