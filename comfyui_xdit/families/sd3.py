"""SD3 and SD3.5 (ComfyUI's MMDiT, comfy.ldm.modules.diffusionmodules.mmdit) computed across ranks.

MMDiT's `forward` patchifies the whole latent and adds its absolute positions (a crop from a fixed grid, centred on
the image) before `forward_core_with_concat` runs the joint blocks and the per-token final layer on (B, rows,
hidden) tensors. Patching that method therefore shards image tokens that already carry their true positions;
text rows are sharded too, so the text stream's linear layers do 1/P of the work on each rank.

A joint block attends over [text, image] (text in front): the text shards' q/k/v are gathered (text is short) and
usp_attention runs with them as joint tokens. SD3.5's dual-attention blocks add an image-only self-attention, which
is plain sequence-parallel attention. Both calls pass the block's transformer_options, so ComfyUI's
`optimized_attention_override` option reaches them; they are told apart by how many rows they bring.

PipeFusion and displaced patch parallel (stale_forwards.py) run `forward_core_with_concat` on the tokens they pick:
its joint blocks are one plain sequence of ("double_block", i) replacements (the last one, context_pre_only, ends
the text stream; its attention still reads the text's keys/values). Its tokens carry no positions, so an
APPLY_MODEL wrapper hands the latent's token grid down in transformer_options and the image's row/column positions
are made from it. SD3.5's dual-attention blocks (an image-only second attention) and register tokens are refused
for these two methods.

CFG and data parallel are the family-independent wrappers (cfg_parallel.py, parallel_glue.py). Everything is
attached to a clone of the ModelPatcher as an object patch; the original stays stock.
"""
from __future__ import annotations

import functools

import comfy.patcher_extension
import torch

from parallel_core import ParallelState, gather_sequence, split_sequence, usp_attention
from parallel_core.sharding import chunk_length, padded_piece

from ..errors import UnsupportedByXDiT
from ..parallel_glue import from_bshd, refuse_foreign_attention_override, text_front_attention, to_bshd
from ..stale_forwards import dit_block_keys, stale_method

OBJECT_PATCH_KEY = "diffusion_model.forward_core_with_concat"
GRID_WRAPPER_KEY = "comfyui_xdit.sd3_token_grid"
GRID_OPTION = "xdit_token_grid"  # transformer_options key: (rows, columns) of the latent's image tokens


def _attention_override(state: ParallelState, text_len: int, image_local: int, func, q, k, v, heads, mask=None,
                        skip_reshape=False, skip_output_reshape=False, transformer_options=None, **kwargs):
    """Replaces ComfyUI's optimized_attention inside MMDiT's blocks, whose rows on each rank are [its text shard,
    its image shard] (joint attention) or just its image shard (SD3.5's image-only attention)."""
    if mask is not None:
        raise UnsupportedByXDiT("an attention mask on SD3 is not supported in parallel; remove it or use UNETLoader")
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    scale = kwargs.get("scale")
    text_local = q.shape[1] - image_local
    if text_local == 0:
        return from_bshd(usp_attention(q, k, v, state, scale=scale), skip_output_reshape)
    if text_local != chunk_length(text_len, state.sequence.size):
        raise ValueError(f"MMDiT attention got {q.shape[1]} rows; expected {image_local} image rows and "
                         f"{chunk_length(text_len, state.sequence.size)} text rows")
    return from_bshd(text_front_attention(state, text_len, q, k, v, scale), skip_output_reshape)


def _parallel_forward_core(original, state: ParallelState, x: torch.Tensor, c_mod: torch.Tensor, context: torch.Tensor,
                           control=None, transformer_options=None) -> torch.Tensor:
    transformer_options = transformer_options or {}
    refuse_control(control, transformer_options)
    sp = state.sequence
    text_len = context.shape[1]
    context = padded_piece(context, 1, sp.size, sp.rank)
    x = split_sequence(x, state, 1)
    options = dict(transformer_options)
    options["optimized_attention_override"] = functools.partial(_attention_override, state, text_len, x.shape[1])
    return gather_sequence(original(x, c_mod, context, None, options), state, 1)


def refuse_control(control, transformer_options: dict) -> None:
    if control is not None:  # ControlNet adds full-image residuals after each block
        raise UnsupportedByXDiT("ControlNet on SD3 is not supported in parallel yet; remove the ControlNet apply node or use UNETLoader")
    refuse_foreign_attention_override(transformer_options)


def _token_grid_wrapper(patch: int, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    """APPLY_MODEL wrapper: the latent's token grid, for the stale methods' bands of rows (MMDiT pads to whole patches)."""
    options = {**(transformer_options or {}), GRID_OPTION: (-(-x.shape[-2] // patch), -(-x.shape[-1] // patch))}
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def _stale_forward_core(original, method, x: torch.Tensor, c_mod: torch.Tensor, context: torch.Tensor, control=None,
                        transformer_options=None) -> torch.Tensor:
    """MMDiT's forward_core_with_concat run by a stale-activation method (stale_forwards.stale_method) on token subsets."""
    transformer_options = transformer_options or {}
    refuse_control(control, transformer_options)
    rows, columns = transformer_options[GRID_OPTION]
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1).reshape(1, -1, 2)
    img_ids = torch.cat([torch.zeros_like(grid[..., :1]), grid], dim=-1).expand(x.shape[0], -1, -1)  # (index, row, column)
    txt_ids = torch.zeros(x.shape[0], context.shape[1], 3, dtype=img_ids.dtype)

    def call(img, img_ids, txt, txt_ids, options):
        return original(img, c_mod, txt, None, options)

    return method(call, x, img_ids, context, txt_ids, transformer_options)


def refuse_stale_methods_on(diffusion_model, family: str) -> None:
    # Read from the config, not the blocks: a PipeFusion stage holds stand-ins for the other stages' blocks.
    if diffusion_model.x_block_self_attn_layers:
        raise UnsupportedByXDiT(f"PipeFusion and patch parallel do not take {family} models with dual-attention blocks (SD3.5 Medium's "
                                "image-only second attention); set pipefusion_degree and patch_degree to 1 (ulysses, ring, cfg "
                                "and data parallel take them)")
    if diffusion_model.register_length > 0:
        raise UnsupportedByXDiT(f"PipeFusion and patch parallel do not take {family} models with register tokens; set "
                                "pipefusion_degree and patch_degree to 1")


def parallelize(model_patcher, state: ParallelState, adapter):
    """A clone of `model_patcher` whose MMDiT runs over `state`'s sequence group; `adapter` is its registry entry."""
    if adapter.joint_attention != "front":  # a registry entry pointing these hooks at another layout is a bug
        raise ValueError(f"the SD3 hooks run text-in-front joint attention, not {adapter.joint_attention!r} ({adapter.name})")
    diffusion_model = model_patcher.model.diffusion_model
    original = functools.partial(type(diffusion_model).forward_core_with_concat, diffusion_model)
    if state.pipefusion.size > 1 or state.patch.size > 1:
        refuse_stale_methods_on(diffusion_model, adapter.name)
        blocks = dit_block_keys(len(diffusion_model.joint_blocks))
        patched, method = stale_method(model_patcher, state, adapter.name, adapter.block_containers, blocks)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, GRID_WRAPPER_KEY,
                                     functools.partial(_token_grid_wrapper, diffusion_model.patch_size))
        patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_stale_forward_core, original, method))
        return patched
    patched = model_patcher.clone()
    patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(_parallel_forward_core, original, state))
    return patched
