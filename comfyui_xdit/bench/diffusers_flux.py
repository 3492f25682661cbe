"""diffusers' own Flux transformer at a bench shape, on one rank and with its context parallelism (Ulysses, Ring).

The baseline the Flux bench (flux_step.py --diffusers) interleaves with ComfyUI's Flux on the same ranks: same
hidden size, heads, block counts and token counts, fp32, weights seeded identically on every rank. diffusers is an
optional extra (`pip install .[bench]`); `require_diffusers` says how to get it when it is missing.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator

import torch

DIFFUSERS_VERSION = "0.42.1"
# method -> (ulysses_degree, ring_degree); None: the unparallelised model on one rank
DIFFUSERS_METHODS: dict[str, tuple[int, int] | None] = {"diffusers-single": None, "diffusers-ulysses": (2, 1), "diffusers-ring": (1, 2)}
LATENT_CHANNELS = 16
PATCH = 2
CONTEXT_DIM = 64  # tiny_models' Flux: context_in_dim 64, vec_in_dim 32
POOLED_DIM = 32


def require_diffusers() -> None:
    """Raise with the install line when diffusers cannot be imported."""
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit(f"--diffusers needs the diffusers package ({DIFFUSERS_VERSION}): pip install "
                         f"'diffusers=={DIFFUSERS_VERSION}' (or this repo's extra: pip install '.[bench]')")


def flux_transformer(hidden: int, depth: int, single_depth: int, seed: int):
    """diffusers' FluxTransformer2DModel with the bench model's sizes (Flux-dev layout: guidance embedding), fp32,
    its own default initialisation drawn from `seed` (the same on every rank)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * PATCH * PATCH, num_layers=depth, num_single_layers=single_depth,
        attention_head_dim=128, num_attention_heads=hidden // 128, joint_attention_dim=CONTEXT_DIM,
        pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )
    return model.eval()


def _lse_capable_native_op() -> None:
    """Let diffusers' "native" attention backend serve its Ring attention on CPU.

    Its ring merges partial results by log-sum-exp, which the native op refuses to return, and its other
    LSE-returning backends need CUDA, NPU or extra packages. The op that the native backend dispatches to is
    looked up by name at call time, so the rank swaps in one that runs the same CPU SDPA kernel (flash attention
    for CPU) and also returns the LSE, in the (batch, seq, heads) layout the ring expects. Ulysses calls it
    without asking for the LSE and gets the original op."""
    from diffusers.models import attention_dispatch

    original = attention_dispatch._native_attention_forward_op
    if getattr(original, "_xdit_lse", False):
        return

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        if attn_mask is not None or enable_gqa:
            raise ValueError("the bench's CPU ring op takes no attention mask and no grouped-query attention")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x.transpose(1, 2) for x in (query, key, value)), dropout_p, is_causal, scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2)

    forward_op._xdit_lse = True
    attention_dispatch._native_attention_forward_op = forward_op


def parallel_copy(model, degrees: tuple[int, int]):
    """A second model with `model`'s weights and diffusers' context parallelism (collective: every rank calls it)."""
    from diffusers import ContextParallelConfig

    # diffusers picks the rank's device as rank % torch.accelerator.device_count(), which is 0 on a CPU-only torch.
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    _lse_capable_native_op()
    copy = type(model).from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    ulysses, ring = degrees
    copy.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
    return copy


def flux_inputs(latent: tuple[int, int], text_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """One forward's inputs in diffusers' packed layout: (1, image tokens, 64) latents, text, ids, pooled, t, guidance."""
    h, w = ((latent[0] + 1) // PATCH, (latent[1] + 1) // PATCH)
    gen = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "hidden_states": torch.randn(1, h * w, LATENT_CHANNELS * PATCH * PATCH, generator=gen),
        "encoder_hidden_states": torch.randn(1, text_tokens, CONTEXT_DIM, generator=gen),
        "pooled_projections": torch.randn(1, POOLED_DIM, generator=gen),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
    }


@torch.inference_mode()
def forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@contextlib.contextmanager
def profile_labels(model) -> Iterator[None]:
    """While profiling: `model`'s modules in profile_categories' labelled ranges (diffusers_label), and its RoPE
    application (the Python function apply_rotary_emb, which its attention processors look up by name in their
    module at call time) in a RoPE range; all removed on exit."""
    from diffusers.models.transformers import transformer_flux

    from comfyui_xdit.bench.profile_categories import ROPE, diffusers_label, label_modules, labelled

    handles = label_modules(model, lambda name, module, parent: diffusers_label(
        name, type(module).__name__, None if parent is None else type(parent).__name__))
    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = labelled(original, ROPE)
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original
        for handle in handles:
            handle.remove()
