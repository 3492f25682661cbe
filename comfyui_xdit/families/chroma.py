"""Chroma and Chroma Radiance (ComfyUI's comfy.ldm.chroma.model.Chroma and its pixel-space subclass
comfy.ldm.chroma_radiance.model.ChromaRadiance) computed across ranks.

Chroma is Flux's double/single-block transformer without the pooled vector: its modulations come from a distilled
approximator of timestep and guidance alone, the same for every token, so each rank computes them whole and only
the tokens are sharded, exactly as on Flux (families/flux.py: text and image rows with their RoPE positions over the
sequence-parallel group, joint [text, image] attention with both kinds of rows in the all-to-all and ring, image rows gathered at the end).

Chroma Radiance hands forward_orig the padded pixel image and patchifies it there (a strided conv, `img_in`), so
its image tokens are sharded by an object patch of `img_in` instead; its per-patch NeRF head runs after
forward_orig on the gathered tokens, on every rank, as in stock.

Chroma also takes PipeFusion and displaced patch parallel (stale_forwards.py) with its forward_orig run on the
tokens they pick. Chroma Radiance does not: its forward_orig receives pixels, so there are no token rows to cut
before the call.

Stock passes an attention mask only when a node attached one to the conditioning with an image shape (e.g. a style
model's attention bias); that is refused by name. CFG and data parallel are the family-independent wrappers.
Everything is attached to a clone of the ModelPatcher as object patches; the original stays stock.
"""
from __future__ import annotations

import functools

import einops
import torch

import comfy.ldm.common_dit

from parallel_core import ParallelState, gather_sequence, split_sequence

from ..pipefusion_lookahead import FamilyCall
from ..stale_forwards import dit_block_keys, stale_method
from .flux import OBJECT_PATCH_KEY, joint_attention_options, refuse_unsupported, shard_tokens

IMAGE_IN_PATCH_KEY = "diffusion_model.img_in"


def _parallel_forward_orig(original, state: ParallelState, family: str, image_split_by_img_in: bool, img, img_ids, txt,
                           txt_ids, timesteps, guidance=None, control=None, transformer_options=None, attn_mask=None):
    transformer_options = transformer_options or {}
    refuse_unsupported(control, None, attn_mask, transformer_options, family)
    text_len = txt.shape[1]
    txt, txt_ids, img_ids = shard_tokens(state, txt, txt_ids, img_ids)
    if not image_split_by_img_in:
        img = split_sequence(img, state, 1)
    out = original(img, img_ids, txt, txt_ids, timesteps, guidance, None,
                   transformer_options=joint_attention_options(family, state, text_len, transformer_options))
    return gather_sequence(out, state, 1)


def _stale_forward_orig(original, method, family: str, img, img_ids, txt, txt_ids, timesteps, guidance=None, control=None,
                        transformer_options=None, attn_mask=None):
    """Chroma's forward_orig run by a stale-activation method (stale_forwards.stale_method) on token subsets."""
    transformer_options = transformer_options or {}
    refuse_unsupported(control, None, attn_mask, transformer_options, family)

    def call_at(timesteps):
        def call(img, img_ids, txt, txt_ids, options):
            return original(img, img_ids, txt, txt_ids, timesteps, guidance, None, transformer_options=options)
        return call

    def image_tokens(latent):  # stock Chroma's patchify in its _forward (original is forward_orig bound to the model)
        patch = original.args[0].patch_size
        padded = comfy.ldm.common_dit.pad_to_patch_size(latent, (patch, patch))
        return einops.rearrange(padded, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)

    return method(call_at(timesteps), img, img_ids, txt, txt_ids, transformer_options,
                  family_call=FamilyCall(call_at, timesteps, (guidance,), image_tokens))


def _sharded_img_in(original, state: ParallelState, img: torch.Tensor) -> torch.Tensor:
    """Chroma Radiance's patchify, keeping this rank's image tokens (the rows shard_tokens gives its positions)."""
    return split_sequence(original(img), state, 1)


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose Chroma (or Chroma Radiance) runs over `state`'s sequence group;
    `adapter` is its registry entry (families/__init__.py)."""
    if adapter.joint_attention != "front":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the Chroma hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    diffusion_model = model_patcher.model.diffusion_model
    # Chroma's img_in is a Linear on patchified tokens; Radiance's is a method that patchifies pixels.
    pixel_space = not isinstance(diffusion_model.img_in, torch.nn.Module)
    original = functools.partial(type(diffusion_model).forward_orig, diffusion_model)
    if state.pipefusion.size > 1 or state.patch.size > 1:
        if pixel_space:  # refused by capabilities before this; a wrong entry is a bug
            raise ValueError(f"{adapter.name}: PipeFusion and patch parallel cut image tokens, which its forward_orig makes from pixels")
        blocks = dit_block_keys(len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))
        patched, method = stale_method(model_patcher, state, adapter.name, adapter.block_containers, blocks)
        patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_stale_forward_orig, original, method, adapter.name))
        return patched
    patched = model_patcher.clone()
    patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_parallel_forward_orig, original, state, adapter.name, pixel_space))
    if pixel_space:
        img_in = functools.partial(type(diffusion_model).img_in, diffusion_model)
        patched.add_object_patch(IMAGE_IN_PATCH_KEY, functools.partial(_sharded_img_in, img_in, state))
    return patched
