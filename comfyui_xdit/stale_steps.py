"""When the stale-activation methods (PipeFusion, displaced patch parallel) may reuse last step's keys/values.

ComfyUI's sampler loop calls the model once per evaluation; the call's transformer_options say which step it is
(`sigmas` against `sample_sigmas`) and which conds it carries (`cond_or_uncond`). Each distinct set of conds and
shapes is a stream with its own KVCache tables. A call is synchronous (every row fresh, exact) during the first
`warmup_steps` steps and whenever its stream has not been filled yet in this sampling run (a new batch layout, a
sampler's extra evaluation of an unseen kind); the cache is emptied when a sampling run starts and ends.

The sampler node's options travel to the workers as plain data in transformer_options[OPTIONS_KEY].
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

import torch

import comfy.patcher_extension

from parallel_core import KVCache, patch_bands

OPTIONS_KEY = "xdit_stale"
RESET_WRAPPER_KEY = "comfyui_xdit.stale_kv_reset"
DEFAULT_WARMUP_STEPS = 1
AUTO_PATCHES_PER_STAGE = 2
# The block running now and the count of its attention calls so far, while a block announces itself (running_block).
_RUNNING_BLOCK: ContextVar[tuple[int, Iterator[int]] | None] = ContextVar("comfyui_xdit.running_block", default=None)


@dataclass(frozen=True)
class StaleOptions:
    """The sampler node's choices; num_pipeline_patch 0 = auto (default_patches)."""

    num_pipeline_patch: int = 0
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    lookahead: bool = True  # PipeFusion's first stage runs the next call's first patch ahead (pipefusion_lookahead)


def default_patches(pipefusion_degree: int) -> int:
    """Patches when the sampler leaves it at 0 (auto): two per stage keeps the fill-and-drain bubble at
    (P-1)/(3P-1), under a third, while patches stay tall enough to compute efficiently."""
    return AUTO_PATCHES_PER_STAGE * pipefusion_degree


def resolve_patches(requested: int, stages: int, rows: int) -> int:
    """The number of patches to use: `requested` if it cuts `rows` token rows evenly enough (else a ValueError
    saying what to choose); for 0 (auto) the most, up to default_patches, that does."""
    if requested:
        patch_bands(rows, requested)
        return requested
    for patches in range(min(default_patches(stages), rows), 0, -1):
        try:
            patch_bands(rows, patches)
            return patches
        except ValueError:
            continue
    return 1


def bands_for(rows: int, requested: int, stages: int, width: int = 1, lead_tokens: int = 0) -> list[tuple[int, int]]:
    """PipeFusion's bands of image rows (`width` tokens each) when `lead_tokens` text tokens travel with the first."""
    return patch_bands(rows, resolve_patches(requested, stages, rows), width, lead_tokens)


def carry_options(degrees: dict[str, int], token_rows: int, num_pipeline_patch: int, warmup_steps: int) -> dict:
    """The sampler node's choices checked against the job (before any work) as plain data for the workers."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1 (the first step fills the key/value tables), got {warmup_steps}")
    if num_pipeline_patch < 0:
        raise ValueError(f"num_pipeline_patch must be 0 (auto) or a number of patches, got {num_pipeline_patch}")
    stages = degrees.get("pipefusion_degree", 1)
    if stages > 1:
        num_pipeline_patch = resolve_patches(num_pipeline_patch, stages, token_rows)
    return {"num_pipeline_patch": num_pipeline_patch, "warmup_steps": warmup_steps}


def options_from(transformer_options: dict) -> StaleOptions:
    carried = transformer_options.get(OPTIONS_KEY) or {}
    return StaleOptions(**carried)


def step_index(transformer_options: dict) -> int:
    """Which step of the schedule this model call belongs to (0 when the sampler did not say)."""
    sigmas = transformer_options.get("sigmas")
    schedule = transformer_options.get("sample_sigmas")
    if sigmas is None or schedule is None:
        return 0
    current = float(torch.as_tensor(sigmas).max())
    return int((torch.as_tensor(schedule).float() > current * (1 + 1e-6) + 1e-12).sum())


def stream_of(transformer_options: dict, *tensors: torch.Tensor) -> Hashable:
    conds = tuple(transformer_options.get("cond_or_uncond") or ())
    return conds, tuple(tuple(t.shape) for t in tensors)


def is_synchronous(cache: KVCache, stream: Hashable, transformer_options: dict, warmup_steps: int) -> bool:
    return step_index(transformer_options) < warmup_steps or not cache.has_stream(stream)


def attach_cache(model_patcher, *also_clear: Callable[[], None]) -> KVCache:
    """A new KVCache for `model_patcher` (a parallel clone), emptied (with whatever `also_clear` empties) around each
    of its sampling runs."""
    cache = KVCache()
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RESET_WRAPPER_KEY,
                                       reset_wrapper(cache, *also_clear))
    return cache


def reset_wrapper(cache: KVCache, *also_clear: Callable[[], None]) -> Callable[..., Any]:
    """An OUTER_SAMPLE wrapper emptying `cache` around each sampling run (no stale rows cross prompts)."""

    def clear() -> None:
        cache.clear()
        for empty in also_clear:
            empty()

    def outer_sample(executor, *args, **kwargs):
        clear()
        try:
            return executor(*args, **kwargs)
        finally:
            clear()

    return outer_sample


@contextlib.contextmanager
def running_block(index: int):
    """Announce that block `index` (its place among the model's blocks) runs now: TableNames names its attention
    calls' key/value tables by it. block_cache.py's block wrappers announce every block."""
    token = _RUNNING_BLOCK.set((index, itertools.count()))
    try:
        yield
    finally:
        _RUNNING_BLOCK.reset(token)


class TableNames:
    """The names of one forward's (one patch's) key/value tables, one per attention call, in call order.

    Inside an announced block (running_block) a call is named by (block, its place within the block), so a block
    a cache schedule skips at some step (its attention not called) shifts no other block's table; outside, by its
    place among the forward's unannounced calls, which run in the same order every forward."""

    def __init__(self) -> None:
        self._order = itertools.count()

    def __iter__(self) -> TableNames:
        return self

    def __next__(self) -> Hashable:
        block = _RUNNING_BLOCK.get()
        return next(self._order) if block is None else ("block", block[0], next(block[1]))
