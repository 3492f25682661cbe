"""XDiTKSampler / XDiTKSamplerAdvanced and live previews through a real ComfyUI server, on a local Ray pool.

Each KSampler graph (UNETLoader -> ModelSamplingFlux -> KSampler with a positive and a negative -> SaveLatent) runs
once as stock and once with only the loader and the sampler swapped for the XDiT nodes. Previews are asked for
the way the frontend asks (the prompt's extra_data "preview_method") and arrive as binary websocket frames.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server_graphs import flux_graph, ksampler_graph, saved_latent

from comfyui_xdit.api_client import ComfyClient, PromptResult
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES
from comfyui_xdit.workflow_tools import STOCK_TWINS, load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
ULYSSES2 = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}
CFG2 = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 2}
LATENT2RGB = {"preview_method": "latent2rgb"}
STEPS = 3


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.mark.parametrize(("xdit", "stock"), [("XDiTKSampler", "KSampler"), ("XDiTKSamplerAdvanced", "KSamplerAdvanced")])
def test_the_xdit_ksamplers_take_exactly_the_stock_inputs(client, xdit, stock):
    info = client.object_info()
    for key in ("input", "input_order", "output", "output_name", "output_is_list"):
        assert info[xdit][key] == info[stock][key], key
    assert info[xdit]["display_name"].endswith("(XDiT pool)")
    # workflow_tools.stock_twin keeps every stock input when it swaps the node back
    assert STOCK_TWINS[xdit][0] == stock
    assert sorted(STOCK_TWINS[xdit][1]) == sorted(name for section in info[stock]["input_order"].values() for name in section)


CASES = [
    ("ulysses2-cfg1", 1.0, "euler", None, ULYSSES2),
    ("cfg2-cfg3.5", 3.5, "euler", None, CFG2),  # CFGGuider with the negative, its two halves on two ranks
    ("ulysses2-cfg3.5-dpmpp2m", 3.5, "dpmpp_2m", None, ULYSSES2),
    # Seeded noise inside the loop: every rank draws the same, as one stock process would.
    ("ulysses2-euler-ancestral", 1.0, "euler_ancestral", None, ULYSSES2),
    ("cfg2-dpmpp2m-sde", 2.0, "dpmpp_2m_sde", None, CFG2),
    ("advanced-ulysses2-end2-leftover", 1.0, "euler", {"add_noise": "enable", "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}, ULYSSES2),
    ("advanced-cfg2-no-noise-from1", 2.0, "euler", {"add_noise": "disable", "start_at_step": 1, "end_at_step": 10000, "return_with_leftover_noise": "disable"}, CFG2),
]


@pytest.mark.parametrize(("name", "cfg", "sampler", "advanced", "degrees"), CASES, ids=[c[0] for c in CASES])
def test_xdit_ksampler_matches_the_stock_graph(comfy_server, client, name, cfg, sampler, advanced, degrees):
    graph = {"cfg": cfg, "sampler": sampler, "advanced": advanced, "steps": STEPS}
    stock = saved_latent(comfy_server, client.run(ksampler_graph(False, prefix=f"stock_ks_{name}", **graph), timeout=300))
    result = client.run(ksampler_graph(True, prefix=f"xdit_ks_{name}", **graph, **degrees), timeout=600)
    xdit = saved_latent(comfy_server, result)
    assert xdit.shape == stock.shape
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    progress = [data for kind, data in result.events if kind == "progress" and data.get("node") == "11"]
    assert progress and progress[-1]["value"] == progress[-1]["max"]
    assert result.previews == [], "no previews unless the prompt asks for them"


def _image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _check_previews(stock: PromptResult, xdit: PromptResult) -> None:
    assert len(stock.previews) == STEPS
    # Rank 0 hands over at most one preview per step (the newest, when the node polls), and always the last one.
    assert 1 <= len(xdit.previews) <= STEPS
    last_stock, last_xdit = _image(stock.previews[-1]), _image(xdit.previews[-1])
    assert last_xdit.shape == last_stock.shape  # the server scales both to --preview-size
    assert np.abs(last_xdit - last_stock).mean() < 1.0, "the last preview shows the same x0 as stock's"
    assert last_xdit.std() > 1.0, "the preview is an image, not a blank"


def test_xdit_ksampler_sends_live_previews(comfy_server, client):
    stock = client.run(ksampler_graph(False, seed=31, prefix="stock_ks_preview"), timeout=300, extra_data=LATENT2RGB)
    xdit = client.run(ksampler_graph(True, seed=31, prefix="xdit_ks_preview", **ULYSSES2), timeout=600, extra_data=LATENT2RGB)
    _check_previews(stock, xdit)
    assert (saved_latent(comfy_server, xdit) - saved_latent(comfy_server, stock)).abs().max().item() <= FP32_TOL


def test_xdit_sampler_custom_advanced_sends_live_previews(comfy_server, client):
    stock = client.run(flux_graph(False, seed=32, prefix="stock_sca_preview"), timeout=300, extra_data=LATENT2RGB)
    xdit = client.run(flux_graph(True, seed=32, prefix="xdit_sca_preview", **ULYSSES2), timeout=600, extra_data=LATENT2RGB)
    _check_previews(stock, xdit)


def test_a_stock_model_in_xdit_ksampler_is_refused_naming_the_fix(comfy_server, client):
    from comfyui_xdit.api_client import ExecutionFailed

    graph = ksampler_graph(False, seed=41, prefix="refused")
    graph["11"]["class_type"] = "XDiTKSampler"
    with pytest.raises(ExecutionFailed, match=r"XDiTKSampler needs a MODEL from XDiTUNetLoader; replace UNETLoader with XDiTUNetLoader"):
        client.run(graph, timeout=300)


def test_the_shipped_ksampler_workflow_runs_on_the_pool_like_its_stock_twin(comfy_server, client):
    """workflows/api/flux_dev_ksampler_xdit_api.json as shipped (pool size and degrees auto), offline on tiny weights."""
    workflow = make_offline(load_api_workflow(REPO_ROOT / "workflows" / "api" / "flux_dev_ksampler_xdit_api.json"),
                            TINY_UNET_NAMES["dev"], size=128, steps=STEPS)
    workflow["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "shipped_ks_xdit"}}
    stock = stock_twin(workflow)
    assert stock["11"]["class_type"] == "KSampler" and stock["11"]["inputs"].keys() == workflow["11"]["inputs"].keys()
    stock["99"]["inputs"]["filename_prefix"] = "shipped_ks_stock"
    xdit_result = client.run(workflow, timeout=600)
    assert {file.kind for file in xdit_result.files} == {"images", "latents"}
    difference = saved_latent(comfy_server, xdit_result) - saved_latent(comfy_server, client.run(stock, timeout=300))
    assert difference.abs().max().item() <= FP32_TOL
