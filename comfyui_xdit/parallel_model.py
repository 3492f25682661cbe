"""Turn a stock ComfyUI ModelPatcher into one that computes across the ranks of a ParallelState.

One adapter per model family (flux.py, ...) shards the diffusion model's tokens; CFG parallelism is
family-independent (cfg_parallel.py). The result is a clone: the input ModelPatcher keeps its stock behaviour.
"""
from __future__ import annotations

from types import ModuleType

import comfy.patcher_extension

from parallel_core import ParallelConfig, ParallelState

from . import flux
from .cfg_parallel import WRAPPER_KEY, cfg_parallel_wrapper
from .errors import UnsupportedByXDiT

ADAPTERS: tuple[ModuleType, ...] = (flux,)


def adapter_for(model_patcher) -> ModuleType:
    diffusion_model = model_patcher.model.diffusion_model
    for adapter in ADAPTERS:
        if adapter.is_flux(diffusion_model):
            return adapter
    raise UnsupportedByXDiT(
        f"{type(diffusion_model).__name__} models are not supported by XDiT yet (supported: Flux); load it with UNETLoader"
    )


def validate_for_model(config: ParallelConfig, world_size: int, model_patcher) -> None:
    """Raise, saying what to change, if `config` cannot run this model on `world_size` ranks."""
    adapter = adapter_for(model_patcher)
    diffusion_model = model_patcher.model.diffusion_model
    config.validate(world_size, num_heads=adapter.num_heads(diffusion_model))
    if config.pipefusion_degree > 1:
        adapter.stage_plan(diffusion_model, config.pipefusion_degree)  # more stages than blocks raises here


def parallelize(model_patcher, state: ParallelState):
    """A clone of `model_patcher` computing across `state` (sequence or patch, PipeFusion, cfg and data parallel)."""
    validate_for_model(state.config, state.world_size, model_patcher)
    patched = adapter_for(model_patcher).parallelize(model_patcher, state)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, cfg_parallel_wrapper(state))
    return patched
