"""Wan 2.1 and Wan 2.2 (ComfyUI's comfy.ldm.wan.model.WanModel) computed across ranks.

WanModel's forward_orig embeds the 5-D latent with a 3D convolution into (frames x rows x cols) tokens, which carry
their positions as rows of the 3D RoPE table (`freqs`, built for the whole grid), then runs its blocks and the head.
Each block is self-attention over all tokens, cross-attention from the tokens to the text (and, for I2V, the
CLIP image tokens), and an FFN; Wan 2.2's TI2V model modulates each frame with its own timestep (the conditioning
frame has timestep 0), so its modulation table has one row per frame, spread over that frame's tokens.

Object patches on a ModelPatcher clone shard that loop:
- the patch embedding (a convolution whose stride is its kernel: one output per patch) embeds only this rank's
  patches, laid side by side in one row, and the RoPE embedder builds only this rank's rows of the table (it is per
  token), so no rank holds the whole grid's embedded tokens or RoPE table; unpatchify gets the grid's true size back;
- every block's `forward` takes this rank's tokens and RoPE rows (built locally) and, where
  the modulation is per frame, of the modulation rows expanded to tokens exactly as the block itself expands them;
- the head (norm, modulation, projection to patch pixels: per token) runs on this rank's rows too, and only its
  output, 4 x 16 values a token instead of the model's width, is gathered for unpatchify: no rank holds a whole
  block's hidden states after the embedding;
- every block's `self_attn.forward` runs with the `optimized_attention_override` transformer option set to
  usp_attention over the sequence-parallel group (padded rows of an uneven split are dropped from the keys there).
Cross-attention needs no communication: its queries are this rank's tokens, its keys and values the whole context.
CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
Before a job is sent, `refuse_inputs` refuses an image-to-video model sampled without its start image.
"""
from __future__ import annotations

import functools
import math

import torch

from parallel_core import ParallelState, gather_sequence, usp_attention
from parallel_core.sharding import chunk_length, padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import from_bshd, refuse_row_patches, to_bshd

# transformer_options entries of other nodes that would see (or replace) this rank's rows instead of the whole grid.
_ROW_PATCHES = ("double_block", "attn1_patch", "attn2_patch")


def _refuse_unsupported(family: str, state: ParallelState, tokens: int, transformer_options: dict) -> None:
    refuse_row_patches(family, transformer_options, _ROW_PATCHES)
    if tokens < state.sequence.size:
        raise UnsupportedByXDiT(f"{family}: this latent makes {tokens} tokens (frames x rows/2 x cols/2), fewer than the "
                                f"{state.sequence.size} sequence-parallel ranks (ulysses_degree x ring_degree); use a "
                                "larger latent or lower those degrees")


def refuse_inputs(model: torch.nn.Module, conds: dict[str, list[dict]], family: str, model_name: str) -> None:
    """An image-to-video Wan (its patch embedding takes mask and start-image channels beside the noise's: Wan 2.1 I2V,
    Wan 2.2 A14B I2V) sampled with no conditioning that carries a start image: stock would sample it from an all-zero
    image, which is not what an image-to-video workflow means."""
    channels = model.diffusion_model.patch_embedding.weight.shape[1]
    extra = channels - model.latent_format.latent_channels
    if extra <= 0 or any("concat_latent_image" in cond for entries in conds.values() for cond in entries):
        return
    raise UnsupportedByXDiT(f"{model_name} is an image-to-video {family} model (its {channels} input channels are the "
                            f"latent's {channels - extra} and {extra} of mask and start image), but no conditioning carries a "
                            "start image; connect an image to WanImageToVideo's start_image input (stock ComfyUI would "
                            "sample it from an all-zero image)")


def _local_modulation(e: torch.Tensor, tokens: int, state: ParallelState, per_row_ndim: int = 4) -> torch.Tensor:
    """This rank's rows of a modulation `e` whose axis 1 counts rows when it has `per_row_ndim` axes (a block's
    (B, rows, 6, dim), the head's (B, rows, dim)): unchanged when one row serves every token; with one row per frame,
    the rows of this rank's tokens, mapped as the model's repeat_e maps them (then repeat_e leaves them as they are)."""
    from comfy.ldm.wan.model import repeat_e

    if e.ndim < per_row_ndim or e.shape[1] == 1:
        return e
    row_of_token = repeat_e(torch.arange(e.shape[1], device=e.device).unsqueeze(0), torch.empty(1, tokens, 0))[0]
    if row_of_token.shape[0] != tokens:
        raise UnsupportedByXDiT(f"{e.shape[1]} modulation rows do not spread over {tokens} tokens")
    local = padded_piece(row_of_token, 0, state.sequence.size, state.sequence.rank)  # padding rows read row 0
    return e.index_select(1, local)


