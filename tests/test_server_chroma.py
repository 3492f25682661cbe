"""The shipped Chroma workflow through a real ComfyUI server on a tiny Chroma file (the smallest one stock detection
takes: width 3072, one double block; 2 GB, so world 2 only): XDiT loader and sampler on a local Ray pool vs the
same graph with the stock nodes, on a latent whose token rows do not divide the degrees."""
from __future__ import annotations

import pytest

from server_graphs import link_tiny_model, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

WORKFLOW = REPO_ROOT / "workflows" / "api" / "chroma_xdit_api.json"
TINY_NAME = "tiny-chroma.safetensors"
SIZE = 144  # an 18 x 18 latent: 81 tokens of 2 x 2 patches
FP32_TOL = 1e-5
RELATIVE_TOL = 2e-6  # CFG amplifies rounding: relative to the latent's size where that is larger


@pytest.fixture(scope="module")
def client(comfy_server, tiny_model_path) -> ComfyClient:
    # Linked here, not in the shared server fixture: only this module pays for writing the 2 GB file.
    link_tiny_model(comfy_server, tiny_model_path("chroma"), TINY_NAME)
    return ComfyClient(comfy_server.url)


def _graph(prefix: str, xdit: bool, **loader_inputs) -> dict:
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_NAME, size=SIZE, steps=2)  # ~10 s a step here
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


@pytest.fixture(scope="module")
def stock(comfy_server, client):
    return saved_latent(comfy_server, client.run(_graph("chroma_stock", False), timeout=600))


@pytest.mark.parametrize("degrees", [{"world_size": 2}, {"world_size": 2, "ring_degree": 2, "cfg_degree": 1}],
                         ids=["shipped-auto-2", "ring2"])
def test_shipped_chroma_workflow_matches_the_stock_graph(comfy_server, client, stock, degrees):
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    xdit = saved_latent(comfy_server, client.run(_graph(f"chroma_xdit_{name}", True, **degrees), timeout=900))
    assert xdit.shape == stock.shape == (1, 16, SIZE // 8, SIZE // 8)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= max(FP32_TOL, RELATIVE_TOL * stock.abs().max().item())
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == degrees["world_size"]


def test_chroma_refuses_pipefusion_by_name(client):
    with pytest.raises(ExecutionFailed, match=r"Chroma supports ulysses, ring, cfg and data parallel only "
                                              r"\(PipeFusion and patch parallel have no Chroma hooks yet\); set pipefusion_degree to 1"):
        client.run(_graph("chroma_refused", True, world_size=2, pipefusion_degree=2), timeout=300)
