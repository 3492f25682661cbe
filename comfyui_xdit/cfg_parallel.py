"""CFG parallelism for any ComfyUI model: the conds of one step are shared out over the cfg group.

ComfyUI evaluates a step's conds (positive, negative, ...) in `calc_cond_batch`; its CALC_COND_BATCH wrapper
lets each cfg rank evaluate only the conds it owns (round robin), then the owners broadcast their predictions,
so every rank ends the step with the full list, exactly as one process would.
"""
from __future__ import annotations

from typing import Any, Callable

from parallel_core import ParallelState, broadcast

WRAPPER_KEY = "comfyui_xdit.cfg_parallel"
# transformer_options entry of a model call whose conds another rank of the cfg group computes too (a lone cond runs on
# every rank; a spare cond under sharded weights): per-call statistics (block_cache's analysis) count it only once.
REPEATED_CALL_KEY = "comfyui_xdit.repeated_call"


def _marked_repeated(model_options: dict) -> dict:
    return {**model_options, "transformer_options": {**model_options.get("transformer_options", {}), REPEATED_CALL_KEY: True}}


def cfg_parallel_wrapper(state: ParallelState, lockstep: bool = False) -> Callable[..., Any]:
    """A CALC_COND_BATCH wrapper splitting the conds over `state.cfg`. With `lockstep` (weights sharded over every
    rank, gathered by all of them together) a rank that owns no cond computes one anyway and drops it."""

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        group = state.cfg
        active = [i for i, cond in enumerate(conds) if cond is not None]
        # One cond (e.g. BasicGuider, or cfg 1.0): nothing to share out; every rank computes it (rank 0's call counts).
        if group.size == 1 or len(active) < 2:
            return executor(model, conds, x_in, timestep, _marked_repeated(model_options) if group.rank else model_options)
        owner = {index: n % group.size for n, index in enumerate(active)}
        mine = [cond if owner.get(i) == group.rank else None for i, cond in enumerate(conds)]
        if lockstep and all(cond is None for cond in mine):
            spare = active[group.rank % len(active)]
            mine[spare] = conds[spare]  # its output is only the buffer its owner's broadcast overwrites
            model_options = _marked_repeated(model_options)
        outputs = executor(model, mine, x_in, timestep, model_options)
        return [broadcast(out, owner[i], group, state.comm) if i in owner else out for i, out in enumerate(outputs)]

    return calc_cond_batch
