"""The shipped HunyuanVideo text-to-video workflow through a real ComfyUI server on tiny HunyuanVideo 1.0 weights: XDiT
loader and sampler on a local Ray pool vs the same graph with the stock nodes, on a video latent of odd frames whose
token count (3 frames x 5 x 7) divides neither degree; PipeFusion refused by the family's name, the server staying up."""
from __future__ import annotations

import pytest

from server_graphs import link_tiny_model, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

WORKFLOW = REPO_ROOT / "workflows" / "api" / "hunyuan_video_t2v_xdit_api.json"
TINY_NAME = "tiny-hunyuan-video.safetensors"
TEXT_WIDTH, POOLED_WIDTH = 64, 768  # the tiny model's text input; CLIP-L's pooled width, which detection fixes
FP32_TOL = 1e-5


def _graph(prefix: str, xdit: bool, **loader_inputs) -> dict:
    """The shipped graph offline (seeded stand-in text, tiny weights, 3 steps), saving the sampled latent: there is no
    tiny HunyuanVideo VAE, so the decode and video save are left out. 9 frames of 112 x 80 px are a 3 x 10 x 14 latent."""
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_NAME, steps=3, context_dim=TEXT_WIDTH, pooled_dim=POOLED_WIDTH)
    for node_id in ("12", "13", "14"):  # VAELoader, VAEDecode, SaveAnimatedWEBP
        del workflow[node_id]
    workflow["10"]["inputs"].update(width=112, height=80, length=9)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


def test_shipped_hunyuan_video_workflow_matches_the_stock_graph_and_refuses_pipefusion(comfy_server, tiny_model_path):
    link_tiny_model(comfy_server, tiny_model_path("hunyuan_video"), TINY_NAME)
    client = ComfyClient(comfy_server.url)
    stock = saved_latent(comfy_server, client.run(_graph("hunyuan_video_stock", False), timeout=300))
    xdit = saved_latent(comfy_server, client.run(_graph("hunyuan_video_xdit", True, world_size=2), timeout=600))
    assert xdit.shape == stock.shape == (1, 16, 3, 10, 14)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == 2
    with pytest.raises(ExecutionFailed, match=r"HunyuanVideo supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1"):
        client.run(_graph("hunyuan_video_refused", True, world_size=2, pipefusion_degree=2), timeout=300)
