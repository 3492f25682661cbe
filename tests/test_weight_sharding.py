"""weight_sharding 'blocks' beyond the exactness suite (test_flux_parallel.py runs it under every exact method): LoRA
merged into each rank's part, reading the file in pieces, and the refusals."""
from __future__ import annotations

import pytest
import torch

import sharding_cases
from comfyui_xdit.errors import UnsupportedByXDiT
from parallel_core.local_launch import run_on_ranks


def test_lora_merges_into_each_ranks_part_exactly_and_switches_back(tiny_flux_paths, tmp_path):
    """A -> A+B -> A -> none on weights sharded over 2 ranks: each gathered weight equals stock LoraLoaderModelOnly's
    chain, bit for bit, and no LoRA leaves every rank's pieces as loaded (no base weight was read again)."""
    from comfyui_xdit.testing.tiny_loras import flux_shapes, write_flux_lora

    path = str(tiny_flux_paths["dev"])
    a = str(write_flux_lora(tmp_path / "a.safetensors", flux_shapes(path), "kohya", rank=4, seed=1))
    b = str(write_flux_lora(tmp_path / "b.safetensors", flux_shapes(path), "diffusers", rank=8, seed=2))
    stacks = [[(a, 0.7)], [(a, 0.7), (b, -0.6)], [(a, 0.7)], []]
    per_rank = run_on_ranks(sharding_cases.lora_rank, 2, path, stacks, timeout_s=600)
    assert per_rank[0]["differ"] == [[], [], [], []], per_rank[0]["differ"]
    for result in per_rank:
        assert result["loaded_again"]
        assert all(n > 0 for n in result["changed"]), result["changed"]


@pytest.mark.fast
def test_one_rank_reads_the_blocks_whole_and_bit_exact(tiny_flux_paths, tmp_path):
    """Also from a file in BFL's own key names (`*_norm.scale`, which ComfyUI renames while loading)."""
    import comfy.sd
    from safetensors.torch import load_file, save_file

    from comfyui_xdit.weight_sharding import load_sharded, sharded_blocks, world_group

    path = str(tiny_flux_paths["dev"])
    bfl = tmp_path / "flux-bfl-names.safetensors"
    tensors = load_file(path)
    renamed = {k.removesuffix("_norm.weight") + "_norm.scale" if k.endswith("_norm.weight") else k: v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(bfl))
    stock = comfy.sd.load_diffusion_model(path).model.diffusion_model.state_dict()
    for file in (path, str(bfl)):
        model = load_sharded(file, "default", world_group())
        ours = sharding_cases.whole_weights(model)
        assert sorted(ours) == sorted(stock)
        assert all(torch.equal(ours[k], stock[k]) for k in stock), file
        assert sharded_blocks(model).resident_bytes() >= sharded_blocks(model).block_bytes() > 0


@pytest.mark.fast
def test_refusals_name_the_input_and_the_fix(tiny_model_path):
    from comfyui_xdit.weight_sharding import check_choice, check_shardable

    with pytest.raises(UnsupportedByXDiT, match="weight_sharding must be one of none, blocks, got 'all'"):
        check_choice("all")
    with pytest.raises(UnsupportedByXDiT, match="cannot be combined with pipefusion_degree 2.*set weight_sharding to none or pipefusion_degree to 1"):
        check_choice("blocks", pipefusion_degree=2)
    check_choice("blocks", pipefusion_degree=1)
    with pytest.raises(UnsupportedByXDiT, match="SD15 has no transformer blocks XDiT knows of to shard; set weight_sharding to none"):
        check_shardable(tiny_model_path("sd15"), "default")


@pytest.mark.fast
@pytest.mark.parametrize("fmt", ["scaled_fp8", "nvfp4", "metadata:float8_e4m3fn"])
def test_quantized_files_are_refused_for_sharding_by_name(tiny_flux_paths, tmp_path, fmt):
    """Quantized layouts (scaled fp8, per-layer mixed-precision configs, a layer list in the header) are not read in
    pieces: refused from the header, naming the file and the fix."""
    from comfyui_xdit.testing.tiny_quant import quantize_file
    from comfyui_xdit.weight_sharding import check_shardable

    path = quantize_file(tiny_flux_paths["dev"], tmp_path / "quantized.safetensors", fmt)
    with pytest.raises(UnsupportedByXDiT, match="quantized.safetensors is a quantized checkpoint .* set weight_sharding to none"):
        check_shardable(path, "default")
