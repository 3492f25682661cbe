"""Flux.1 and Flux.2 (ComfyUI's comfy.ldm.flux.model.Flux, both) computed across ranks.

Image tokens and text tokens, with their RoPE positions, are split over the sequence-parallel group; every attention
call of the double and single blocks runs [text, image] attention with both kinds of rows in Ulysses' all-to-all
and Ring's blocks (parallel_glue.text_front_attention): no rank gathers the text or repeats its queries. The batch is split over the data group and conds over the cfg group by family-independent
wrappers (parallel_glue.py, cfg_parallel.py).

With patch_degree > 1 (displaced patch parallel, DistriFusion-style) the same rows are shared out over the patch
group instead, and attention uses last step's keys/values of the other ranks' rows (displaced_attention) after
the synchronous warmup steps (stale_steps.py); with pipefusion_degree > 1 the blocks run as a PipeFusion pipeline.
Both are family-independent (stale_forwards.py); this module only runs Flux's forward_orig on the tokens they pick.

All of it is attached to a clone of the ModelPatcher through ComfyUI's extension points: an object patch of the
diffusion model's `forward_orig` (active only while that clone is the one patched in) and, inside it, the
`optimized_attention_override` transformer option. The original ModelPatcher and other models are untouched.
"""
from __future__ import annotations

import functools

import torch

from parallel_core import ParallelState, gather_sequence, split_sequence
from parallel_core.sharding import padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import refuse_foreign_attention_override, text_front_attention_override
from ..pipefusion_lookahead import FamilyCall
from ..stale_forwards import dit_block_keys, refuse_mask, stale_method

OBJECT_PATCH_KEY = "diffusion_model.forward_orig"


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


def _stale_forward_orig(original, method, family: str, img, img_ids, txt, txt_ids, timesteps, y, guidance=None,
                       control=None, timestep_zero_index=None, transformer_options=None, attn_mask=None):
    """Flux's forward_orig run by a stale-activation method (stale_forwards.stale_method) on token subsets."""
    transformer_options = transformer_options or {}
    refuse_unsupported(control, timestep_zero_index, attn_mask, transformer_options, family)

    def call_at(timesteps):
        def call(img, img_ids, txt, txt_ids, options):
            return original(img, img_ids, txt, txt_ids, timesteps, y, guidance, None, transformer_options=options)
        return call

    def image_tokens(latent):  # original is forward_orig bound to the diffusion model
        return original.args[0].process_img(latent, transformer_options=transformer_options)[0]

    return method(call_at(timesteps), img, img_ids, txt, txt_ids, transformer_options,
                  family_call=FamilyCall(call_at, timesteps, (y, guidance), image_tokens))


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose Flux runs over `state`'s groups: sequence or patch, and PipeFusion stages;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "front":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the Flux hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    diffusion_model = model_patcher.model.diffusion_model
    original = functools.partial(type(diffusion_model).forward_orig, diffusion_model)
    if state.pipefusion.size > 1 or state.patch.size > 1:
        blocks = dit_block_keys(len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))
        patched, method = stale_method(model_patcher, state, adapter.name, adapter.block_containers, blocks)
        patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_stale_forward_orig, original, method, adapter.name))
        return patched
    patched = model_patcher.clone()
    patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_parallel_forward_orig, original, state))
    return patched
