"""A quantized checkpoint through a real ComfyUI server: the shipped Flux dev workflow on a tiny scaled-fp8 Flux, on
the XDiT pool (sequence parallel, and PipeFusion with per-stage loading of the fp8 weights at full warmup) against the
same graph with the stock nodes; a file in a quant format this ComfyUI does not know is refused at the loader, naming
the file and the format, and the server serves the next prompt."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from server_graphs import link_tiny_model, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.testing.tiny_quant import config_tensor, quantize_file
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
SCALED_NAME = "tiny-flux-dev-scaled-fp8.safetensors"
UNKNOWN_NAME = "tiny-flux-dev-unknown-quant.safetensors"


@pytest.fixture(scope="module")
def client(comfy_server, tiny_flux_paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized_server")
    scaled = quantize_file(tiny_flux_paths["dev"], folder / SCALED_NAME, "scaled_fp8")
    link_tiny_model(comfy_server, scaled, SCALED_NAME)
    # per-layer configs (in a scaled-fp8 file ComfyUI writes its own configs over any the file has)
    tensors = load_file(str(quantize_file(tiny_flux_paths["dev"], folder / "float8.safetensors", "float8_e4m3fn")))
    tensors["double_blocks.0.img_attn.qkv.comfy_quant"] = config_tensor({"format": "float3_e1m1"})
    save_file(tensors, str(folder / UNKNOWN_NAME))
    link_tiny_model(comfy_server, folder / UNKNOWN_NAME, UNKNOWN_NAME)
    return ComfyClient(comfy_server.url)


def _graph(unet_name: str, prefix: str, xdit: bool, sampler_inputs: dict | None = None, **loader_inputs) -> dict:
    workflow = make_offline(load_api_workflow(REPO_ROOT / "workflows" / "api" / "flux_dev_xdit_api.json"), unet_name, size=144, steps=3)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    workflow["11"]["inputs"].update(sampler_inputs or {})
    return workflow


def test_shipped_flux_workflow_on_a_scaled_fp8_checkpoint_matches_stock(comfy_server, client):
    expected = saved_latent(comfy_server, client.run(_graph(SCALED_NAME, "scaled_fp8_stock", False), timeout=600))
    assert expected.abs().max() > 0.1
    runs = {"auto-2": ({"world_size": 2}, None),
            # every step a warmup step: PipeFusion is exact there, and each worker loads only its stage's fp8 blocks
            "pipefusion-2": ({"world_size": 2, "pipefusion_degree": 2, "ulysses_degree": 1}, {"warmup_steps": 10_000})}
    for name, (loader_inputs, sampler_inputs) in runs.items():
        xdit = saved_latent(comfy_server, client.run(_graph(SCALED_NAME, f"scaled_fp8_{name}", True, sampler_inputs, **loader_inputs), timeout=900))
        assert xdit.shape == expected.shape == (1, 16, 18, 18)
        assert (xdit - expected).abs().max().item() <= FP32_TOL, name


def test_an_unknown_quant_format_is_refused_at_the_loader_and_the_server_serves_on(comfy_server, client):
    with pytest.raises(ExecutionFailed, match=rf"{UNKNOWN_NAME}: layer double_blocks.0.img_attn.qkv is quantized as 'float3_e1m1', "
                                              r"a format this ComfyUI does not know"):
        client.run(_graph(UNKNOWN_NAME, "unknown_quant", True, world_size=2), timeout=300)
    assert client.run(_graph(SCALED_NAME, "after_refusal", True, world_size=2), timeout=600).files
