"""``lipsync bench load``: a real (tiny) run, zip and prepared store to the first frame in fresh processes."""

from __future__ import annotations

import json

import pytest

from inference_pod.cli import main


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/smaps_rollup").exists(), reason="needs /proc")
def test_bench_load_measures_both_paths_and_the_shared_crops(tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main(["bench", "load", "--sizes", "64x64", "--templates", "30", "--template-storage", "host,compressed",
                 "--derived", "--distinct", "5", "--work-dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["size"], row["templates"]) == ("64x64", 30)
    assert row["zip"]["prepared"] and row["store"]["prepared"] and not row["derived"]["prepared"]
    crops = 30 * 328 * 328 * 3
    second, first = row["store"]["memory"], row["store"]["first_memory"]
    assert second["crops_rss"] >= crops * 0.9 and second["crops_private"] == 0  # all resident, none its own
    assert second["crops_pss"] < second["crops_rss"] and first["crops_pss"] < first["crops_rss"]
    assert row["derived"]["private_bytes"] > row["store"]["private_bytes"] + crops  # derived: a private copy
    assert row["storages"]["compressed"]["mapped_bytes"] < row["store"]["mapped_bytes"]
    assert row["pod"]["source"] == "store" and 0 < row["pod"]["load_s"] < row["pod"]["first_frame_s"]
    assert row["decode_s"] > 0 and "| 64x64 x 30 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.json"]  # the synthetic character is gone
