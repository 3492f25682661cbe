"""Plain-data records that travel between the ComfyUI process and the workers (no ComfyUI import here, so a
worker can unpickle them before it has imported ComfyUI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from parallel_core.stage_cuts import DEFAULT_BALANCE


@dataclass(frozen=True)
class PoolModelRef:
    """What the pool needs to serve one MODEL from XDiTUNetLoader."""

    path: str
    weight_dtype: str
    degrees: tuple[tuple[str, int], ...]  # ParallelConfig fields, resolved (no zeros)
    world_size: int
    cluster: str  # the operator-configured cluster's name ("local" = the private local cluster)
    num_heads: int | None  # None: the model's family shards no attention
    weight_sharding: str = "none"  # "blocks": each rank holds 1/world of every block's weights (weight_sharding.py)
    pipefusion_balance: str = DEFAULT_BALANCE  # how PipeFusion cuts stages (parallel_core.stage_cuts.BALANCES)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a MODEL's stack, as XDiTLoraLoader recorded it; workers merge the stack in this order."""

    path: str
    strength: float
    stamp: tuple[int, int]  # (size, mtime_ns) when validated: a rewritten file is read again, never a stale cache


@dataclass
class SamplingJob:
    """SamplerCustomAdvanced's inputs as names, numbers and tensors (see job.py for both directions)."""

    model: PoolModelRef
    guider: str
    cfg: float
    conds: dict[str, list[list[Any]]]
    sampler_name: str
    sampler_extra_options: dict
    sampler_inpaint_options: dict
    sigmas: torch.Tensor
    noise: torch.Tensor
    latent: torch.Tensor
    denoise_mask: torch.Tensor | None
    seed: int
    model_sampling: dict | None = None
    model_option_flags: dict = field(default_factory=dict)
    loras: tuple[LoraRef, ...] = ()
    stale_options: dict = field(default_factory=dict)  # stale_steps.StaleOptions fields, for PipeFusion / patch parallel
    stock_patches: dict = field(default_factory=dict)  # EasyCache/LazyCache/TorchCompileModel as plain data (stock_patches.py)
    block_cache: dict = field(default_factory=dict)  # block_cache.py: {"analyse": bool, "reuse": {step: [block indices]}}
    previews: bool = False  # rank 0 hands each step's x0 (first batch item) to the caller for ComfyUI's live preview


@dataclass(frozen=True)
class PoolVaeRef:
    """What the pool needs to serve one VAE from XDiTVAELoader: the file every rank loads (safetensors)."""

    path: str
    world_size: int
    cluster: str
    follows_pool: bool = False  # world_size was auto: jobs run on the pool that is up then (the model's), whatever its world


@dataclass
class VaeJob:
    """One VAEDecode ("decode": a latent) or VAEEncode ("encode": pixels) split by rows over the pool."""

    # Every rank hands back its own rows (vae_parallel.join_pieces joins them): none holds the whole output.
    every_rank_returns: ClassVar[bool] = True
    vae: PoolVaeRef
    kind: str
    tensor: torch.Tensor
