"""PipeFusion and displaced patch parallel through a real ComfyUI server: the shipped PipeFusion workflow, its
sampler options, the per-stage weights seen in GET /xdit/status, and a bad patch count refused before work."""
from __future__ import annotations

import pytest
from server_graphs import flux_graph, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, set_input, stock_twin

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
PIPEFUSION_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux_dev_pipefusion_xdit_api.json"
STEPS = 6


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


def _offline(workflow: dict, prefix: str) -> dict:
    workflow = make_offline(workflow, TINY_UNET_NAMES["dev"], size=128, steps=STEPS)
    sampler = next(node_id for node_id, node in workflow.items() if "SamplerCustomAdvanced" in node["class_type"])
    workflow["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return workflow


def test_shipped_pipefusion_workflow_is_exact_at_full_warmup_and_close_at_defaults(comfy_server, client):
    shipped = load_api_workflow(PIPEFUSION_WORKFLOW)
    stock = saved_latent(comfy_server, client.run(_offline(stock_twin(shipped), "pf_stock"), timeout=300))
    defaults = saved_latent(comfy_server, client.run(_offline(shipped, "pf_defaults"), timeout=600))
    # euler, BasicGuider: the first stage ran every call after the second's first patch ahead (pipefusion_lookahead)
    assert [r["pipefusion_lookahead"] for r in comfy_server.get_json("/xdit/status")["pool"]["ranks"]] == [[STEPS - 2, 0], [0, 0]]
    exact = _offline(shipped, "pf_exact")
    set_input(exact, "XDiTSamplerCustomAdvanced", "warmup_steps", STEPS)
    exact = saved_latent(comfy_server, client.run(exact, timeout=600))
    assert stock.abs().max() > 0.1
    assert (exact - stock).abs().max().item() <= FP32_TOL
    error = (defaults - stock).abs().max().item()
    assert 0 < error < 0.1 * stock.abs().max().item(), f"PipeFusion at defaults: max abs error {error:.3e}"
    pool = comfy_server.get_json("/xdit/status")["pool"]
    held = [rank["block_parameters_held"] for rank in pool["ranks"]]
    total = pool["ranks"][0]["block_parameters_total"]
    assert len(held) == 2 and all(0 < h < total for h in held) and sum(held) == total, "each stage loads only its blocks"


def test_displaced_patch_parallel_through_the_server(comfy_server, client):
    degrees = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 1, "patch_degree": 2}
    stock = saved_latent(comfy_server, client.run(flux_graph(False, "cfg", prefix="patch_stock"), timeout=300))
    exact = client.run(flux_graph(True, "cfg", prefix="patch_exact", sampler_inputs={"warmup_steps": 3}, **degrees), timeout=600)
    assert (saved_latent(comfy_server, exact) - stock).abs().max().item() <= FP32_TOL
    stale = saved_latent(comfy_server, client.run(flux_graph(True, "cfg", prefix="patch_stale", **degrees), timeout=600))
    assert 0 < (stale - stock).abs().max().item() < 0.1 * stock.abs().max().item()


def test_a_bad_patch_count_fails_before_work_and_the_server_stays_up(comfy_server, client):
    degrees = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 1, "pipefusion_degree": 2}
    jobs_before = comfy_server.get_json("/xdit/status")["pool"]["jobs_run"]
    graph = flux_graph(True, prefix="bad_patches", sampler_inputs={"num_pipeline_patch": 5}, **degrees)
    with pytest.raises(ExecutionFailed, match="num_pipeline_patch 5 cuts 8 token rows .* choose a number of patches that divides 8: 1, 2, 4, 8"):
        client.run(graph, timeout=300)
    assert comfy_server.get_json("/xdit/status")["pool"]["jobs_run"] == jobs_before, "the pool ran nothing"
    client.run(flux_graph(True, prefix="good_patches", sampler_inputs={"num_pipeline_patch": 4}, **degrees), timeout=600)


def test_more_stages_than_blocks_is_refused_at_the_loader(client):
    degrees = {"world_size": 4, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 1, "pipefusion_degree": 4}
    with pytest.raises(ExecutionFailed, match="pipefusion_degree 4 is more stages than the model's 2 transformer blocks; use at most 2"):
        client.run(flux_graph(True, prefix="too_many_stages", **degrees), timeout=300)
