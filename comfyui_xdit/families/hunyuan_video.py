"""HunyuanVideo 1.0 and 1.5 (ComfyUI's comfy.ldm.hunyuan_video.model.HunyuanVideo) computed across ranks.

HunyuanVideo's forward_orig embeds the 5-D latent into (frames x rows x cols) image tokens, refines the text tokens
(a small transformer over the whole text, with the text encoder's padding mask), puts 1.5's ByT5 glyph tokens and
CLIP-vision tokens in front of them, builds RoPE for [text, image] rows, then runs Flux's double-stream blocks (joint
attention over [text, image]: text in front) and single-stream blocks over the concatenated [text, image] sequence.

Object patches on the blocks of a ModelPatcher clone shard that loop (the text refiner and the head stay stock):
- the first double block takes this rank's rows of the text (padded_piece) and of the image tokens
  (split_sequence); every block takes the same rows of the RoPE table and runs with the `optimized_attention_override`
  transformer option set to parallel_glue.text_front_attention (text and image rows together through the all-to-all and ring);
- the last block gathers the image rows, so forward_orig's final slice [its text rows : + image length] and its
  head see the whole grid (hidden states are only ever whole outside the block loop);
- a text padding mask (the forward's additive key mask, 0 or -max per text token) is applied by dropping the
  masked text tokens before sharding: a key of weight exp(-max) = 0 contributes nothing, and the masked rows' own
  outputs reach the image only as such keys, so the image rows are stock's;
- per-token modulation ranges (HunyuanVideo I2V's guiding frame, `modulation_dims`) are mapped to the local rows.
CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools

import torch

from parallel_core import ParallelState, gather_sequence, split_sequence
from parallel_core.sharding import padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import refuse_row_patches, text_front_attention_override

# transformer_options patches of Flux's blocks that would see this rank's rows instead of the whole sequence.
_ROW_PATCHES = ("attn1_patch", "attn1_output_patch")


def _refuse_unsupported(family: str, control, transformer_options: dict) -> None:
    if control is not None:
        raise UnsupportedByXDiT(f"ControlNet on {family} is not supported in parallel; remove the ControlNet apply node "
                                "or set ulysses_degree and ring_degree to 1")
    refuse_row_patches(family, transformer_options, _ROW_PATCHES)


def _checked_forward_orig(original, family: str, *args, control=None, transformer_options={}, **kwargs):
    """forward_orig, after refusing what the block hooks cannot see (ControlNet, row patches), before any work."""
    _refuse_unsupported(family, control, transformer_options)
    return original(*args, control=control, transformer_options=transformer_options, **kwargs)


def _kept_text(family: str, attn_mask: torch.Tensor | None, text_len: int) -> torch.Tensor | None:
    """Indices of the text tokens the forward's additive key mask leaves unmasked; None when there is no mask."""
    if attn_mask is None:
        return None
    if attn_mask.ndim != 3 or attn_mask.shape[:2] != (1, 1):
        raise UnsupportedByXDiT(f"{family}: an attention mask of shape {tuple(attn_mask.shape)} is not supported in "
                                "parallel (only the text encoder's padding mask is); remove it or use UNETLoader")
    text_bias = attn_mask[0, 0, :text_len]
    # The forward writes -max of its dtype for a padded token: exp() of that is exactly 0, so such keys take no weight.
    masked = text_bias <= -torch.finfo(text_bias.dtype).max / 2
    if not bool((masked | (text_bias == 0)).all()) or bool(attn_mask[0, 0, text_len:].any()):
        raise UnsupportedByXDiT(f"{family}: an attention mask with values other than the text padding mask's is not "
                                "supported in parallel; remove the node that adds it, or use UNETLoader")
    return (~masked).nonzero().flatten()


