"""Load one PipeFusion stage of a diffusion model: its own blocks' weights and the small shared layers, nothing else.

The model is detected and built the way comfy.sd.load_diffusion_model does it (shell_model.detect), but on the
meta device; the blocks other stages hold become RemoteBlock stand-ins before any memory is allocated, and only the
remaining tensors are read from the safetensors file (by name, so the others are never read).
"""
from __future__ import annotations

from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher

from .block_stages import RemoteBlock, block_parameters, blocks, container_and_index, stage_plan
from .errors import UnsupportedByXDiT
from .families import adapter_for
from .safetensors_files import open_safetensors
from .shell_model import detect, meta_state_dict, unet_prefix


def check_stage_loadable(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's header (meta tensors), or a refusal if per-stage loading cannot read it faithfully."""
    header, metadata = meta_state_dict(path)
    if any(key.endswith("scaled_fp8") for key in header) or "_quantization_metadata" in (metadata or {}):
        raise UnsupportedByXDiT(f"{Path(path).name} is a quantized (scaled fp8) checkpoint, which PipeFusion's per-stage "
                                "loading does not read yet; use the full-precision file or set pipefusion_degree to 1")
    return header


def load_stage(path: str | Path, weight_dtype: str, stages: int, stage: int) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher of the file's model holding only stage `stage` of `stages` (plus the shared layers)."""
    load_device = comfy.model_management.get_torch_device()
    header = check_stage_loadable(path)
    config, meta_state, _ = detect(path, weight_dtype, load_device)
    model = config.get_model(meta_state, "", device=torch.device("meta"))
    diffusion_model = model.diffusion_model
    containers = adapter_for(model).block_containers
    plan = stage_plan(diffusion_model, containers, stages)
    foreign = []
    for index in range(sum(len(s) for s in plan)):
        if index in plan[stage]:
            continue
        container, position = container_and_index(diffusion_model, containers, index)
        container_blocks = getattr(diffusion_model, container)
        container_blocks[position] = RemoteBlock(block_parameters(container_blocks[position]))
        foreign.append(f"{container}.{position}.")
    offload_device = comfy.model_management.unet_offload_device()
    diffusion_model.to_empty(device=offload_device)
    needed = set(diffusion_model.state_dict())
    prefix = unet_prefix(header)
    weights = {}
    with open_safetensors(path, "diffusion model") as f:
        for key in f.keys():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and not name.startswith(tuple(foreign)):
                weights[name] = f.get_tensor(key)
    missing = sorted(needed - set(config.process_unet_state_dict(dict(weights))))
    if missing:
        raise RuntimeError(f"{Path(path).name}: no weights in the file for {missing[:3]}; it does not load as this stage of the model")
    model.load_model_weights(weights, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def held_block_parameters(model) -> tuple[int, int]:
    """(block parameters held by this rank, block parameters of the whole model), for a comfy.model_base model."""
    every = blocks(model.diffusion_model, adapter_for(model).block_containers)
    held = sum(block_parameters(b) for b in every if not isinstance(b, RemoteBlock))
    return held, sum(block_parameters(b) for b in every)
