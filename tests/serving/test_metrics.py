"""Metrics: the contract's names, one registry per server, the /metrics endpoint on loopback."""

from __future__ import annotations

import urllib.request

from inference_pod.serving.metrics import Metrics, MetricsHttpServer

CONTRACT = {
    "lipsync_frames_generated_total": "counter",
    "lipsync_request_duration_seconds": "histogram",
    "lipsync_sessions_active": "gauge",
    "lipsync_sessions_max": "gauge",
    "lipsync_sessions_utilization": "gauge",
    "lipsync_sessions_refused_total": "counter",
    "lipsync_session_frames_total": "counter",
    "lipsync_session_frames_dropped_total": "counter",
    "lipsync_session_speech_latency_seconds": "histogram",
    "lipsync_session_barge_ins_total": "counter",
    "lipsync_batch_size": "histogram",
    "lipsync_inference_duration_seconds": "histogram",
    "lipsync_queue_depth": "gauge",
    "lipsync_inflight_requests": "gauge",
    "lipsync_cache_requests_total": "counter",
    "lipsync_cache_bypass_total": "counter",
    "lipsync_model_loads_total": "counter",
    "lipsync_model_load_duration_seconds": "histogram",
    "lipsync_models_resident": "gauge",
    "lipsync_device_memory_bytes": "gauge",
    "lipsync_full_frame_jpegs_total": "counter",
    "lipsync_benchmark_identity_network": "gauge",
}


def touch_all(m: Metrics) -> None:
    m.frames_generated.labels(model="demo", source="model").inc(3)
    m.frames_generated.labels(model="demo", source="cache").inc()
    m.request_duration.labels(method="GenerateFrame", code="OK").observe(0.01)
    m.batch_size.labels(model="demo").observe(4)
    m.inference_duration.labels(model="demo").observe(0.02)
    m.queue_depth.labels(model="demo").set(2)
    m.inflight_requests.inc()
    m.cache_bypass.inc()
    m.model_loads.labels(model="demo", source="zip", result="ok").inc()
    m.model_load_duration.observe(0.5)
    m.models_resident.set(1)
    m.watch_device_memory("models", lambda: 1234)
    m.full_frame_jpegs.labels(model="demo", path="spliced").inc(2)
    m.benchmark_identity_network.set(0)


def exposition_types(text: str) -> dict[str, str]:
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    return types


def test_contract_names_and_types():
    m = Metrics()
    touch_all(m)
    text = m.exposition().decode()
    assert exposition_types(text) == CONTRACT  # every metric is in the contract, and nothing else is exposed
    assert 'lipsync_frames_generated_total{model="demo",source="model"} 3.0' in text
    assert 'lipsync_full_frame_jpegs_total{model="demo",path="spliced"} 2.0' in text
    assert "lipsync_benchmark_identity_network 0.0" in text
    assert 'lipsync_device_memory_bytes{kind="models"} 1234.0' in text
    assert m.sample("lipsync_batch_size_count", {"model": "demo"}) == 1
    # Cache series exist before the first lookup, so dashboards show zero rather than nothing.
    assert Metrics().sample("lipsync_cache_requests_total", {"kind": "frame", "result": "hit"}) == 0
    assert 'lipsync_cache_requests_total{kind="features",result="error"} 0.0' in Metrics().exposition().decode()


def test_each_instance_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.frames_generated.labels(model="x", source="model").inc()
    assert a.sample("lipsync_frames_generated_total", {"model": "x", "source": "model"}) == 1
    assert b.sample("lipsync_frames_generated_total", {"model": "x", "source": "model"}) == 0


def test_http_endpoint_serves_the_registry():
    m = Metrics()
    touch_all(m)
    server = MetricsHttpServer(m, "127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    finally:
        server.close()
    assert "lipsync_inflight_requests 1.0" in body
    assert 'lipsync_queue_depth{model="demo"} 2.0' in body
