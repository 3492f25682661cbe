"""weight_sharding "blocks" through the whole product on a real ComfyUI server: the shipped Flux dev workflow with
its loader set to shard the blocks over a 2-worker pool gives the stock twin's latent, the workers hold half the
block weights each, and sharding on top of PipeFusion is refused before any work with the server still up."""
from __future__ import annotations

import pytest

from server_graphs import saved_latent

from comfyui_xdit.api_client import ComfyClient, PromptRejected
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux_dev_xdit_api.json"


def _offline(**loader_inputs) -> dict:
    # 144 px: 9 x 9 token rows, uneven over 2 ranks. The latent is compared, so the decode nodes go.
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_UNET_NAMES["dev"], size=144, steps=3)
    for node_id in ("12", "13", "14"):  # VAELoader, VAEDecode, SaveImage
        del workflow[node_id]
    workflow["1"]["inputs"].update(loader_inputs)
    workflow["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "sharded_xdit"}}
    return workflow


def test_the_shipped_flux_workflow_with_sharded_blocks_equals_its_stock_twin(comfy_server):
    client = ComfyClient(comfy_server.url)
    workflow = _offline(world_size=2, weight_sharding="blocks")
    stock = stock_twin(workflow)
    stock["99"]["inputs"]["filename_prefix"] = "sharded_stock"
    expected = saved_latent(comfy_server, client.run(stock, timeout=600))
    latent = saved_latent(comfy_server, client.run(workflow, timeout=900))
    assert latent.shape == expected.shape == (1, 16, 18, 18) and expected.abs().max() > 0.1
    assert (latent - expected).abs().max().item() <= FP32_TOL
    ranks = comfy_server.get_json("/xdit/status")["pool"]["ranks"]
    held = [rank["sharded_block_bytes"] for rank in ranks]
    whole = ranks[0]["whole_block_bytes"]
    assert len(held) == 2 and all(whole / 2 <= h < whole / 2 + 4096 for h in held), (held, whole)


def test_sharding_over_pipefusion_stages_is_refused_before_any_work(comfy_server):
    client = ComfyClient(comfy_server.url)
    with pytest.raises(PromptRejected, match="weight_sharding 'blocks' cannot be combined with pipefusion_degree 2"):
        client.run(_offline(world_size=2, pipefusion_degree=2, weight_sharding="blocks"), timeout=120)
    assert "XDiTUNetLoader" in client.object_info()  # the server is up
