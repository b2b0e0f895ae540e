"""The data plane: settings, API keys, metrics, caches, the registry client, the model store, batchers, the
frame pipeline, health, and ``DataPlane``, the one object the front doors call. It decides (admission,
limits, timing, health); it never imports a front door, the composition root, tools or benchmarks."""
