"""One sampling job on the worker pool, as the XDiT sampler nodes run it (ComfyUI process side).

Shared by XDiTSamplerCustomAdvanced and the XDiT KSamplers: check the inputs, build the job, run it on the pool
with ComfyUI's progress bar and live previews, and turn interrupts and pool failures into what ComfyUI expects.
"""
from __future__ import annotations

import os
from typing import Any

import torch

import comfy.model_management
import comfy.utils
import latent_preview
from ray_backend.errors import JobInterrupted, PoolFailure

from .families import adapter_for
from .job import build_job, pool_model_of
from .pool_client import degrees_of, pool_for
from .stale_steps import DEFAULT_WARMUP_STEPS, carry_options

PREVIEW_FORMAT = "JPEG"  # what latent_preview.prepare_callback asks of the previewer


def sample_on_pool(node: str, guider, sampler, sigmas: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                   noise_mask: torch.Tensor | None, seed: int, num_pipeline_patch: int = 0,
                   warmup_steps: int = DEFAULT_WARMUP_STEPS, analyse: bool = False) -> dict[str, Any]:
    """guider.sample(noise, latent, sampler, sigmas, noise_mask, seed=seed) on the pool; returns rank 0's
    {"samples", "x0"} (and "block_changes" with `analyse`, block_cache.py). `node` names the calling node in refusals."""
    model = guider.model_patcher
    ref = pool_model_of(model, node)
    adapter = adapter_for(model.model)
    adapter.refuse_inputs(model.model, guider.original_conds, f"{node}: {os.path.basename(ref.path)}")
    token_rows = adapter.token_rows(model.model.diffusion_model, latent.shape[-2])
    try:
        stale = carry_options(degrees_of(ref), token_rows, num_pipeline_patch, warmup_steps)
    except ValueError as error:
        raise ValueError(f"{node}: {error}") from error
    # The stock samplers' previewer (None when previews are off): rank 0 then sends each step's x0 to it.
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    job = build_job(guider, sampler, sigmas, noise, latent, noise_mask, seed, stale, previews=previewer is not None, analyse=analyse)
    progress = comfy.utils.ProgressBar(max(1, sigmas.shape[-1] - 1))

    def on_progress(step: int, total: int, x0: Any) -> None:
        preview = None if x0 is None else previewer.decode_latent_to_preview_image(PREVIEW_FORMAT, x0)
        progress.update_absolute(step, total, preview)

    pool = pool_for(job.model, comfy.model_management.processing_interrupted)
    try:
        result = pool.run(job, degrees_of(job.model), on_progress=on_progress, previews=job.previews,
                          should_interrupt=comfy.model_management.processing_interrupted)
    except JobInterrupted:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise
    except PoolFailure as error:
        raise RuntimeError(f"XDiT worker pool failed: {error}. The pool was stopped; queue the prompt again to start a fresh one.") from error
    return result["output"]
