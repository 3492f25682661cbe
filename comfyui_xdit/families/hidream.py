"""HiDream I1 (ComfyUI's comfy.ldm.hidream.model.HiDreamImageTransformer2DModel) computed across ranks.

HiDream's forward patchifies the latent into image tokens, projects the T5 tokens and each Llama layer it reads,
computes RoPE for [image, text] rows (every text row at position zero), then runs double-stream blocks (image and
text streams, joint attention over [image, text]: text at the rear) and single-stream blocks over the concatenated
[image, text] sequence. Every block's text is [T5, the last Llama layer it reads, this block's Llama layer]; the
forward appends the block's Llama layer before the block and drops it again after.

Each rank holds 1/P of the image tokens and 1/P of each of the three text pieces (zero-padded at the end of each,
as padded_piece splits), so the forward's per-block concatenation and truncation work on local tensors unchanged:
- a DIFFUSION_MODEL wrapper hands the forward this rank's shards of the T5 and Llama tokens and sets the
  `optimized_attention_override` transformer option for the call;
- object patches on a clone of the ModelPatcher: `patchify` returns this rank's image tokens (split_sequence
  records the whole image's length), the RoPE embedder returns the rows of those tokens followed by the text rows,
  `unpatchify` gathers the image tokens back (padding dropped) before folding them into the latent;
- the attention (parallel_glue.text_rear_attention) sends the image and text shards together through Ulysses'
  all-to-all and Ring's blocks, the keys laid out [image, text pieces] as one process has them; each rank keeps its
  own rows.
Padded tokens never act as keys and every other layer is per token (the MoE router included), so they change
nothing. CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools

import comfy.patcher_extension
import torch

from parallel_core import ParallelState, gather_sequence, split_sequence
from parallel_core.sharding import padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import refuse_foreign_attention_override, text_rear_attention_override

WRAPPER_KEY = "comfyui_xdit.hidream_sequence_parallel"
PATCHIFY_KEY = "diffusion_model.patchify"
ROPE_KEY = "diffusion_model.pe_embedder.forward"
UNPATCHIFY_KEY = "diffusion_model.unpatchify"


def _patchify(original, state: ParallelState, x, max_seq, img_sizes=None):
    tokens, masks, img_sizes = original(x, max_seq, img_sizes)
    if masks is not None:  # only for lists of differently sized latents, which ComfyUI's model calls never pass
        raise UnsupportedByXDiT("HiDream's masked (list) latent input is not supported with sequence parallel; "
                                "set ulysses_degree and ring_degree to 1")
    return split_sequence(tokens, state, 1), masks, img_sizes


def _rope_rows(original, state: ParallelState, ids: torch.Tensor) -> torch.Tensor:
    """RoPE of this rank's image rows (zero rows for its padding) followed by its text rows (every text row has
    position zero, so the forward's count of them, from its text shards, is all that matters)."""
    rope = original(ids)
    image = state.lengths["sequence"]
    return torch.cat([padded_piece(rope[:, :image], 1, state.sequence.size, state.sequence.rank), rope[:, image:]], dim=1)


def _unpatchify(original, state: ParallelState, x: torch.Tensor, img_sizes):
    return original(gather_sequence(x, state, 1), img_sizes)


def _stock(obj, method: str):
    # The class's method bound to `obj`: ComfyUI restores an object patch by setting the old value on the instance.
    return functools.partial(getattr(type(obj), method), obj)


def _sequence_parallel_forward(state: ParallelState, executor, x, t, y=None, context=None, encoder_hidden_states_llama3=None,
                               image_cond=None, control=None, transformer_options=None):
    """DIFFUSION_MODEL wrapper: the stock forward on this rank's shards of the T5 and Llama tokens, with this call's
    attention override."""
    transformer_options = transformer_options or {}
    refuse_foreign_attention_override(transformer_options)
    sp = state.sequence
    llama_tokens = encoder_hidden_states_llama3.shape[2]  # (batch, layers, tokens, width)
    # Every block's text is [T5, the last Llama layer, this block's Llama layer], each of them sharded.
    text_lengths = (context.shape[1], llama_tokens, llama_tokens)
    context = padded_piece(context, 1, sp.size, sp.rank)
    encoder_hidden_states_llama3 = padded_piece(encoder_hidden_states_llama3, 2, sp.size, sp.rank)
    options = {**transformer_options,
               "optimized_attention_override": functools.partial(text_rear_attention_override, "HiDream", state, text_lengths)}
    return executor(x, t, y, context, encoder_hidden_states_llama3, image_cond, control, options)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose HiDream shards its image tokens over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "rear":  # the attention override puts text behind the image, as this model's forward does
        raise ValueError(f"the HiDream hooks run text-at-the-rear joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:  # refused by capabilities before this; a wrong entry is a bug
        raise ValueError(f"{adapter.name}: PipeFusion and patch parallel have no HiDream hooks")
    patched = model_patcher.clone()
    if state.sequence.size == 1:
        return patched
    diffusion_model = model_patcher.model.diffusion_model
    patched.add_object_patch(PATCHIFY_KEY, functools.partial(_patchify, _stock(diffusion_model, "patchify"), state))
    patched.add_object_patch(ROPE_KEY, functools.partial(_rope_rows, _stock(diffusion_model.pe_embedder, "forward"), state))
    patched.add_object_patch(UNPATCHIFY_KEY, functools.partial(_unpatchify, _stock(diffusion_model, "unpatchify"), state))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 functools.partial(_sequence_parallel_forward, state))
    return patched
