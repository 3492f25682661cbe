"""Flux (ComfyUI's comfy.ldm.flux.model.Flux) computed across ranks.

Image tokens and their RoPE positions are split over the sequence-parallel group, text tokens stay replicated
(joint attention, text in front), and every attention call of the double and single blocks goes through
usp_attention. The batch is split over the data group; conds over the cfg group (cfg_parallel.py).

All of it is attached to a clone of the ModelPatcher through ComfyUI's extension points: an object patch of the
diffusion model's `forward_orig` (active only while that clone is the one patched in) and, inside it, the
`optimized_attention_override` transformer option. The original ModelPatcher and other models are untouched.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from parallel_core import ParallelState, gather_batch, gather_sequence, split_batch, split_sequence, usp_attention

from .errors import UnsupportedByXDiT

OBJECT_PATCH_KEY = "diffusion_model.forward_orig"


def is_flux(diffusion_model: torch.nn.Module) -> bool:
    from comfy.ldm.flux.model import Flux

    return isinstance(diffusion_model, Flux)


def num_heads(diffusion_model: torch.nn.Module) -> int:
    return diffusion_model.num_heads


def _usp_attention_override(state: ParallelState, text_len: int, func, q, k, v, heads, mask=None, skip_reshape=False,
                            skip_output_reshape=False, transformer_options=None, **kwargs):
    """Replaces ComfyUI's optimized_attention for Flux's joint [text, image] attention."""
    if mask is not None:
        raise UnsupportedByXDiT("an attention mask on Flux (e.g. from an attention-mask node) is not supported in parallel; remove it or use UNETLoader")
    if not skip_reshape:  # (B, S, H*D) -> (B, H, S, D), the layout Flux passes
        b, s, _ = q.shape
        q, k, v = (t.view(b, s, heads, -1).transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D)
    out = usp_attention(
        q[:, text_len:], k[:, text_len:], v[:, text_len:], state,
        joint_q=q[:, :text_len], joint_k=k[:, :text_len], joint_v=v[:, :text_len], joint_strategy="front",
        scale=kwargs.get("scale"),
    )
    if skip_output_reshape:
        return out.transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _split_batch_inputs(state: ParallelState, tensors: list[Any]) -> list[Any]:
    return [split_batch(t, state, 0, "data") if isinstance(t, torch.Tensor) else t for t in tensors]


def _parallel_forward_orig(original, state: ParallelState, img, img_ids, txt, txt_ids, timesteps, y, guidance=None,
                           control=None, timestep_zero_index=None, transformer_options=None, attn_mask=None):
    if control is not None:
        raise UnsupportedByXDiT("ControlNet on Flux is not supported in parallel yet; remove the ControlNet apply node or use UNETLoader")
    if timestep_zero_index is not None:
        raise UnsupportedByXDiT("reference latents with ref_latents_method 'index_timestep_zero' are not supported in parallel; use another method")
    if attn_mask is not None:
        raise UnsupportedByXDiT("an attention mask on Flux is not supported in parallel; remove it or use UNETLoader")
    transformer_options = transformer_options or {}
    if "optimized_attention_override" in transformer_options:
        raise UnsupportedByXDiT("another node pack already overrides attention on this model; remove that patch to sample with XDiT")
    if state.data.size > 1:
        img, img_ids, txt, txt_ids, timesteps, y, guidance = _split_batch_inputs(state, [img, img_ids, txt, txt_ids, timesteps, y, guidance])
    img = split_sequence(img, state, 1)
    img_ids = split_sequence(img_ids, state, 1)
    options = dict(transformer_options)
    options["optimized_attention_override"] = functools.partial(_usp_attention_override, state, txt.shape[1])
    out = original(img, img_ids, txt, txt_ids, timesteps, y, guidance, None, transformer_options=options)
    out = gather_sequence(out, state, 1)
    if state.data.size > 1:
        out = gather_batch(out, state, 0, "data")
    return out


def parallelize(model_patcher, state: ParallelState):
    """A clone of `model_patcher` whose Flux runs over `state`'s sequence and data groups."""
    diffusion_model = model_patcher.model.diffusion_model
    original = functools.partial(type(diffusion_model).forward_orig, diffusion_model)
    patched = model_patcher.clone()
    patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_parallel_forward_orig, original, state))
    return patched
