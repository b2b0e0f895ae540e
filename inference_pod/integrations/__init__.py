"""Adapters that put a pod's API inside other frameworks (``pip install ".[pipecat]"`` for the Pipecat one).
They speak to pods only through ``inference_pod.client``, as any remote client would."""
