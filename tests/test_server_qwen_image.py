"""Qwen-Image through the whole product on a real ComfyUI server: XDiT loader and sampler on a local Ray pool give
the stock graph's latent (the shipped workflow's sampling path, server_graphs.qwen_image_graph; the shipped KSampler
workflow as it is), and what the family does not take is refused by name."""
from __future__ import annotations

import pytest

from server_graphs import TINY_QWEN_IMAGE_NAME, link_tiny_model, qwen_image_graph, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
RELATIVE_TOL = 2e-6  # CFG amplifies rounding: relative to the latent's size where that is larger
KSAMPLER_WORKFLOW = REPO_ROOT / "workflows" / "api" / "qwen_image_ksampler_xdit_api.json"
QWEN_TEXT_WIDTH = 3584  # Qwen2.5-VL's hidden size, what the model's text input takes


@pytest.fixture(scope="module")
def client(comfy_server, tiny_model_path) -> ComfyClient:
    # Linked here, not in the shared server fixture: only this module pays for writing the 1.5 GB file.
    link_tiny_model(comfy_server, tiny_model_path("qwen_image"), TINY_QWEN_IMAGE_NAME)
    return ComfyClient(comfy_server.url)


def test_xdit_nodes_match_the_stock_graph_with_ring_attention(comfy_server, client):
    stock = saved_latent(comfy_server, client.run(qwen_image_graph(False, prefix="qwen_stock"), timeout=600))
    xdit = saved_latent(comfy_server, client.run(qwen_image_graph(True, prefix="qwen_xdit_usp", world_size=2, ulysses_degree=1,
                                                                  ring_degree=2, cfg_degree=1), timeout=900))
    assert xdit.shape == stock.shape == (1, 16, 1, 18, 22)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= max(FP32_TOL, RELATIVE_TOL * stock.abs().max().item())
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == 2


def test_pipefusion_stages_beyond_the_blocks_are_refused_by_name(client):
    # Qwen-Image takes PipeFusion (test_flux_parallel, on a two-block model); the tiny file has one block.
    with pytest.raises(ExecutionFailed, match=r"pipefusion_degree 2 is more stages than the model's 1 transformer blocks; use at most 1"):
        client.run(qwen_image_graph(True, prefix="qwen_refused", world_size=2, pipefusion_degree=2), timeout=600)


def test_the_shipped_ksampler_workflow_runs_on_the_pool_like_its_stock_twin(comfy_server, client):
    """workflows/api/qwen_image_ksampler_xdit_api.json (degrees auto) offline on the tiny model, 144 px: 9 x 9 token rows.
    The decode nodes are dropped: the tiny VAE (taef1) is Flux's, and Qwen-Image's 5-D latents are compared directly."""
    workflow = make_offline(load_api_workflow(KSAMPLER_WORKFLOW), TINY_QWEN_IMAGE_NAME, size=144, steps=3, context_dim=QWEN_TEXT_WIDTH)
    for node_id in ("12", "13", "14"):  # VAELoader, VAEDecode, SaveImage
        del workflow[node_id]
    workflow["1"]["inputs"]["world_size"] = 2
    workflow["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "qwen_ks_xdit"}}
    stock = stock_twin(workflow)
    assert stock["11"]["class_type"] == "KSampler" and stock["11"]["inputs"].keys() == workflow["11"]["inputs"].keys()
    stock["99"]["inputs"]["filename_prefix"] = "qwen_ks_stock"
    expected = saved_latent(comfy_server, client.run(stock, timeout=600))
    latent = saved_latent(comfy_server, client.run(workflow, timeout=900))
    assert latent.shape == expected.shape == (1, 16, 1, 18, 18)
    assert expected.abs().max() > 0.1
    assert (latent - expected).abs().max().item() <= max(FP32_TOL, RELATIVE_TOL * expected.abs().max().item())
