"""The shipped Lumina 2 workflow through a real ComfyUI server on tiny Lumina 2 weights: XDiT loader and sampler on a
local Ray pool vs the same graph with the stock nodes, on a latent whose token rows do not divide the degree."""
from __future__ import annotations

import pytest

from server_graphs import link_tiny_model, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

WORKFLOW = REPO_ROOT / "workflows" / "api" / "lumina2_xdit_api.json"
TINY_NAME = "tiny-lumina2.safetensors"
SIZE = 144  # an 18 x 18 latent: 81 tokens of 2 x 2 patches
CAPTION_WIDTH = 2304  # Gemma 2 2B's hidden size, Lumina 2's caption input
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def client(comfy_server, tiny_model_path) -> ComfyClient:
    link_tiny_model(comfy_server, tiny_model_path("lumina2"), TINY_NAME)
    return ComfyClient(comfy_server.url)


def _graph(prefix: str, xdit: bool, **loader_inputs) -> dict:
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_NAME, size=SIZE, steps=3, context_dim=CAPTION_WIDTH)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


# One prompt pair: auto degrees at world 2 give Lumina 2 ulysses 2 (its 24 heads split); the 1.7 GB tiny file makes
# each prompt slow here, and the exactness suite covers ring, cfg and data on the same hooks.
@pytest.mark.parametrize("degrees", [{"world_size": 2}], ids=["shipped-auto-2"])
def test_shipped_lumina2_workflow_matches_the_stock_graph(comfy_server, client, degrees):
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    stock = saved_latent(comfy_server, client.run(_graph(f"lumina2_stock_{name}", False), timeout=300))
    xdit = saved_latent(comfy_server, client.run(_graph(f"lumina2_xdit_{name}", True, **degrees), timeout=600))
    assert xdit.shape == stock.shape == (1, 16, SIZE // 8, SIZE // 8)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == degrees["world_size"]


def test_lumina2_refuses_pipefusion_by_name(client):
    with pytest.raises(ExecutionFailed, match=r"Lumina 2 supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1"):
        client.run(_graph("lumina2_refused", True, world_size=2, pipefusion_degree=2), timeout=300)
