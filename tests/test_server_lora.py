"""LoRA through a real ComfyUI server: XDiTLoraLoader on the Ray pool vs stock LoraLoaderModelOnly, over HTTP + ws.

The graphs are test_server_pool's flux_graph with LoRA nodes between the loader and ModelSamplingFlux; the LoRA
files are written by comfyui_xdit.testing.tiny_loras into the server's models/loras in the trainers' key formats.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES
from comfyui_xdit.testing.tiny_loras import flux_lora, flux_shapes, write_flux_lora
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, set_input, stock_twin
from server_graphs import flux_graph, saved_latent
from test_server_pool import FP32_TOL

pytestmark = pytest.mark.server

ULYSSES2 = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}
RING2 = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 2, "cfg_degree": 1}
CFG2 = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 2}
PIPEFUSION2 = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 1, "pipefusion_degree": 2}
ALL_WARMUP = {"warmup_steps": 100}  # every step synchronous: PipeFusion is exact
# name -> (format, rank, seed)
LORAS = {"a": ("kohya", 4, 1), "b": ("diffusers", 8, 2), "c": ("loha", 4, 3), "d": ("lokr", 4, 4)}


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="module")
def loras(comfy_server, tiny_flux_paths) -> dict[str, str]:
    """File names in the server's models/loras: the LORAS, plus 'nomatch' (SDXL keys) and 'misfit' (one wrong shape)."""
    folder = comfy_server.models_dir("loras")
    folder.mkdir(parents=True, exist_ok=True)  # ComfyUI picks up a model folder made after it started
    shapes = flux_shapes(tiny_flux_paths["dev"])
    names = {}
    for name, (fmt, rank, seed) in LORAS.items():
        names[name] = write_flux_lora(folder / f"{name}-{fmt}-r{rank}.safetensors", shapes, fmt, rank, seed).name
    save_file({f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_{p}.lora_{d}.weight": torch.zeros(4, 4)
               for p in "qk" for d in ("up", "down")}, str(folder / "sdxl.safetensors"))
    misfit = flux_lora(shapes, "kohya", rank=4, seed=5)
    misfit["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.zeros(4, 255)
    save_file(misfit, str(folder / "misfit.safetensors"))
    return {**names, "nomatch": "sdxl.safetensors", "misfit": "misfit.safetensors"}


def lora_graph(xdit: bool, stack: list[tuple[str, float]], **kwargs) -> dict:
    """flux_graph with one LoRA node per (file, strength) chained between the loader and ModelSamplingFlux."""
    graph = flux_graph(xdit, **kwargs)
    source = ["1", 0]
    for i, (name, strength) in enumerate(stack):
        node = str(20 + i)
        graph[node] = {"class_type": "XDiTLoraLoader" if xdit else "LoraLoaderModelOnly",
                       "inputs": {"model": source, "lora_name": name, "strength_model": strength}}
        source = [node, 0]
    graph["2"]["inputs"]["model"] = source
    return graph


def ranks(server) -> list[dict]:
    return server.get_json("/xdit/status")["pool"]["ranks"]


STACKS = [
    ("kohya-ulysses2", [("a", 0.8)], "basic", ULYSSES2),
    ("kohya+diffusers-cfg2", [("a", 0.8), ("b", -0.6)], "cfg", CFG2),
    ("loha+lokr-ring2", [("c", 1.0), ("d", 0.7)], "basic", RING2),
    ("kohya-pipefusion2", [("a", 0.8)], "cfg", PIPEFUSION2),  # each stage merges only its own blocks' patches
]


@pytest.mark.parametrize(("name", "stack", "guider", "degrees"), STACKS, ids=[s[0] for s in STACKS])
def test_xdit_loras_match_stock_lora_loaders(comfy_server, client, loras, name, stack, guider, degrees):
    files = [(loras[key], strength) for key, strength in stack]
    stock = saved_latent(comfy_server, client.run(lora_graph(False, files, guider=guider, prefix=f"lora_stock_{name}"), timeout=300))
    base = saved_latent(comfy_server, client.run(flux_graph(False, guider, prefix=f"lora_base_{name}"), timeout=300))
    xdit = saved_latent(comfy_server, client.run(lora_graph(True, files, guider=guider, prefix=f"lora_xdit_{name}", sampler_inputs=ALL_WARMUP,
                                                            **degrees), timeout=600))
    assert (stock - base).abs().max() > 0.05, "the LoRAs change the result"
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    assert ranks(comfy_server)[0]["loras"] == [f"{n}@{s:g}" for n, s in files]


def test_strength_zero_and_no_lora_give_the_base_result_bit_for_bit(comfy_server, client, loras):
    def run(stack, prefix):
        return saved_latent(comfy_server, client.run(lora_graph(True, stack, prefix=prefix, **ULYSSES2), timeout=600))

    base = run([], "zero_base")
    with_a = run([(loras["a"], 0.8)], "zero_a")
    assert (with_a - base).abs().max() > 0.05
    assert torch.equal(run([(loras["a"], 0.0)], "zero_strength"), base)
    assert torch.equal(run([], "zero_none"), base), "the weights the LoRA changed are the loaded ones again"


def test_switching_a_b_a_gives_a_again_and_loads_no_base_weights(comfy_server, client, loras):
    def run(key, prefix):
        return saved_latent(comfy_server, client.run(lora_graph(True, [(loras[key], 0.8)], prefix=prefix, **RING2), timeout=600))

    first_a = run("a", "switch_a1")
    before = comfy_server.get_json("/xdit/status")["pool"]
    b = run("b", "switch_b")
    again_a = run("a", "switch_a2")
    after = comfy_server.get_json("/xdit/status")["pool"]
    assert (b - first_a).abs().max() > 0.05
    assert torch.equal(again_a, first_a)
    assert after["jobs_run"] == before["jobs_run"] + 2
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    for rank_before, rank_after in zip(before["ranks"], after["ranks"]):
        assert rank_after["model_loads"] == rank_before["model_loads"], "a LoRA switch reloads no base weights"
        assert rank_after["parallel_builds"] == rank_before["parallel_builds"]
        assert rank_after["lora_switches"] == rank_before["lora_switches"] + 2
        assert rank_after["lora_keys_changed"] > 0


def test_a_lora_rewritten_under_the_same_name_is_read_again(comfy_server, client, tiny_flux_paths):
    folder, shapes = comfy_server.models_dir("loras"), flux_shapes(tiny_flux_paths["dev"])

    def run(name, prefix):
        return saved_latent(comfy_server, client.run(lora_graph(True, [(name, 0.8)], prefix=prefix, **ULYSSES2), timeout=600))

    write_flux_lora(folder / "trained.safetensors", shapes, "kohya", rank=4, seed=11)
    first = run("trained.safetensors", "rewrite_1")
    write_flux_lora(folder / "trained.safetensors", shapes, "kohya", rank=4, seed=12)  # the trainer's next save
    write_flux_lora(folder / "trained-copy.safetensors", shapes, "kohya", rank=4, seed=12)
    second = run("trained.safetensors", "rewrite_2")
    assert (second - first).abs().max() > 0.05
    assert torch.equal(second, run("trained-copy.safetensors", "rewrite_copy"))


def test_bad_loras_fail_clearly_before_any_work_and_the_pool_keeps_serving(comfy_server, client, loras):
    client.run(lora_graph(True, [(loras["a"], 0.8)], prefix="bad_warm", **ULYSSES2), timeout=600)
    before = comfy_server.get_json("/xdit/status")["pool"]
    with pytest.raises(ExecutionFailed, match=r"none of its 4 keys match this Flux model \(0 of 4 matched; e.g. "
                                              r"'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight'\)") as nomatch:
        client.run(lora_graph(True, [(loras["nomatch"], 1.0)], prefix="bad_nomatch", **ULYSSES2), timeout=300)
    assert nomatch.value.node_type == "XDiTLoraLoader"
    with pytest.raises(ExecutionFailed, match=r"1 of its \d+ weight patches do not fit this Flux model, e.g. "
                                              r"diffusion_model.double_blocks.0.img_attn.proj.weight of shape \(256, 256\)"):
        client.run(lora_graph(True, [(loras["a"], 0.5), (loras["misfit"], 1.0)], prefix="bad_misfit", **ULYSSES2), timeout=300)
    assert comfy_server.get_json("/xdit/status")["pool"]["jobs_run"] == before["jobs_run"], "refused before any work"
    client.run(lora_graph(True, [(loras["b"], 0.8)], prefix="bad_after", **ULYSSES2), timeout=600)
    after = comfy_server.get_json("/xdit/status")["pool"]
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    assert after["jobs_run"] == before["jobs_run"] + 1


def test_stock_lora_loader_and_xdit_lora_loader_refuse_the_other_loaders_model(comfy_server, client, loras):
    stock_on_xdit = lora_graph(True, [(loras["a"], 0.8)], prefix="mix_stock_lora", **ULYSSES2)
    stock_on_xdit["20"]["class_type"] = "LoraLoaderModelOnly"
    with pytest.raises(ExecutionFailed, match="weight patches .* use XDiTLoraLoader"):
        client.run(stock_on_xdit, timeout=300)
    xdit_on_stock = lora_graph(False, [(loras["a"], 0.8)], prefix="mix_xdit_lora")
    xdit_on_stock["20"]["class_type"] = "XDiTLoraLoader"
    with pytest.raises(ExecutionFailed, match="XDiTLoraLoader needs a MODEL from XDiTUNetLoader; .* use LoraLoaderModelOnly"):
        client.run(xdit_on_stock, timeout=300)


def test_the_old_flux_lora_node_name_still_runs_saved_workflows(comfy_server, client, loras):
    files = [(loras["a"], 0.8)]
    stock = saved_latent(comfy_server, client.run(lora_graph(False, files, prefix="alias_stock"), timeout=300))
    saved = lora_graph(True, files, prefix="alias_xdit", **ULYSSES2)
    saved["20"]["class_type"] = "XDiTFluxLoraLoader"
    assert (saved_latent(comfy_server, client.run(saved, timeout=600)) - stock).abs().max().item() <= FP32_TOL
    info = client.object_info()
    assert info["XDiTFluxLoraLoader"].get("deprecated") is True and "deprecated" not in info["XDiTLoraLoader"]
    assert info["XDiTFluxLoraLoader"]["input"] == info["XDiTLoraLoader"]["input"]


def test_the_shipped_lora_workflow_runs_on_the_pool_like_its_stock_twin(comfy_server, client, loras):
    """workflows/api/flux_dev_lora_xdit_api.json as shipped (pool size and degrees auto), offline on tiny weights."""
    workflow = make_offline(load_api_workflow(REPO_ROOT / "workflows" / "api" / "flux_dev_lora_xdit_api.json"),
                            TINY_UNET_NAMES["dev"], size=128, steps=3)
    lora_node = set_input(workflow, "XDiTLoraLoader", "lora_name", loras["b"])
    workflow["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "shipped_lora_xdit"}}
    stock = stock_twin(workflow)
    assert stock[lora_node]["class_type"] == "LoraLoaderModelOnly"
    stock["99"]["inputs"]["filename_prefix"] = "shipped_lora_stock"
    xdit_result = client.run(workflow, timeout=600)
    assert {file.kind for file in xdit_result.files} == {"images", "latents"}
    difference = saved_latent(comfy_server, xdit_result) - saved_latent(comfy_server, client.run(stock, timeout=300))
    assert difference.abs().max().item() <= FP32_TOL
