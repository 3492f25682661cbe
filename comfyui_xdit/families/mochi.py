"""Mochi (ComfyUI's comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint) computed across ranks.

Mochi's forward embeds the 5-D latent into (frames x rows/2 x cols/2) visual tokens with a RoPE rotation row each,
projects the T5 tokens into a narrower text stream, then runs asymmetric joint blocks: visual and text tokens keep
their own widths and weights, and meet in one attention over [visual, the first `num_tokens` text tokens] (text at
the rear; the padded T5 tokens are cropped out of it, the stock way of masking them). The head sees visual tokens only.

Object patches on the blocks of a ModelPatcher clone shard both streams over the sequence group:
- the first block takes this rank's rows of the visual tokens (split_sequence) and of the text tokens, laid out
  [its piece of the first `num_tokens` (the valid text), its piece of the rest (T5 padding)], each zero-padded at
  its end as padded_piece splits; every block takes the same visual rows of the RoPE tables and crops its text to
  the local piece of the valid text (its `crop_y`), so the stock crop keeps exactly this rank's valid rows and the
  stock zeros fill the rest, as they fill every padded T5 token;
- the attention (`optimized_attention_override`: parallel_glue.text_rear_attention) sends the visual and valid text
  rows together through Ulysses' all-to-all and Ring's blocks, the keys laid out [visual, valid text] as one process
  has them: no rank gathers the text or computes another rank's text rows;
- the last block gathers the visual rows, so the head and the unpatchify see the whole grid; the forward drops the
  text after it, so the text is never gathered.
Every other text op (modulated norms, projections, MLP) is per token, and padding rows never act as keys, so the
result is stock's. CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from parallel_core import ParallelState, gather_sequence, split_sequence
from parallel_core.sharding import chunk_length, padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import refuse_foreign_attention_override, text_rear_attention_override


@dataclass
class _Text:
    """The current call's valid text tokens (its crop, at most the T5 length), set by the first block for the rest."""
    valid: int = 0


def _refuse_unsupported(family: str, state: ParallelState, tokens: int, transformer_options: dict) -> None:
    if transformer_options.get("patches_replace", {}).get("dit"):
        raise UnsupportedByXDiT(f"a dit block replacement on {family} is not supported with sequence parallel; remove "
                                "the node that adds it, or set ulysses_degree and ring_degree to 1")
    refuse_foreign_attention_override(transformer_options)
    if tokens < state.sequence.size:
        raise UnsupportedByXDiT(f"{family}: this latent makes {tokens} tokens (frames x rows/2 x cols/2), fewer than the "
                                f"{state.sequence.size} sequence-parallel ranks (ulysses_degree x ring_degree); use a "
                                "larger latent or lower those degrees")


def shard_text(y: torch.Tensor, valid: int, parts: int, index: int) -> torch.Tensor:
    """Rank `index`'s text rows (batch, rows, width): its piece of the first `valid` tokens, then its piece of the
    rest, each split as padded_piece splits."""
    return torch.cat([padded_piece(y[:, :valid], 1, parts, index), padded_piece(y[:, valid:], 1, parts, index)], dim=1)


def _sharded_block(original, family: str, state: ParallelState, text: _Text, first: bool, last: bool, x: torch.Tensor,
                   c, y, transformer_options={}, rope_cos=None, rope_sin=None, crop_y=None, **attn_kwargs):
    """A block's forward on this rank's visual and text tokens; the first block shards them, the last gathers the
    visual tokens back."""
    tokens = rope_cos.shape[0]  # one RoPE row per visual token of the whole grid
    sp = state.sequence
    if first:
        _refuse_unsupported(family, state, tokens, transformer_options)
        if x.shape[1] != tokens:
            raise UnsupportedByXDiT(f"{family}: {x.shape[1]} tokens but {tokens} RoPE positions; this input is not supported in parallel")
        x = split_sequence(x, state, 1)
        text.valid = min(crop_y, y.shape[1])  # stock's crop y[:, :crop_y] keeps this many
        y = shard_text(y, text.valid, sp.size, sp.rank)
    attention = functools.partial(text_rear_attention_override, family, state, (text.valid,))
    options = {**transformer_options, "optimized_attention_override": attention}
    x, y = original(x, c, y, transformer_options=options, rope_cos=padded_piece(rope_cos, 0, sp.size, sp.rank),
                    rope_sin=padded_piece(rope_sin, 0, sp.size, sp.rank), crop_y=chunk_length(text.valid, sp.size), **attn_kwargs)
    return (gather_sequence(x, state, 1, length=tokens), y) if last else (x, y)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose Mochi shards its visual and text tokens over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "rear":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the Mochi hooks run text-at-the-rear joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no Mochi hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    blocks = model_patcher.model.diffusion_model.blocks
    text = _Text()
    for index, block in enumerate(blocks):
        patched.add_object_patch(f"diffusion_model.blocks.{index}.forward", functools.partial(
            _sharded_block, functools.partial(type(block).forward, block), adapter.name, state, text, index == 0,
            index == len(blocks) - 1))
    return patched
