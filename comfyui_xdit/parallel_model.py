"""Turn a stock ComfyUI ModelPatcher into one that computes across the ranks of a ParallelState.

The model's family adapter (families/) shards its tokens; CFG and data parallelism are family-independent
wrappers (cfg_parallel.py, parallel_glue.py), so every model ComfyUI loads takes those two. The result is a
clone: the input ModelPatcher keeps its stock behaviour.
"""
from __future__ import annotations

import comfy.patcher_extension

from parallel_core import ParallelConfig, ParallelState

from .block_stages import balance_of, stage_plan
from .cfg_parallel import WRAPPER_KEY, cfg_parallel_wrapper
from .families import FamilyAdapter, adapter_for
from .parallel_glue import DATA_WRAPPER_KEY, data_parallel_wrapper
from .weight_sharding import sharded_blocks, wrap


def validate_for_model(config: ParallelConfig, world_size: int, model_patcher, balance: str | None = None) -> FamilyAdapter:
    """The model's adapter; raises, saying what to change, if `config` cannot run this model on `world_size` ranks
    with its stages cut by `balance` (default: the one the model was loaded with)."""
    model = model_patcher.model
    adapter = adapter_for(model)
    adapter.refuse_unsupported(config, model)
    config.validate(world_size, num_heads=adapter.num_heads(model.diffusion_model))
    if config.pipefusion_degree > 1:  # more stages than blocks raises here
        stage_plan(model.diffusion_model, adapter, config.pipefusion_degree, balance or balance_of(model_patcher))
    return adapter


def parallelize(model_patcher, state: ParallelState):
    """A clone of `model_patcher` computing across `state` (sequence or patch, PipeFusion, cfg and data parallel;
    blocks gathered around their forward when its weights are sharded, weight_sharding.py)."""
    adapter = validate_for_model(state.config, state.world_size, model_patcher)
    lockstep = sharded_blocks(model_patcher) is not None
    if lockstep:  # before the family's hooks: PipeFusion is refused here
        wrap(model_patcher, state, check_only=True)
    patched = adapter.parallelize(model_patcher, state)
    wrap(patched, state)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, cfg_parallel_wrapper(state, lockstep))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DATA_WRAPPER_KEY, data_parallel_wrapper(state))
    return patched
