"""Load one PipeFusion stage of a diffusion model: its own blocks' weights and the small shared layers, nothing else.

The model is detected and built the way comfy.sd.load_diffusion_model does it (shell_model.detect), but on the
meta device; the blocks other stages hold become RemoteBlock stand-ins before any memory is allocated, and only the
remaining tensors are read from the safetensors file (by name, so the others are never read). A quantized file
(scaled fp8, ComfyUI's mixed-precision formats) reads its stage's weights with their scales and layer configs, and
ComfyUI's conversion and quantized layers load them as a stock load does.
"""
from __future__ import annotations

from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher

from parallel_core import DEFAULT_BALANCE

from .block_stages import BALANCE_ATTACHMENT, RemoteBlock, block_parameters, block_profile, blocks, container_and_index, stage_plan
from .families import adapter_for
from .quantized import as_loaded
from .safetensors_files import open_safetensors
from .shell_model import detect, meta_state_dict, unet_prefix


def _plain_layout(config, meta_state: dict[str, torch.Tensor]):
    """The model with unquantized layers, on the meta device: every block weight at its logical size, so a quantized
    file is split into the same stages as its full-precision original (ComfyUI's quantized layers have no weight
    until they are loaded)."""
    quant_config = config.quant_config
    if quant_config is None:
        return None
    config.quant_config = None  # for this build only (ComfyUI's model configs cannot be copied)
    try:
        return config.get_model(meta_state, "", device=torch.device("meta")).diffusion_model
    finally:
        config.quant_config = quant_config


def load_stage(path: str | Path, weight_dtype: str, stages: int, stage: int, balance: str = DEFAULT_BALANCE) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher of the file's model holding only stage `stage` of `stages` (plus the shared layers), the
    blocks cut by `balance` (block_stages.stage_plan), which the ModelPatcher records for the pipeline."""
    load_device = comfy.model_management.get_torch_device()
    header, metadata = meta_state_dict(path)
    config, meta_state, _, _ = detect(path, weight_dtype, load_device)
    plain = _plain_layout(config, meta_state)
    # Quantized layers take their weights on the device they were built for: build those as stock does (device None:
    # only biases and norms are allocated); anything else on the meta device, allocated below for this stage only.
    model = config.get_model(meta_state, "", device=torch.device("meta") if plain is None else None)
    diffusion_model = model.diffusion_model
    layout = diffusion_model if plain is None else plain
    adapter = adapter_for(model)
    containers = adapter.block_containers
    plan = stage_plan(layout, adapter, stages, balance)
    foreign = []
    for index in range(sum(len(s) for s in plan)):
        if index in plan[stage]:
            continue
        container, position = container_and_index(diffusion_model, containers, index)
        getattr(diffusion_model, container)[position] = RemoteBlock(block_profile(getattr(layout, container)[position], layout, adapter))
        foreign.append(f"{container}.{position}.")
    foreign = tuple(foreign)
    offload_device = comfy.model_management.unet_offload_device()
    if plain is None:
        diffusion_model.to_empty(device=offload_device)
    needed = {k for k in layout.state_dict() if not k.startswith(foreign)}
    prefix = unet_prefix(header)
    raw = {}
    with open_safetensors(path, "diffusion model") as f:
        for key in f.keys():
            if key.startswith(prefix) and not key[len(prefix):].startswith(foreign):
                raw[key] = f.get_tensor(key)
    weights, _ = as_loaded(raw, metadata)
    weights = {k: v for k, v in weights.items() if not k.startswith(foreign)}  # header-listed configs of other stages
    missing = sorted(needed - set(config.process_unet_state_dict(dict(weights))))
    if missing:
        raise RuntimeError(f"{Path(path).name}: no weights in the file for {missing[:3]}; it does not load as this stage of the model")
    model.load_model_weights(weights, "")
    if stage_plan(diffusion_model, adapter, stages, balance) != plan:
        raise RuntimeError(f"{Path(path).name}: the loaded blocks' parameters and shapes split into other stages than the file's layout; "
                           "this checkpoint cannot be loaded per stage, set pipefusion_degree to 1")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.set_attachments(BALANCE_ATTACHMENT, balance)
    return patcher


def held_block_parameters(model) -> tuple[int, int]:
    """(block parameters held by this rank, block parameters of the whole model), for a comfy.model_base model."""
    every = blocks(model.diffusion_model, adapter_for(model).block_containers)
    held = sum(block_parameters(b) for b in every if not isinstance(b, RemoteBlock))
    return held, sum(block_parameters(b) for b in every)
