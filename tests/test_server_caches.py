"""ComfyUI's own EasyCache between XDiTUNetLoader and the XDiT sampler, through a real server and a local Ray pool:
the shipped Flux workflow with the cache node inserted vs its stock twin with the same node."""
from __future__ import annotations

import pytest

from server_graphs import saved_latent

from comfyui_xdit.api_client import ComfyClient
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux_dev_xdit_api.json"
SIZE = 144  # an 18 x 18 latent: 9 x 9 tokens, rows divide neither degree
FP32_TOL = 1e-5


def _graph(prefix: str, xdit: bool, seed: int, cache: bool = True, **loader_inputs) -> dict:
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_UNET_NAMES["dev"], size=SIZE, steps=10)
    workflow["9"]["inputs"]["noise_seed"] = seed
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}}
    if cache:
        workflow["20"] = {"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": 0.1, "start_percent": 0.15,
                                                               "end_percent": 0.95, "verbose": False}}
        workflow["2"]["inputs"]["model"] = ["20", 0]
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


@pytest.mark.parametrize("degrees", [{"world_size": 2, "ulysses_degree": 2}, {"world_size": 2, "ring_degree": 2}], ids=["ulysses2", "ring2"])
def test_easycache_on_the_pool_matches_the_stock_graph(comfy_server, degrees):
    client = ComfyClient(comfy_server.url)
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    # Stock EasyCache reads start/end sigmas before the graph's ModelSamplingFlux patch is loaded on a model's first
    # run after loading, and after it from then on (the pool always reads the patched one): warm the stock model.
    client.run(_graph(f"cache_warm_{name}", False, seed=1), timeout=300)
    stock = saved_latent(comfy_server, client.run(_graph(f"cache_stock_{name}", False, seed=2), timeout=300))
    uncached = saved_latent(comfy_server, client.run(_graph(f"nocache_stock_{name}", False, seed=2, cache=False), timeout=300))
    xdit = saved_latent(comfy_server, client.run(_graph(f"cache_xdit_{name}", True, seed=2, **degrees), timeout=600))
    assert stock.abs().max() > 0.1
    assert (stock - uncached).abs().max().item() > 1e-3, "EasyCache skipped no step: the comparison proves nothing"
    assert (xdit - stock).abs().max().item() <= FP32_TOL
