"""``lipsync serve`` as a process: settings from the environment, metrics over HTTP, SIGTERM drains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

from serving_support import LOOPBACK, free_port, models_dir_with, wait_serving

from inference_pod.client import LipSyncClient


def test_serve_from_environment_and_sigterm(tmp_path):
    port, metrics_port = free_port(), free_port()
    models = models_dir_with(tmp_path / "models", "demo-1")
    env = dict(os.environ, LIPSYNC_HOST=LOOPBACK, LIPSYNC_PORT=str(port), LIPSYNC_METRICS_PORT=str(metrics_port), LIPSYNC_HTTP_PORT="0",
               LIPSYNC_MODELS_DIR=str(models), LIPSYNC_PRELOAD="demo", LIPSYNC_MAX_BATCH="4",
               LIPSYNC_SHUTDOWN_GRACE_S="20", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "inference_pod.cli", "serve", "--max-batch-delay-ms", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with LipSyncClient(f"{LOOPBACK}:{port}", timeout=5) as client:
            wait_serving(client, proc)  # SERVING once the preload is done
            assert client.health("demo") == "SERVING"  # preloaded from LIPSYNC_PRELOAD
            stats = client.get_stats()
            assert stats.max_batch == 4
            assert client.generate_frame("demo", 1).width == 48
            body = urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5).read().decode()
            assert 'lipsync_frames_generated_total{model="demo",source="model"} 1.0' in body
            assert "lipsync_models_resident 1.0" in body

            stream = client.stream_frames("demo", 0, 11, realtime=True, fps=10)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)  # in flight when SIGTERM arrived: it still completes
            assert [f.frame_id for f in [first, *rest]] == list(range(12))
        assert proc.wait(timeout=30) == 0
        output = proc.stdout.read()
        assert "received SIGTERM" in output and "draining" in output and "stopped" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
