"""``lipsync bench engine``: the region-vs-full-frame rows, the frame size and the identity network named in
its results. Structure only: nothing here asserts a speed."""

from __future__ import annotations

import json

import pytest

from inference_pod.bench.engine_bench import EngineBenchConfig, run
from inference_pod.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_identity_run_at_a_frame_size_puts_region_and_full_frames_side_by_side(tmp_path):
    out = tmp_path / "engine.json"
    cfg = EngineBenchConfig(width=4, frame_size=(320, 240), identity_network=True, batch_sizes=(2,), frames=6,
                            naive_frames=4, output_batch=3, out=out)
    result = run(cfg, log=lambda *_: None)
    saved = json.loads(out.read_text())
    assert saved["identity_network"] is True and saved["config"]["identity_network"] is True
    assert saved["config"]["image_size"] == [320, 240]
    assert saved["naive_loop"] is None  # the naive loop runs the U-Net: left out under the identity
    outputs = {row["output"]: row for row in saved["outputs"]}
    assert set(outputs) == {"prediction region", "full frame", "full frame, whole-frame encode"}
    for row in outputs.values():
        assert row["frames"] == 6 and row["fps"] > 0 and row["cpu_ms_per_frame"] >= 0 and row["kb_per_frame"] > 0
    # Spliced or not, a full frame is the same JPEG: the same bytes a frame.
    assert outputs["full frame"]["kb_per_frame"] == outputs["full frame, whole-frame encode"]["kb_per_frame"]
    assert "BENCHMARK IDENTITY NETWORK" in result["markdown"] and "| full frame |" in result["markdown"]


def test_template_storages_are_compared_by_where_their_bytes_live(tmp_path):
    cfg = EngineBenchConfig(width=4, frame_size=(320, 240), batch_sizes=(1, 3), frames=6, naive_frames=0,
                            output_batch=3, storage_rounds=2, out=tmp_path / "engine.json")
    result = run(cfg, log=lambda *_: None)
    rows = {row["template_storage"]: row for row in json.loads(cfg.out.read_text())["template_storages"]}
    assert list(rows) == ["device", "host", "compressed"] and result["config"]["template_storage"] == "device"
    for row in rows.values():
        assert row["batch"] == 3 and row["end_to_end_fps"] > 0 and row["gather_ms"] >= 0
        assert len(row["end_to_end_fps_rounds"]) == row["rounds"] == 2
        # Private memory (device, host) and the prepared templates mapped from the store hold them all.
        assert row["device_bytes"] + row["host_bytes"] + row["mapped_bytes"] > row["template_bytes"] > 0
    # Off the device, only the weights stay there; compressed templates take less host memory than raw ones.
    assert rows["host"]["device_bytes"] == rows["compressed"]["device_bytes"] < rows["device"]["device_bytes"]
    assert rows["compressed"]["template_bytes"] < rows["host"]["template_bytes"] < rows["device"]["template_bytes"]
    assert "| compressed |" in result["markdown"] and "vs device" in result["markdown"]


def test_cli_takes_frame_size_and_identity_flag(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["bench", "engine", "--width", "4", "--frame-size", "96x64", "--batch-sizes", "1", "--frames", "2",
                 "--naive-frames", "2", "--output-batch", "2", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["identity_network"] is False and saved["naive_loop"]["frames"] == 2
    assert saved["config"]["image_size"] == [96, 64] and "IDENTITY" not in capsys.readouterr().out
    assert [row["template_storage"] for row in saved["template_storages"]] == ["device", "host", "compressed"]
    with pytest.raises(SystemExit):
        main(["bench", "engine", "--frame-size", "big"])


def test_cli_template_storage_list(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["bench", "engine", "--width", "4", "--frame-size", "96x64", "--batch-sizes", "2", "--frames", "2",
                 "--naive-frames", "0", "--output-batch", "2", "--template-storage", "compressed,host",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [row["template_storage"] for row in saved["template_storages"]] == ["compressed", "host"]
    assert saved["config"]["template_storage"] == "compressed" and "vs compressed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "engine", "--template-storage", "device,disk"])
    assert "unknown template storages ['disk']" in capsys.readouterr().err
