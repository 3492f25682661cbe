"""Rank-side checks of weight_sharding 'blocks' in real ComfyUI on gloo ranks: LoRA merged into each rank's part."""
from __future__ import annotations

import torch

from comfyui_xdit.comfy_runtime import init_worker
from comfyui_xdit.job_spec import LoraRef


def whole_weights(model_patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's weights with every sharded block gathered (every rank calls this together)."""
    from comfyui_xdit.weight_sharding import sharded_blocks

    sharded = sharded_blocks(model_patcher)
    weights = {k: v.clone() for k, v in model_patcher.model.diffusion_model.state_dict().items() if v.numel()}
    containers = sharded.containers
    diffusion_model = model_patcher.model.diffusion_model
    names = [f"{c}.{i}." for c in containers for i in range(len(getattr(diffusion_model, c)))]
    for index, block_name in enumerate(names):
        with sharded.whole(index):
            block = diffusion_model.get_submodule(block_name[:-1])
            weights.update({block_name + k: v.clone() for k, v in block.state_dict().items()})
    return weights


def stock_weights(path: str, stack: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """The weights stock LoraLoaderModelOnly nodes chained on UNETLoader's model sample with."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(path)
    for lora, strength in stack:
        model = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(lora, safe_load=True), strength, 0)[0]
    model.patch_model(device_to=torch.device("cpu"))
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def lora_rank(rank: int, world_size: int, model_path: str, stacks: list[list[tuple[str, float]]]) -> dict:
    """Each stack merged in turn into the sharded model; rank 0 returns the keys whose whole weight differs from
    stock's, per stack. Every rank reports whether its pieces are the loaded ones again after the empty stack."""
    import os

    init_worker(cpu=True)
    from comfyui_xdit.lora_merge import MergedLoras
    from comfyui_xdit.weight_sharding import load_sharded, sharded_blocks, world_group

    model = load_sharded(model_path, "default", world_group())
    sharded = sharded_blocks(model)
    loaded = [piece.clone() for piece in sharded.gatherer.pieces]
    merged = MergedLoras(model)
    result: dict = {"differ": [], "changed": []}
    for stack in stacks:
        refs = tuple(LoraRef(path, strength, (os.stat(path).st_size, os.stat(path).st_mtime_ns)) for path, strength in stack)
        merged.apply(refs)
        ours = whole_weights(model)
        result["changed"].append(merged.last_keys_changed)
        if rank == 0:
            stock = stock_weights(model_path, stack)
            result["differ"].append(sorted(k for k in stock if not torch.equal(stock[k], ours[k])))
    result["loaded_again"] = all(torch.equal(a, b) for a, b in zip(loaded, sharded.gatherer.pieces))
    return result
