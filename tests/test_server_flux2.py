"""The shipped Flux.2 dev workflow through a real ComfyUI server on tiny Flux.2 weights: XDiT loader and sampler on a
local Ray pool vs the same graph with the stock nodes, on a latent whose token rows do not divide the degrees."""
from __future__ import annotations

import pytest

from server_graphs import link_tiny_model, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_dev_xdit_api.json"
TINY_NAME = "tiny-flux2.safetensors"
SIZE = 144  # a 9 x 9 latent of 128 channels: 81 tokens of 1 x 1 patches
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def client(comfy_server, tiny_model_path) -> ComfyClient:
    link_tiny_model(comfy_server, tiny_model_path("flux2"), TINY_NAME)
    return ComfyClient(comfy_server.url)


def _graph(prefix: str, xdit: bool, **loader_inputs) -> dict:
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_NAME, size=SIZE, steps=3)
    # The tiny VAE (taef1) is Flux.1's 16-channel one: the 128-channel latents are compared directly.
    for node_id in ("12", "13", "14"):  # VAELoader, VAEDecode, SaveImage
        del workflow[node_id]
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


@pytest.mark.parametrize("degrees", [{"world_size": 2}, {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1}],
                         ids=["shipped-auto-2", "ulysses2-ring2"])
def test_shipped_flux2_workflow_matches_the_stock_graph(comfy_server, client, degrees):
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    stock = saved_latent(comfy_server, client.run(_graph(f"flux2_stock_{name}", False), timeout=300))
    xdit = saved_latent(comfy_server, client.run(_graph(f"flux2_xdit_{name}", True, **degrees), timeout=600))
    assert xdit.shape == stock.shape == (1, 128, SIZE // 16, SIZE // 16)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == degrees["world_size"]


def test_flux2_refuses_pipefusion_by_name(client):
    with pytest.raises(ExecutionFailed, match=r"Flux\.2 supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1"):
        client.run(_graph("flux2_refused", True, world_size=2, pipefusion_degree=2), timeout=300)
