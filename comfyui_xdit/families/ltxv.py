"""LTX-Video (ComfyUI's comfy.ldm.lightricks.model.LTXVModel) computed across ranks.

LTXVModel's forward patchifies the 5-D latent into (frames x rows x cols) tokens (1x1x1 patches), with their
fractional (time, y, x) positions as rows of a RoPE rotation table; image-to-video and keyframe guides make the
timestep per token (a denoise mask) and append guide tokens with their own positions. Each block is self-attention
over all tokens, cross-attention from the tokens to the text (with the text encoder's padding mask), and an FFN,
each modulated by the token's timestep row.

Object patches on a ModelPatcher clone shard that loop, as for Wan (families/wan.py):
- every block's `forward` takes this rank's rows of the tokens (block 0 splits them), of the RoPE table and, where
  the timestep is per token, of its modulation rows; the last block gathers the tokens again, so the head and
  unpatchify see the whole grid;
- every block's `attn1.forward` (self-attention) runs with the `optimized_attention_override` transformer option set
  to usp_attention over the sequence-parallel group (padded rows of an uneven split are dropped from the keys there).
Cross-attention needs no communication: its queries are this rank's tokens, its keys, values and mask the whole text.
A guide-attenuation mask (LTXVAddGuide with strength other than 1) spans every token pair and is refused.
CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools

import torch

from parallel_core import ParallelState, gather_sequence, split_sequence
from parallel_core.sharding import padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import refuse_row_patches, self_attention_override

# transformer_options entries of other nodes that would see (or replace) this rank's rows instead of the whole grid.
_ROW_PATCHES = ("attn1_patch", "attn2_patch")


def _refuse_unsupported(family: str, state: ParallelState, tokens: int, self_attention_mask, transformer_options: dict) -> None:
    refuse_row_patches(family, transformer_options, _ROW_PATCHES)
    if self_attention_mask is not None:
        raise UnsupportedByXDiT(f"{family}: guide attention attenuation (LTXVAddGuide strength other than 1.0, or a guide "
                                "mask) is not supported with sequence parallel; set the strength to 1.0, or set "
                                "ulysses_degree and ring_degree to 1")
    if tokens < state.sequence.size:
        raise UnsupportedByXDiT(f"{family}: this latent makes {tokens} tokens (frames x rows x cols), fewer than the "
                                f"{state.sequence.size} sequence-parallel ranks (ulysses_degree x ring_degree); use a "
                                "larger latent or lower those degrees")


def _sharded_block(original, family: str, state: ParallelState, first: bool, last: bool, x: torch.Tensor, context=None,
                   attention_mask=None, timestep=None, pe=None, transformer_options={}, self_attention_mask=None,
                   prompt_timestep=None):
    """A block's forward on this rank's tokens; block 0 shards them, the last block gathers them back."""
    rotation, split_mode = pe
    tokens = rotation.shape[1]  # the RoPE table has one row per token of the whole sequence
    if first:
        _refuse_unsupported(family, state, tokens, self_attention_mask, transformer_options)
        if x.shape[1] != tokens:
            raise UnsupportedByXDiT(f"{family}: {x.shape[1]} tokens but {tokens} RoPE positions; this input is not supported in parallel")
        x = split_sequence(x, state, 1)
    sp = state.sequence
    if timestep.shape[1] != 1:  # one modulation row per token (a denoise mask): this rank's rows
        timestep = padded_piece(timestep, 1, sp.size, sp.rank)
    out = original(x, context=context, attention_mask=attention_mask, timestep=timestep,
                   pe=(padded_piece(rotation, 1, sp.size, sp.rank), split_mode), transformer_options=transformer_options,
                   self_attention_mask=None, prompt_timestep=prompt_timestep)
    return gather_sequence(out, state, 1, length=tokens) if last else out


def _sharded_self_attention(original, family: str, state: ParallelState, x, context=None, mask=None, pe=None, k_pe=None,
                            transformer_options={}):
    options = {**transformer_options, "optimized_attention_override": functools.partial(self_attention_override, family, state)}
    return original(x, context=context, mask=mask, pe=pe, k_pe=k_pe, transformer_options=options)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose LTXVModel shards its tokens over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "cross":  # these hooks leave text out of self-attention
        raise ValueError(f"the LTXV hooks run cross-attention to text, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no LTXV hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    blocks = model_patcher.model.diffusion_model.transformer_blocks
    for index, block in enumerate(blocks):
        prefix = f"diffusion_model.transformer_blocks.{index}"
        patched.add_object_patch(f"{prefix}.forward", functools.partial(
            _sharded_block, functools.partial(type(block).forward, block), adapter.name, state, index == 0, index == len(blocks) - 1))
        attention = block.attn1
        patched.add_object_patch(f"{prefix}.attn1.forward", functools.partial(
            _sharded_self_attention, functools.partial(type(attention).forward, attention), adapter.name, state))
    return patched
