"""A session's shared feature job (serving.session): a frame that finds the job already done, before the job's
own done callback has run, must go on, not spin.

On a loaded pod this happened by itself: the frame holding the job was cancelled (it missed its tick) in the
same pass of the event loop as the worker thread finished the job, so the next frame took the lock, found the
job done (awaiting it returns without yielding) and still in flight (its callback not yet run), and looped
forever on the event loop: every session on the pod froze, and their WebRTC peers died (issue 19). Here the
same order of events is made on purpose, with a real pod's model and pipeline, and an executor whose jobs the
script finishes itself. It runs in a child process: a spinning loop cannot fail a test in its own process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from serving_support import models_dir_with

SCRIPT = textwrap.dedent("""
    import asyncio, concurrent.futures, sys
    import numpy as np
    from inference_pod.app import Pod
    from inference_pod.core.encoding import OutputSpec
    from inference_pod.serving.session import Session, SessionConfig
    from inference_pod.serving.settings import Settings

    class HeldJobs(concurrent.futures.Executor):
        # Runs nothing until told: finish() runs every held job and completes its future, on this thread.
        def __init__(self):
            self.held = []
            self.submitted = asyncio.Event()  # submit is called on the loop's thread (run_in_executor)

        def submit(self, fn, *args):
            future = concurrent.futures.Future()
            self.held.append((future, fn, args))
            self.submitted.set()
            return future

        def finish(self):
            held, self.held = self.held, []
            for future, fn, args in held:
                future.set_result(fn(*args))

    async def main(models_dir):
        settings = Settings(host="127.0.0.1", port=0, metrics_port=0, http_port=0, models_dir=models_dir,
                            preload=["demo"])
        pod = await Pod(settings).start()
        try:
            plane = pod.data_plane
            jobs = HeldJobs()
            async with plane.store.use("demo") as model:
                session = Session(model, SessionConfig("demo", OutputSpec(format="raw"), paced=False),
                                  plane.pipeline, plane.metrics, plane.idle_frames, jobs)
                speech = (np.sin(np.arange(32000) * 0.05) * 8000).astype("<i2").tobytes()
                await session.push(speech)
                tick = 10
                holder = asyncio.create_task(session._speaking(tick, 0))
                waiter = asyncio.create_task(session._speaking(tick + 1, 0))
                # The holder asks for the features; the waiter waits for the lock.
                await asyncio.wait_for(jobs.submitted.wait(), timeout=60)
                # One pass: the holder is cancelled (it missed its tick) and the worker finishes the job.
                holder.cancel()
                jobs.finish()
                while not waiter.done():  # a further job, if the waiter needs one, finished as it comes
                    jobs.submitted.clear()
                    asked = asyncio.ensure_future(jobs.submitted.wait())
                    done, _ = await asyncio.wait({waiter, asked}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
                    asked.cancel()
                    if not done:
                        raise SystemExit("the frame neither went on nor asked for features within 60 s")
                    jobs.finish()
                result, kind = waiter.result()
                print("went on:", kind, result.frame_id, flush=True)
        finally:
            await pod.stop(grace_s=1)

    asyncio.run(main(sys.argv[1]))
""")


def test_a_frame_that_finds_the_feature_job_done_goes_on(tmp_path: Path):
    models = models_dir_with(tmp_path / "models", "demo-1")
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(models)], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("the session's next frame never went on: its event loop spun") from None
    assert done.returncode == 0, done.stderr[-3000:]
    assert "went on: speaking 11" in done.stdout, done.stdout
