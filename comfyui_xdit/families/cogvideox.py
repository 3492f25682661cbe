"""CogVideoX 1.0 and 1.5 (ComfyUI's comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel) computed across ranks.

CogVideoX's forward embeds the T5 text and the (frames x rows/2 x cols/2) latent tokens (1.5: also 2 frames a
patch) together, adds their positions (sin/cos or learned tables, zero on the text) and, on the RoPE models, rotates
the image tokens' queries and keys in every block. Each block is one joint attention over [text, image] (text in
front) and one feed-forward over the same rows, both modulated per stream by the timestep.

Object patches on the blocks of a ModelPatcher clone shard that loop, as for Flux (families/flux.py): the first block
takes this rank's rows of the text (padded_piece) and of the image tokens (split_sequence), every block takes the
image tokens' rows of the RoPE table and runs with the `optimized_attention_override` transformer option set to
parallel_glue.text_front_attention (text and image rows together through the all-to-all and ring). Each rank thus computes
1/P of the text rows rather than all of them, the same result. The last block gathers the image rows for the head.
CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools

from parallel_core import ParallelState, gather_sequence, split_sequence
from parallel_core.sharding import padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import refuse_foreign_attention_override, text_front_attention_override


def _sharded_block(original, family: str, state: ParallelState, call: dict, first: bool, last: bool, hidden_states,
                   encoder_hidden_states, temb, image_rotary_emb=None, transformer_options=None):
    """A block's forward on this rank's text and image rows; the first block shards them (noting the whole text's length
    in `call`, shared by the blocks of one model), the last gathers the image."""
    transformer_options = transformer_options or {}
    sp = state.sequence
    if first:
        refuse_foreign_attention_override(transformer_options)
        if hidden_states.shape[1] < sp.size:
            raise UnsupportedByXDiT(f"{family}: this latent makes {hidden_states.shape[1]} image tokens, fewer than the "
                                    f"{sp.size} sequence-parallel ranks (ulysses_degree x ring_degree); use a larger "
                                    "latent or lower those degrees")
        if image_rotary_emb is not None and image_rotary_emb[0].shape[0] != hidden_states.shape[1]:
            raise UnsupportedByXDiT(f"{family}: {hidden_states.shape[1]} image tokens but {image_rotary_emb[0].shape[0]} RoPE "
                                    "positions; this input is not supported in parallel")
        call["text_len"] = encoder_hidden_states.shape[1]
        encoder_hidden_states = padded_piece(encoder_hidden_states, 1, sp.size, sp.rank)
        hidden_states = split_sequence(hidden_states, state, 1)
    if image_rotary_emb is not None:  # (cos, sin), one row per image token of the whole grid
        image_rotary_emb = tuple(padded_piece(t, 0, sp.size, sp.rank) for t in image_rotary_emb)
    options = {**transformer_options, "optimized_attention_override": functools.partial(
        text_front_attention_override, family, state, call["text_len"])}
    hidden_states, encoder_hidden_states = original(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                                    temb=temb, image_rotary_emb=image_rotary_emb, transformer_options=options)
    if last:
        hidden_states = gather_sequence(hidden_states, state, 1)
    return hidden_states, encoder_hidden_states


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose CogVideoX shards its text and image tokens over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "front":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the CogVideoX hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no CogVideoX hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    blocks = model_patcher.model.diffusion_model.blocks
    call: dict = {}
    for index, block in enumerate(blocks):
        patched.add_object_patch(f"diffusion_model.blocks.{index}.forward", functools.partial(
            _sharded_block, functools.partial(type(block).forward, block), adapter.name, state, call, index == 0,
            index == len(blocks) - 1))
    return patched