def _local_embedding(original, state: ParallelState, grid: dict, patch_size: tuple[int, int, int],
                     x: torch.Tensor) -> torch.Tensor:
    """The patch embedding of this rank's tokens only, shaped (B, dim, 1, 1, local tokens) so that forward_orig's
    flatten gives them in order. The convolution's stride is its kernel, so each token's output reads its own patch
    alone: this rank's patches (a padded piece of the grid's, in token order) are laid side by side and convolved."""
    b, c, frames, rows, cols = x.shape
    pt, ph, pw = patch_size
    sizes = (frames // pt, rows // ph, cols // pw)  # forward pads the latent to whole patches
    tokens = math.prod(sizes)
    grid["sizes"] = sizes
    state.lengths["sequence"] = tokens
    patches = x.view(b, c, sizes[0], pt, sizes[1], ph, sizes[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    local = padded_piece(patches.reshape(b, tokens, c, pt, ph, pw), 1, state.sequence.size, state.sequence.rank)
    return original(local.permute(0, 2, 3, 4, 1, 5).reshape(b, c, pt, ph, local.shape[1] * pw))


def _local_rope(original, state: ParallelState, grid: dict, ids: torch.Tensor) -> torch.Tensor:
    """RoPE rows of this rank's tokens only: `ids` (1, tokens, 3) are the grid's positions, and each row of the table
    is computed from its own position alone, so a piece of them gives that piece of stock's table."""
    grid["tokens"] = ids.shape[1]
    return original(padded_piece(ids, 1, state.sequence.size, state.sequence.rank))  # padding rows: position 0


def _full_grid_unpatchify(original, grid: dict, x: torch.Tensor, grid_sizes) -> torch.Tensor:
    return original(x, grid["sizes"])  # forward_orig read the grid off the local embedding: (1, 1, local tokens)


def _sharded_block(original, family: str, state: ParallelState, grid: dict, index: int, x: torch.Tensor,
                   e: torch.Tensor, freqs: torch.Tensor, context: torch.Tensor, context_img_len=257,
                   transformer_options={}):
    """A block's forward on this rank's tokens and RoPE rows; block 0 checks that they are the grid's pieces."""
    tokens = grid["tokens"]  # the grid's RoPE positions, counted by _local_rope
    if index == 0:
        _refuse_unsupported(family, state, tokens, transformer_options)
        local = chunk_length(tokens, state.sequence.size)
        if x.shape[1] != local or freqs.shape[1] != local or math.prod(grid["sizes"]) != tokens:
            raise UnsupportedByXDiT(f"{family}: this rank holds {x.shape[1]} tokens of a grid of {tokens} RoPE positions "
                                    "(reference or in-context latents add tokens); this input is not supported in parallel")
        transformer_options["grid_sizes"] = torch.Size(grid["sizes"])  # what other readers expect, not the local row
    return original(x, e=_local_modulation(e, tokens, state), freqs=freqs, context=context,
                    context_img_len=context_img_len, transformer_options=transformer_options)


def _sharded_head(original, state: ParallelState, grid: dict, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The head on this rank's tokens, then its (narrow) output gathered whole for unpatchify."""
    tokens = grid["tokens"]
    return gather_sequence(original(x, _local_modulation(e, tokens, state, per_row_ndim=3)), state, 1, length=tokens)


def _usp_override(state: ParallelState, func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                  transformer_options=None, **kwargs):
    """ComfyUI's optimized_attention replaced, inside self-attention only, by attention over every rank's tokens."""
    if mask is not None:
        raise UnsupportedByXDiT("an attention mask on Wan's self-attention is not supported in parallel; remove it or use UNETLoader")
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    return from_bshd(usp_attention(q, k, v, state, scale=kwargs.get("scale")), skip_output_reshape)


def _sharded_self_attention(original, state: ParallelState, x: torch.Tensor, freqs: torch.Tensor, transformer_options={}):
    options = {**transformer_options, "optimized_attention_override": functools.partial(_usp_override, state)}
    return original(x, freqs, transformer_options=options)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose WanModel shards its tokens over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "cross":  # these hooks leave text out of self-attention
        raise ValueError(f"the Wan hooks run cross-attention to text, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no Wan hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    diffusion_model = model_patcher.model.diffusion_model
    grid: dict = {}  # the grid being sampled (patches, token count): from the embedders to the head and unpatchify
    for index, block in enumerate(diffusion_model.blocks):
        prefix = f"diffusion_model.blocks.{index}"
        patched.add_object_patch(f"{prefix}.forward", functools.partial(
            _sharded_block, functools.partial(type(block).forward, block), adapter.name, state, grid, index))
        attention = block.self_attn
        patched.add_object_patch(f"{prefix}.self_attn.forward", functools.partial(
            _sharded_self_attention, functools.partial(type(attention).forward, attention), state))
    head = diffusion_model.head
    patched.add_object_patch("diffusion_model.head.forward", functools.partial(
        _sharded_head, functools.partial(type(head).forward, head), state, grid))
    embedding = diffusion_model.patch_embedding
    patched.add_object_patch("diffusion_model.patch_embedding.forward", functools.partial(
        _local_embedding, functools.partial(type(embedding).forward, embedding), state, grid, tuple(diffusion_model.patch_size)))
    rope = diffusion_model.rope_embedder
    patched.add_object_patch("diffusion_model.rope_embedder.forward", functools.partial(
        _local_rope, functools.partial(type(rope).forward, rope), state, grid))
    patched.add_object_patch("diffusion_model.unpatchify", functools.partial(
        _full_grid_unpatchify, functools.partial(type(diffusion_model).unpatchify, diffusion_model), grid))
    return patched
