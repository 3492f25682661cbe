"""Qwen-Image (ComfyUI's comfy.ldm.qwen_image.model.QwenImageTransformer2DModel) computed across ranks.

Qwen-Image's forward patchifies the 5-D latent, embeds image and text and runs its blocks in one method, so there is
no token-level forward to patch as on Flux. Its own extension points are used instead, all set per call by a
DIFFUSION_MODEL wrapper on a clone of the ModelPatcher:
- a "post_input" patch (after the image/text embeddings, before RoPE) splits image tokens and text tokens, with
  their RoPE positions, over the sequence-parallel group, so each rank's rows are [its text shard, its image shard]
  and RoPE is computed for exactly those rows (Qwen-Image-Edit's reference-image tokens, appended to the image
  tokens by then, are split with them);
- the `optimized_attention_override` transformer option runs the joint [text, image] attention with usp_attention,
  text rows in front, both kinds of rows in the all-to-all and ring (the attention Flux's adapter uses: the layout is the same);
- a "double_block" patch after the last block gathers the image tokens back, so the final layer and the unpatchify
  see the whole image.

PipeFusion and displaced patch parallel (stale_forwards.py) need a forward of just the tokens they pick (a band of
image rows, a shard of it, one throwaway text row). Stock's forward gives one through the same hooks: run on a
stand-in latent one patch high whose patches are exactly those image tokens, with those text rows as the context,
its post_input patch puts the tokens' true RoPE positions in place; its output, patchified again (process_img, a
pure permutation), is those tokens' output. The only stock lines repeated here are the text positions and the final
unpatchify (tested equal to stock's forward in-process). Reference images (Qwen-Image-Edit) are refused for these
two methods: stock appends their tokens inside the forward, out of the methods' reach.
CFG and data parallel are family-independent wrappers (cfg_parallel.py, parallel_glue.py).
"""
from __future__ import annotations

import functools
from typing import Any

import comfy.patcher_extension
import torch

from parallel_core import ParallelState, gather_sequence, split_sequence
from parallel_core.sharding import padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import patches_at, refuse_foreign_attention_override, text_front_attention_override
from ..pipefusion_lookahead import FamilyCall
from ..stale_forwards import dit_block_keys, stale_method

WRAPPER_KEY = "comfyui_xdit.qwen_image_sequence_parallel"
STALE_WRAPPER_KEY = "comfyui_xdit.qwen_image_stale_methods"
TOKEN_PATCH_POINTS = ("post_input", "double_block")  # the forward's patch lists this module takes over


def _shard_tokens(state: ParallelState, args: dict) -> dict:
    """post_input patch: this rank's rows of the image and text streams and of their RoPE positions."""
    sp = state.sequence
    return {**args,
            "img": split_sequence(args["img"], state, 1), "img_ids": split_sequence(args["img_ids"], state, 1),
            "txt": padded_piece(args["txt"], 1, sp.size, sp.rank), "txt_ids": padded_piece(args["txt_ids"], 1, sp.size, sp.rank)}


def _gather_after_last_block(state: ParallelState, args: dict) -> dict:
    """double_block patch: the whole image stream again once the last block has run (text is not used after it)."""
    if args["block_index"] != args["transformer_options"]["total_blocks"] - 1:
        return args
    return {**args, "img": gather_sequence(args["img"], state, 1)}


def refuse_unsupported(ref_method: str | None, attention_mask, kwargs: dict[str, Any], transformer_options: dict) -> None:
    """Raise for the inputs of Qwen-Image's forward that the sequence-parallel path does not handle.
    `ref_method`: how reference images (Qwen-Image-Edit) join the tokens; None without reference images."""
    if kwargs.get("control") is not None:
        raise UnsupportedByXDiT("ControlNet on Qwen-Image is not supported in parallel yet; remove the ControlNet apply node or use UNETLoader")
    # Reference tokens are appended to the image tokens and sharded with them; only this method treats token
    # ranges differently inside the blocks (timestep-zero modulation from a token index).
    if ref_method == "index_timestep_zero":
        raise UnsupportedByXDiT("reference images with ref_latents_method 'index_timestep_zero' (Qwen-Image-Edit-2511) are not "
                                "supported with sequence parallel yet; set ulysses_degree and ring_degree to 1 or use UNETLoader")
    if attention_mask is not None:
        raise UnsupportedByXDiT("a text attention mask on Qwen-Image is not supported with sequence parallel; "
                                "set ulysses_degree and ring_degree to 1 or use UNETLoader")
    # Other nodes' patches at these points (e.g. Qwen-Image's DiffSynth and blockwise ControlNets) index the
    # whole image's tokens, which no rank holds between the two.
    patched = patches_at(transformer_options, TOKEN_PATCH_POINTS)
    if patched:
        raise UnsupportedByXDiT(f"a model patch on Qwen-Image's {' and '.join(patched)} (e.g. a DiffSynth or blockwise ControlNet) "
                                "is not supported with sequence parallel; remove it, or set ulysses_degree and ring_degree to 1")
    refuse_foreign_attention_override(transformer_options)


