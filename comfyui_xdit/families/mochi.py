"""Mochi (ComfyUI's comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint) computed across ranks.

Mochi's forward embeds the 5-D latent into (frames x rows/2 x cols/2) visual tokens with a RoPE rotation row each,
projects the T5 tokens into a narrower text stream, then runs asymmetric joint blocks: visual and text tokens keep
their own widths and weights, and meet in one attention over [visual, the first `num_tokens` text tokens] (text at
the rear; the padded T5 tokens are cropped out of it, the stock way of masking them). The head sees visual tokens only.

Object patches on the blocks of a ModelPatcher clone shard the visual tokens; the text stream (at most 256 T5
tokens) stays whole on every rank:
- the first block takes this rank's rows of the visual tokens (split_sequence); every block takes the same rows of
  the RoPE tables and runs with the `optimized_attention_override` transformer option set to usp_attention with the
  cropped text as joint tokens behind the visual ones (its keys and values are whole on every rank already);
- the last block gathers the visual rows, so the head and the unpatchify see the whole grid.
CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools

import torch

from parallel_core import ParallelState, gather_sequence, split_sequence, usp_attention
from parallel_core.sharding import chunk_length, padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import from_bshd, refuse_foreign_attention_override, to_bshd


def _refuse_unsupported(family: str, state: ParallelState, tokens: int, transformer_options: dict) -> None:
    if transformer_options.get("patches_replace", {}).get("dit"):
        raise UnsupportedByXDiT(f"a dit block replacement on {family} is not supported with sequence parallel; remove "
                                "the node that adds it, or set ulysses_degree and ring_degree to 1")
    refuse_foreign_attention_override(transformer_options)
    if tokens < state.sequence.size:
        raise UnsupportedByXDiT(f"{family}: this latent makes {tokens} tokens (frames x rows/2 x cols/2), fewer than the "
                                f"{state.sequence.size} sequence-parallel ranks (ulysses_degree x ring_degree); use a "
                                "larger latent or lower those degrees")


def _visual_text_attention(family: str, state: ParallelState, func, q, k, v, heads, mask=None, skip_reshape=False,
                           skip_output_reshape=False, transformer_options=None, **kwargs):
    """[this rank's visual rows, the whole cropped text] attending to every rank's visual rows and the text."""
    if mask is not None:
        raise UnsupportedByXDiT(f"an attention mask on {family} is not supported in parallel; remove it or use UNETLoader")
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    local = chunk_length(state.lengths["sequence"], state.sequence.size)
    out = usp_attention(q[:, :local], k[:, :local], v[:, :local], state, joint_q=q[:, local:], joint_k=k[:, local:],
                        joint_v=v[:, local:], joint_strategy="rear", scale=kwargs.get("scale"))
    return from_bshd(out, skip_output_reshape)


def _sharded_block(original, family: str, state: ParallelState, first: bool, last: bool, x: torch.Tensor, c, y,
                   transformer_options={}, rope_cos=None, rope_sin=None, **attn_kwargs):
    """A block's forward on this rank's visual tokens; the first block shards them, the last gathers them back."""
    tokens = rope_cos.shape[0]  # one RoPE row per visual token of the whole grid
    if first:
        _refuse_unsupported(family, state, tokens, transformer_options)
        if x.shape[1] != tokens:
            raise UnsupportedByXDiT(f"{family}: {x.shape[1]} tokens but {tokens} RoPE positions; this input is not supported in parallel")
        x = split_sequence(x, state, 1)
    sp = state.sequence
    options = {**transformer_options, "optimized_attention_override": functools.partial(_visual_text_attention, family, state)}
    x, y = original(x, c, y, transformer_options=options, rope_cos=padded_piece(rope_cos, 0, sp.size, sp.rank),
                    rope_sin=padded_piece(rope_sin, 0, sp.size, sp.rank), **attn_kwargs)
    return (gather_sequence(x, state, 1, length=tokens), y) if last else (x, y)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose Mochi shards its visual tokens over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "rear":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the Mochi hooks run text-at-the-rear joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no Mochi hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    blocks = model_patcher.model.diffusion_model.blocks
    for index, block in enumerate(blocks):
        patched.add_object_patch(f"diffusion_model.blocks.{index}.forward", functools.partial(
            _sharded_block, functools.partial(type(block).forward, block), adapter.name, state, index == 0, index == len(blocks) - 1))
    return patched
