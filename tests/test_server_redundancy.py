"""XDiTRedundancyAnalysis and XDiTCacheSchedule through a real server and a local Ray pool (world 2, ulysses 2), on
the shipped Flux workflow's graph: the analysis saves its numbers and figure, and samples what the unscheduled graph
samples; a schedule from the saved file that skips nothing is that graph bit for bit, one that skips changes the
result and gives the same latent with PipeFusion 2 at full warmup (each worker holding one block), where the analysis
is refused; a schedule for another model's analysis is refused naming both models."""
from __future__ import annotations

import json

import pytest
import torch

from server_graphs import saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline

pytestmark = pytest.mark.server

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux_dev_xdit_api.json"
STEPS = 6
DEGREES = {"world_size": 2, "ulysses_degree": 2}


def _graph(prefix: str, variant: str = "dev", analyse: bool = False, schedule: dict | None = None, degrees: dict = DEGREES) -> dict:
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_UNET_NAMES[variant], size=144, steps=STEPS)  # 9 x 9 tokens
    workflow["9"]["inputs"]["noise_seed"] = 3
    workflow["1"]["inputs"].update(degrees)
    if degrees.get("pipefusion_degree", 1) > 1:
        workflow["11"]["inputs"]["warmup_steps"] = STEPS  # every step synchronous: PipeFusion is exact
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 2 if analyse else 0], "filename_prefix": prefix}}
    if analyse:
        workflow["11"]["class_type"] = "XDiTRedundancyAnalysis"
        workflow["16"] = {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": f"{prefix}_figure"}}
    if schedule is not None:
        workflow["20"] = {"class_type": "XDiTCacheSchedule", "inputs": {"model": ["1", 0], "granularity": "blocks", "max_estimated_error": 0.0, **schedule}}
        workflow["2"]["inputs"]["model"] = ["20", 0]
    return workflow


def test_analysis_file_drives_a_schedule_on_the_pool(comfy_server):
    client = ComfyClient(comfy_server.url)
    result = client.run(_graph("redund_analysis", analyse=True), timeout=600)
    analysed = saved_latent(comfy_server, result)
    assert [f for f in result.files if f.kind == "images"], "the figure was not saved"
    files = sorted(comfy_server.output_dir.glob("xdit_analysis_tiny-flux-dev_*.json"))
    assert files, "no analysis file in the output folder"
    analysis = json.loads(files[-1].read_text())
    assert analysis["model"]["file"] == TINY_UNET_NAMES["dev"] and analysis["steps"] == STEPS
    assert analysis["blocks"] == ["double_blocks.0", "single_blocks.0"] and analysis["degrees"]["ulysses_degree"] == 2
    assert all(v > 0 for row in analysis["output_change"][1:] for v in row)
    choice = f"output/{files[-1].name}"

    # Measuring reads the blocks' tensors and changes nothing: the analysis sampled the unscheduled graph's latent.
    none = saved_latent(comfy_server, client.run(_graph("redund_none", schedule={"analysis_file": choice, "skip_steps": 0.0}), timeout=600))
    assert torch.equal(none, analysed)
    skipped = saved_latent(comfy_server, client.run(_graph("redund_skip", schedule={"analysis_file": choice, "skip_steps": 2.0}), timeout=600))
    assert torch.isfinite(skipped).all() and (skipped - none).abs().max().item() > 1e-4

    # The same schedule with PipeFusion 2 at full warmup: the same skips and residuals, the same latent.
    pipefusion = {"world_size": 2, "pipefusion_degree": 2}
    piped = saved_latent(comfy_server, client.run(_graph("redund_skip_pf", schedule={"analysis_file": choice, "skip_steps": 2.0},
                                                         degrees=pipefusion), timeout=600))
    err = (piped - skipped).abs().max().item()
    print(f"PipeFusion 2 schedule vs ulysses 2 schedule: {err:.3e}")
    assert err <= max(1e-5, 2e-6 * skipped.abs().max().item()), err
    with pytest.raises(ExecutionFailed, match="XDiTRedundancyAnalysis cannot run with pipefusion_degree 2"):
        client.run(_graph("redund_analysis_pf", analyse=True, degrees=pipefusion), timeout=600)

    with pytest.raises(ExecutionFailed, match=r"made for tiny-flux-dev\.safetensors.*loaded model tiny-flux-schnell\.safetensors"):
        client.run(_graph("redund_foreign", variant="schnell", schedule={"analysis_file": choice, "skip_steps": 1.0}), timeout=600)