def _pieces(index: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """This rank's padded_piece of a 1-D index tensor, padding rows marked -1."""
    return padded_piece(index + 1, 0, state.sequence.size, state.sequence.rank) - 1


class _Layout:
    """Which rows of the whole [text, image] sequence this rank holds, for one model call's blocks."""

    def __init__(self, family: str, state: ParallelState, pe: torch.Tensor, attn_mask: torch.Tensor | None, image_len: int):
        self.image_len = image_len
        self.text_len = pe.shape[2] - image_len  # the forward's RoPE table has one row per text and image token
        kept = _kept_text(family, attn_mask, self.text_len)
        self.kept = torch.arange(self.text_len) if kept is None else kept.cpu()
        self.text = _pieces(self.kept, state)  # positions of this rank's text rows in the text (-1: padding)
        self.image = _pieces(torch.arange(image_len), state)  # ... of its image rows in the image
        # ... of both in the whole [text, image] sequence
        self.rows = torch.cat([self.text, torch.where(self.image >= 0, self.image + self.text_len, -1)])
        self.pe = pe.index_select(2, self.rows.clamp(min=0).to(pe.device))

    def attention_options(self, family: str, state: ParallelState, transformer_options: dict) -> dict:
        options = dict(transformer_options)
        options["optimized_attention_override"] = functools.partial(text_front_attention_override, family, state, len(self.kept))
        return options


def _local_dims(dims, positions: torch.Tensor):
    """Modulation ranges (start, end or None, modulation row) over global rows, as ranges over the local rows whose
    global positions are `positions` (-1: padding, in no range)."""
    if dims is None:
        return None
    local = []
    for start, end, row in dims:
        inside = (positions >= start) & (positions >= 0)
        if end is not None:
            inside &= positions < end
        flags = inside.tolist()
        i = 0
        while i < len(flags):
            if not flags[i]:
                i += 1
                continue
            j = i
            while j < len(flags) and flags[j]:
                j += 1
            local.append((i, j, row))
            i = j
    return local


def _sharded_double(original, family: str, state: ParallelState, first: bool, last: bool, img, txt, vec, pe,
                    attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None, transformer_options={}):
    if first:
        if img.shape[1] < state.sequence.size:
            raise UnsupportedByXDiT(f"{family}: this latent makes {img.shape[1]} image tokens, fewer than the "
                                    f"{state.sequence.size} sequence-parallel ranks (ulysses_degree x ring_degree); use a "
                                    "larger latent or lower those degrees")
        layout = _Layout(family, state, pe, attn_mask, img.shape[1])
        txt = padded_piece(txt.index_select(1, layout.kept.to(txt.device)), 1, state.sequence.size, state.sequence.rank)
        img = split_sequence(img, state, 1)
    else:
        layout = _Layout(family, state, pe, attn_mask, state.lengths["sequence"])
    img, txt = original(img=img, txt=txt, vec=vec, pe=layout.pe, attn_mask=None,
                        modulation_dims_img=_local_dims(modulation_dims_img, layout.image),
                        modulation_dims_txt=_local_dims(modulation_dims_txt, layout.text),
                        transformer_options=layout.attention_options(family, state, transformer_options))
    return (gather_sequence(img, state, 1, length=layout.image_len), txt) if last else (img, txt)


def _sharded_single(original, family: str, state: ParallelState, last: bool, x, vec, pe, attn_mask=None,
                    modulation_dims=None, transformer_options={}):
    layout = _Layout(family, state, pe, attn_mask, state.lengths["sequence"])
    out = original(x, vec=vec, pe=layout.pe, attn_mask=None, modulation_dims=_local_dims(modulation_dims, layout.rows),
                   transformer_options=layout.attention_options(family, state, transformer_options))
    if not last:
        return out
    # forward_orig slices [its (local) text rows : + the whole image's length] out of this: keep the text rows in front.
    text_local = len(layout.text)
    return torch.cat([out[:, :text_local], gather_sequence(out[:, text_local:], state, 1, length=layout.image_len)], dim=1)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose HunyuanVideo shards its tokens over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "front":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the HunyuanVideo hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no HunyuanVideo hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    diffusion_model = model_patcher.model.diffusion_model
    doubles, singles = diffusion_model.double_blocks, diffusion_model.single_blocks
    if len(doubles) == 0:
        raise UnsupportedByXDiT(f"{adapter.name}: a model without double-stream blocks has no text/image split to shard; "
                                "set ulysses_degree and ring_degree to 1")
    name = adapter.name
    patched.add_object_patch("diffusion_model.forward_orig", functools.partial(
        _checked_forward_orig, functools.partial(type(diffusion_model).forward_orig, diffusion_model), name))
    for index, block in enumerate(doubles):
        patched.add_object_patch(f"diffusion_model.double_blocks.{index}.forward", functools.partial(
            _sharded_double, functools.partial(type(block).forward, block), name, state, index == 0,
            index == len(doubles) - 1 and len(singles) == 0))
    for index, block in enumerate(singles):
        patched.add_object_patch(f"diffusion_model.single_blocks.{index}.forward", functools.partial(
            _sharded_single, functools.partial(type(block).forward, block), name, state, index == len(singles) - 1))
    return patched
