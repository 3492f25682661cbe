"""Flux.1 and Flux.2 (ComfyUI's comfy.ldm.flux.model.Flux, both) computed across ranks.

Image tokens and text tokens, with their RoPE positions, are split over the sequence-parallel group; every attention
call of the double and single blocks gathers the (short) text q/k/v and runs usp_attention with the text as joint
tokens in front. The batch is split over the data group and conds over the cfg group by family-independent
wrappers (parallel_glue.py, cfg_parallel.py).

With patch_degree > 1 (displaced patch parallel, DistriFusion-style) the same rows are shared out over the patch
group instead, and attention uses last step's keys/values of the other ranks' rows (displaced_attention) after
the synchronous warmup steps (stale_steps.py). PipeFusion is flux_pipefusion.py.

All of it is attached to a clone of the ModelPatcher through ComfyUI's extension points: an object patch of the
diffusion model's `forward_orig` (active only while that clone is the one patched in) and, inside it, the
`optimized_attention_override` transformer option. The original ModelPatcher and other models are untouched.
"""
from __future__ import annotations

import functools

import torch

from parallel_core import KVCache, ParallelState, displaced_attention, gather_sequence, split_sequence
from parallel_core.sharding import gather_over, padded_piece, shard_positions, split_over

from .. import stale_steps
from ..errors import UnsupportedByXDiT
from ..parallel_glue import from_bshd, refuse_foreign_attention_override, text_front_attention_override, to_bshd

OBJECT_PATCH_KEY = "diffusion_model.forward_orig"


def layer_of(transformer_options: dict) -> tuple[str, int]:
    """Which block is calling attention, as ComfyUI's forward_orig records it."""
    return transformer_options["block_type"], transformer_options["block_index"]


def refuse_mask(mask, family: str = "Flux") -> None:
    if mask is not None:
        raise UnsupportedByXDiT(f"an attention mask on {family} (e.g. from an attention-mask node) is not supported in parallel; remove it or use UNETLoader")


def refuse_unsupported(control, timestep_zero_index, attn_mask, transformer_options: dict, family: str = "Flux") -> None:
    """Raise for the inputs of Flux's forward (and of the forwards built on it, e.g. Chroma's) that the parallel
    paths do not handle."""
    if control is not None:
        raise UnsupportedByXDiT(f"ControlNet on {family} is not supported in parallel yet; remove the ControlNet apply node or use UNETLoader")
    if timestep_zero_index is not None:
        raise UnsupportedByXDiT("reference latents with ref_latents_method 'index_timestep_zero' are not supported in parallel; use another method")
    refuse_mask(attn_mask, family)
    refuse_foreign_attention_override(transformer_options)


def shard_tokens(state: ParallelState, txt: torch.Tensor, txt_ids: torch.Tensor, *image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's rows of the text stream and its RoPE positions, then of each image-token tensor in `image`.

    Text rows are sharded too: every linear layer of the text stream then does 1/P of the text work instead of
    repeating all of it on every rank (at 8 ranks, 512 T5 tokens would otherwise equal each rank's image share)."""
    sp = state.sequence
    return (padded_piece(txt, 1, sp.size, sp.rank), padded_piece(txt_ids, 1, sp.size, sp.rank),
            *(split_sequence(t, state, 1) for t in image))


def joint_attention_options(family: str, state: ParallelState, text_len: int, transformer_options: dict) -> dict:
    """A copy of `transformer_options` whose attention runs [text, image] over the sequence group (shard_tokens' rows)."""
    options = dict(transformer_options)
    options["optimized_attention_override"] = functools.partial(text_front_attention_override, family, state, text_len)
    return options


def _parallel_forward_orig(original, state: ParallelState, img, img_ids, txt, txt_ids, timesteps, y, guidance=None,
                           control=None, timestep_zero_index=None, transformer_options=None, attn_mask=None):
    transformer_options = transformer_options or {}
    refuse_unsupported(control, timestep_zero_index, attn_mask, transformer_options)
    text_len = txt.shape[1]
    txt, txt_ids, img, img_ids = shard_tokens(state, txt, txt_ids, img, img_ids)
    out = original(img, img_ids, txt, txt_ids, timesteps, y, guidance, None,
                   transformer_options=joint_attention_options("Flux", state, text_len, transformer_options))
    return gather_sequence(out, state, 1)


def _displaced_attention_override(state: ParallelState, cache: KVCache, stream, synchronous: bool, positions: torch.Tensor,
                                  total: int, func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                                  transformer_options=None, **kwargs):
    """Flux's joint attention with this rank's rows fresh and the other patches' keys/values one step old."""
    refuse_mask(mask)
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    out = displaced_attention(q, k, v, positions, total, cache, stream, layer_of(transformer_options), state.patch, state,
                              synchronous, scale=kwargs.get("scale"))
    return from_bshd(out, skip_output_reshape)


def _displaced_forward_orig(original, state: ParallelState, cache: KVCache, img, img_ids, txt, txt_ids, timesteps, y,
                            guidance=None, control=None, timestep_zero_index=None, transformer_options=None, attn_mask=None):
    transformer_options = transformer_options or {}
    refuse_unsupported(control, timestep_zero_index, attn_mask, transformer_options)
    patch = state.patch
    text_len, image_len = txt.shape[1], img.shape[1]
    stream = stale_steps.stream_of(transformer_options, img, txt)
    synchronous = stale_steps.is_synchronous(cache, stream, transformer_options, stale_steps.options_from(transformer_options).warmup_steps)
    # Each rank's patch is its band of image rows plus the whole text: text rows are few, and computing them on
    # every rank keeps their keys/values fresh everywhere (only other patches' image rows are a step old).
    positions = torch.cat([torch.arange(text_len).expand(patch.size, -1),
                           shard_positions([range(text_len, text_len + image_len)], patch.size)], dim=1)
    options = dict(transformer_options)
    options["optimized_attention_override"] = functools.partial(
        _displaced_attention_override, state, cache, stream, synchronous, positions, text_len + image_len)
    out = original(split_over(img, 1, patch), split_over(img_ids, 1, patch), txt, txt_ids, timesteps, y, guidance, None,
                   transformer_options=options)
    if synchronous:
        cache.mark_filled(stream)
    return gather_over(out, 1, patch, state, image_len)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose Flux runs over `state`'s groups: sequence or patch, and PipeFusion stages
    (flux_pipefusion.py); `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "front":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the Flux hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1:
        from . import flux_pipefusion  # it builds on this module

        return flux_pipefusion.parallelize(model_patcher, state, adapter.block_containers)
    diffusion_model = model_patcher.model.diffusion_model
    original = functools.partial(type(diffusion_model).forward_orig, diffusion_model)
    patched = model_patcher.clone()
    if state.patch.size > 1:
        cache = stale_steps.attach_cache(patched)
        patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_displaced_forward_orig, original, state, cache))
    else:
        patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_parallel_forward_orig, original, state))
    return patched