def _sequence_parallel_forward(state: ParallelState, default_ref_method: str, executor, x: torch.Tensor, timestep,
                               context: torch.Tensor, attention_mask=None, ref_latents=None, additional_t_cond=None,
                               transformer_options=None, **kwargs):
    """DIFFUSION_MODEL wrapper: the stock forward with this call's sharding patches and attention override."""
    transformer_options = transformer_options or {}
    ref_method = None if ref_latents is None else kwargs.get("ref_latents_method", default_ref_method)
    refuse_unsupported(ref_method, attention_mask, kwargs, transformer_options)
    options = dict(transformer_options)
    options["patches"] = {**options.get("patches", {}), "post_input": [functools.partial(_shard_tokens, state)],
                          "double_block": [functools.partial(_gather_after_last_block, state)]}
    options["optimized_attention_override"] = functools.partial(text_front_attention_override, "Qwen-Image", state, context.shape[1])
    return executor(x, timestep, context, attention_mask, ref_latents, additional_t_cond, options, **kwargs)


def _unpatchify(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Stock's last step: (B, tokens, C x 2 x 2) patches back into a latent of `shape` (B, C, T, H, W), H and W even."""
    out = tokens.reshape(shape[0], shape[-3], shape[-2] // 2, shape[-1] // 2, shape[1], 2, 2)
    return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(shape)


def _text_positions(x: torch.Tensor, context: torch.Tensor, patch: int) -> torch.Tensor:
    """Stock's RoPE positions of the text tokens: one index on every axis, after the image's centred grid."""
    start = round(max(((x.shape[-1] + patch // 2) // patch) // 2, ((x.shape[-2] + patch // 2) // patch) // 2))
    return torch.arange(start, start + context.shape[1], device=x.device).reshape(1, -1, 1).repeat(x.shape[0], 1, 3)


def _with_positions(img_ids: torch.Tensor, txt_ids: torch.Tensor, args: dict) -> dict:
    """post_input patch: the true RoPE positions of the tokens the stand-in latent carries."""
    return {**args, "img_ids": img_ids, "txt_ids": txt_ids}


def _token_call(executor, diffusion_model, timestep, additional_t_cond, kwargs: dict, img: torch.Tensor, img_ids: torch.Tensor,
                txt: torch.Tensor, txt_ids: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """Stock's forward on just these tokens (stale_forwards.TokenCall): img, patches of the latent (B, n, C x 2 x 2),
    and txt, rows of the context, at the positions img_ids and txt_ids; returns the image tokens' output."""
    stand_in = _unpatchify(img, torch.Size((img.shape[0], img.shape[2] // 4, 1, 2, 2 * img.shape[1])))  # 1 x n patches
    options = dict(transformer_options)
    options["patches"] = {**options.get("patches", {}), "post_input": [functools.partial(_with_positions, img_ids, txt_ids)]}
    out = executor(stand_in, timestep, txt, None, None, additional_t_cond, options, **kwargs)
    return diffusion_model.process_img(out)[0]


def _stale_forward(method, family: str, executor, x: torch.Tensor, timestep, context: torch.Tensor, attention_mask=None,
                   ref_latents=None, additional_t_cond=None, transformer_options=None, **kwargs):
    """DIFFUSION_MODEL wrapper: stock's forward run by a stale-activation method (stale_forwards.stale_method) on token
    subsets of the patchified latent and the context."""
    transformer_options = transformer_options or {}
    if ref_latents is not None:
        raise UnsupportedByXDiT(f"PipeFusion and patch parallel on {family} do not take reference images (Qwen-Image-Edit, "
                                "ReferenceLatent): stock appends their tokens inside its forward; set pipefusion_degree and "
                                "patch_degree to 1 (ulysses, ring, cfg and data parallel take them)")
    refuse_unsupported(None, attention_mask, kwargs, transformer_options)
    diffusion_model = executor.class_obj
    img, img_ids, shape = diffusion_model.process_img(x)
    txt_ids = _text_positions(x, context, diffusion_model.patch_size)
    def call_at(timesteps):
        return functools.partial(_token_call, executor, diffusion_model, timesteps, additional_t_cond, kwargs)

    # PipeFusion's lookahead checks that the next call repeats every input but the latent and timestep: tensors only.
    extra = [kwargs[key] for key in sorted(kwargs)]
    family_call = FamilyCall(call_at, timestep, (additional_t_cond, *extra), lambda latent: diffusion_model.process_img(latent)[0]) \
        if all(value is None or isinstance(value, torch.Tensor) for value in extra) else None
    out = method(call_at(timestep), img, img_ids, context, txt_ids, transformer_options, family_call=family_call)
    return _unpatchify(out, shape)[:, :, :, :x.shape[-2], :x.shape[-1]]


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose Qwen-Image shards its tokens over `state`'s sequence group (or runs PipeFusion
    stages or displaced patch parallel); `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "front":  # the attention override puts text in front, as this model's forward does
        raise ValueError(f"the Qwen-Image hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    if state.pipefusion.size > 1 or state.patch.size > 1:
        blocks = dit_block_keys(len(model_patcher.model.diffusion_model.transformer_blocks))
        patched, method = stale_method(model_patcher, state, adapter.name, adapter.block_containers, blocks)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, STALE_WRAPPER_KEY,
                                     functools.partial(_stale_forward, method, adapter.name))
        return patched
    patched = model_patcher.clone()
    if state.sequence.size > 1:
        default_ref_method = model_patcher.model.diffusion_model.default_ref_method
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     functools.partial(_sequence_parallel_forward, state, default_ref_method))
    return patched
