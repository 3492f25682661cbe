"""Lumina 2 and Z-Image (ComfyUI's comfy.ldm.lumina.model.NextDiT) computed across ranks.

NextDiT embeds the caption and the image separately (`embed_all`, RoPE positions from its `rope_embedder`; Z-Image
pads both to a multiple of 32 tokens with learned pad tokens), refines the caption with text-only attention
(`context_refiner`) and the image with image-only attention (`noise_refiner`), then runs its main `layers` over
[caption, image] with joint attention, and `unpatchify` reads the image rows back out after the per-token final
layer. Sequence parallel keeps that order, each rank holding 1/P of the caption rows and 1/P of the image rows
from the embedding to the final layer:
- object patches on a clone of the ModelPatcher: `rope_embedder` computes the positions of this rank's rows only,
  `embed_all` hands on this rank's caption and image rows (padded_piece / split_sequence), each refiner block
  marks its attention as text-only or image-only, and `unpatchify` gathers the image rows first;
- a DIFFUSION_MODEL wrapper refuses the inputs this path does not shard and sets the
  `optimized_attention_override` option: text-only and image-only attention are plain usp_attention over their
  own true length, the main layers' joint attention is the shared text-in-front one (parallel_glue).
CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools
from typing import Any

import comfy.patcher_extension
import torch

from parallel_core import ParallelState, gather_sequence, split_sequence, usp_attention
from parallel_core.sharding import padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import from_bshd, patches_at, refuse_foreign_attention_override, text_front_attention, to_bshd

WRAPPER_KEY = "comfyui_xdit.lumina2_sequence_parallel"
# transformer_options keys this module sets: the caption's token count (embed_all records it for the call) and
# which refiner an attention call belongs to (absent in the main layers, whose attention is joint).
TEXT_LEN_KEY = "comfyui_xdit.lumina2_text_len"
PHASE_KEY = "comfyui_xdit.lumina2_phase"
REFINERS = {"context_refiner": "text", "noise_refiner": "image"}
TOKEN_PATCH_POINTS = ("noise_refiner", "double_block")  # the forward's patch lists, which would see token shards


def _attention(family: str, state: ParallelState, func, q, k, v, heads, mask=None, skip_reshape=False,
               skip_output_reshape=False, transformer_options=None, **kwargs) -> torch.Tensor:
    """optimized_attention inside NextDiT, each rank holding its caption shard (text-only attention), its image
    shard (image-only) or [its caption shard, its image shard] (the main layers' joint attention)."""
    if mask is not None:  # NextDiT drops the caption mask before attention; a model that passes one is not this one
        raise UnsupportedByXDiT(f"an attention mask on {family} is not supported with sequence parallel; "
                                "set ulysses_degree and ring_degree to 1 or use UNETLoader")
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    scale = kwargs.get("scale")
    text_len = transformer_options[TEXT_LEN_KEY]
    phase = transformer_options.get(PHASE_KEY)
    if phase == "text":
        out = usp_attention(q, k, v, state, seq_len=text_len, scale=scale)
    elif phase == "image":  # the image length split_sequence recorded
        out = usp_attention(q, k, v, state, scale=scale)
    else:
        out = text_front_attention(state, text_len, q, k, v, scale)
    return from_bshd(out, skip_output_reshape)


def _own_rows_rope(rope, state: ParallelState, ids: torch.Tensor) -> torch.Tensor:
    """rope_embedder for the position ids of this rank's rows (every segment it embeds is sharded this way)."""
    return rope(padded_piece(ids, 1, state.sequence.size, state.sequence.rank))


def _embed_own_rows(embed_all, state: ParallelState, x, cap_feats=None, siglip_feats=None, offset=0, omni=False, *,
                    transformer_options: dict):
    """embed_all, keeping this rank's caption and image rows (their positions come from _own_rows_rope); the
    caption's length is recorded in the call's transformer_options for the attention override."""
    (caption, siglip, image), freqs_cis, next_position = embed_all(x, cap_feats, siglip_feats, offset, omni, transformer_options)
    transformer_options[TEXT_LEN_KEY] = caption.shape[1]
    sp = state.sequence
    return (padded_piece(caption, 1, sp.size, sp.rank), siglip, split_sequence(image, state, 1)), freqs_cis, next_position


def _in_phase(block_forward, phase: str, *args, transformer_options=None, **kwargs):
    """A refiner block's forward with its attention marked text-only or image-only."""
    return block_forward(*args, transformer_options={**(transformer_options or {}), PHASE_KEY: phase}, **kwargs)


def _unpatchify_whole_image(unpatchify, state: ParallelState, x: torch.Tensor, img_size, cap_size, return_tensor=False):
    """unpatchify after gathering every rank's image rows (x holds [caption shard, image shard] per rank)."""
    image = gather_sequence(x[:, cap_size[0]:], state, 1)
    return unpatchify(image, img_size, [0] * len(cap_size), return_tensor=return_tensor)


def refuse_unsupported(family: str, kwargs: dict[str, Any], transformer_options: dict) -> None:
    """Raise for the inputs of NextDiT's forward that the sequence-parallel path does not handle."""
    if kwargs.get("ref_latents") or kwargs.get("siglip_feats") or kwargs.get("ref_contexts"):
        raise UnsupportedByXDiT(f"reference images (Z-Image omni) on {family} are not supported with sequence parallel yet; "
                                "set ulysses_degree and ring_degree to 1 or use UNETLoader")
    patched = patches_at(transformer_options, TOKEN_PATCH_POINTS)
    if patched:
        raise UnsupportedByXDiT(f"a model patch on {family}'s {' and '.join(patched)} (e.g. a blockwise ControlNet) is not "
                                "supported with sequence parallel; remove it, or set ulysses_degree and ring_degree to 1")
    refuse_foreign_attention_override(transformer_options)


def _sequence_parallel_forward(family: str, state: ParallelState, executor, x, timesteps, context, num_tokens,
                               attention_mask=None, transformer_options=None, **kwargs):
    """DIFFUSION_MODEL wrapper: the stock forward with this call's attention override."""
    transformer_options = transformer_options or {}
    refuse_unsupported(family, kwargs, transformer_options)
    options = dict(transformer_options)  # per call: embed_all records the caption length in it
    options["optimized_attention_override"] = functools.partial(_attention, family, state)
    return executor(x, timesteps, context, num_tokens, attention_mask, transformer_options=options, **kwargs)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose NextDiT shards caption and image rows over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "front":  # the main layers' attention is text-in-front, as NextDiT concatenates
        raise ValueError(f"the Lumina 2 hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no NextDiT hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    family = adapter.family_name(model_patcher.model)
    diffusion_model = model_patcher.model.diffusion_model
    # The class's methods bound to this model: an earlier clone's patches may still be applied to the shared model.
    rope = diffusion_model.rope_embedder
    patched.add_object_patch("diffusion_model.rope_embedder.forward",
                             functools.partial(_own_rows_rope, functools.partial(type(rope).forward, rope), state))
    for name, wrapper in (("embed_all", _embed_own_rows), ("unpatchify", _unpatchify_whole_image)):
        patched.add_object_patch(f"diffusion_model.{name}",
                                 functools.partial(wrapper, functools.partial(getattr(type(diffusion_model), name), diffusion_model), state))
    for container, phase in REFINERS.items():
        for index, block in enumerate(getattr(diffusion_model, container)):
            patched.add_object_patch(f"diffusion_model.{container}.{index}.forward",
                                     functools.partial(_in_phase, functools.partial(type(block).forward, block), phase))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 functools.partial(_sequence_parallel_forward, family, state))
    return patched
