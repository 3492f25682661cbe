"""The README's main job (`python -m comfyui_xdit demo`) runs end to end, at its quickest settings."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

pytestmark = pytest.mark.server


def test_demo_writes_an_image_and_reports_timings(run_cli, comfy_root, tmp_path):
    result = run_cli("demo", "--size", "tiny", "--pixels", "128", "--steps", "2", "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (image,) = summary["image"]
    with Image.open(image) as picture:
        assert picture.size == (128, 128)
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["stock_s"] > 0 and summary["xdit_s"] > 0 and summary["pool_startup_s"] > 0
    assert "image written:" in result.stdout
    # The ratio is explained for the hardware it ran on (CPU workers here share the cores stock used).
    assert f"{os.cpu_count()} CPU cores shared by 2 workers" in result.stdout
    # The pool started with ComfyUI (the demo's XDIT_PRESTART_WORKERS), so the first prompt kept its workers and
    # only loaded the model; the breakdown says where that prompt went.
    assert summary["pool_started_with_comfyui_s"] > 0 and summary["cold_start"]["new_workers"] == 2
    assert summary["cold_start"]["ray_s"] > 0 and summary["cold_start"]["loads_s"] > 0 and summary["cold_start"]["first_step_s"] > 0
    assert "pool started with ComfyUI, before the prompt" in result.stdout and "model loads on the workers" in result.stdout
