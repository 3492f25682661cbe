"""PipeFusion for Flux: the blocks split into stages over the pipefusion group, the image into patches.

Within one model call (ComfyUI's sampler owns the loop, so the pipeline fills and drains once per call), each
patch (a band of image token rows; the text rows travel with the first) runs through ComfyUI's own forward_orig
on every stage. Block replacements (transformer_options patches_replace, a ComfyUI extension point) make each
stage run only its own blocks: the first of them receives the patch's hidden rows from the previous stage, the
last sends them on without waiting, the others' blocks pass through. Attention in a stage lets the patch's
queries see the whole sequence: fresh keys/values for the rows already computed in this call, last call's for
the rest (pipefusion_attention, sequence-parallel over the stage's Ulysses × Ring ranks). The last stage's
output is broadcast so every rank continues the sampler loop with the same prediction.

Warmup calls (stale_steps.py) run the whole image as one patch: exact, and they fill the key/value tables.
"""
from __future__ import annotations

import functools
import time

import torch

from parallel_core import KVCache, ParallelState, broadcast, pipefusion_attention
from parallel_core.comm import recv, send_async
from parallel_core.sharding import gather_over, shard_positions, split_over

from .. import stale_steps
from ..block_stages import stage_plan
from ..errors import UnsupportedByXDiT
from ..parallel_glue import from_bshd, to_bshd
from .flux import OBJECT_PATCH_KEY, layer_of, refuse_mask, refuse_unsupported


def image_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """(rows, tokens per row) of the image tokens, which PipeFusion cuts into bands of whole rows."""
    row_ids = img_ids[0, :, 1]
    width = int((row_ids == row_ids[0]).sum())
    rows = img_ids.shape[1] // max(width, 1)
    if rows * width != img_ids.shape[1] or not bool((row_ids[::width].diff() > 0).all()):
        raise UnsupportedByXDiT("PipeFusion needs the image tokens in whole rows; extra image tokens (reference latents, e.g. Kontext) are not supported; use pipefusion_degree 1")
    return rows, width


def _run_block(index: int, double: bool, stage: range, state: ParallelState, sends: list, args: dict, extra: dict) -> dict:
    """One block of ComfyUI's loop on this stage: pass through, or receive / compute / send the patch's rows."""
    pf = state.pipefusion
    if index not in stage:
        return {"img": args["img"], "txt": args["txt"]} if double else {"img": args["img"]}
    if index == stage.start and pf.rank > 0:
        # Rows arrive as one [text, image] tensor whatever the block kind; its shape is this rank's own rows'.
        like = torch.cat([args["txt"], args["img"]], 1) if double else args["img"]
        joint = recv(like, pf.rank - 1, pf, state.comm)
        text_rows = args["txt"].shape[1] if double else 0
        args = {**args, "txt": joint[:, :text_rows], "img": joint[:, text_rows:]} if double else {**args, "img": joint}
    out = extra["original_block"](args)
    if index == stage.stop - 1 and pf.rank < pf.size - 1:
        joint = torch.cat([out["txt"], out["img"]], 1) if double else out["img"]
        sends.append((send_async(joint, pf.rank + 1, pf, state.comm), joint))
    return out


def _block_replacements(double_count: int, block_count: int, stage: range, state: ParallelState, sends: list) -> dict:
    replacements = {}
    for index in range(block_count):
        double = index < double_count
        key = ("double_block", index) if double else ("single_block", index - double_count)
        replacements[key] = functools.partial(_run_block, index, double, stage, state, sends)
    return replacements


def _attention_override(state: ParallelState, cache: KVCache, stream, positions: torch.Tensor, total: int, func, q, k, v,
                        heads, mask=None, skip_reshape=False, skip_output_reshape=False, transformer_options=None, **kwargs):
    refuse_mask(mask)
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    out = pipefusion_attention(q, k, v, positions, total, cache, stream, layer_of(transformer_options), state, scale=kwargs.get("scale"))
    return from_bshd(out, skip_output_reshape)


def _pipefusion_forward_orig(original, state: ParallelState, cache: KVCache, plan: list[range], double_count: int, img, img_ids,
                             txt, txt_ids, timesteps, y, guidance=None, control=None, timestep_zero_index=None,
                             transformer_options=None, attn_mask=None):
    transformer_options = transformer_options or {}
    refuse_unsupported(control, timestep_zero_index, attn_mask, transformer_options)
    if transformer_options.get("reference_image_num_tokens"):  # set by Flux's forward when it appends reference latents
        raise UnsupportedByXDiT("PipeFusion on Flux does not take reference latents (ReferenceLatent, e.g. Flux Kontext): their tokens "
                                "do not form image rows to pipeline; set pipefusion_degree to 1 (ulysses, ring, cfg or patch parallel take them)")
    if transformer_options.get("patches_replace", {}).get("dit"):
        raise UnsupportedByXDiT("another node replaces Flux blocks on this model, which PipeFusion cannot combine with; remove it or set pipefusion_degree to 1")
    pf, sp = state.pipefusion, state.sequence
    options = stale_steps.options_from(transformer_options)
    stream = stale_steps.stream_of(transformer_options, img, txt)
    synchronous = stale_steps.is_synchronous(cache, stream, transformer_options, options.warmup_steps)
    rows, width = image_grid(img_ids)
    bands = [(0, rows)] if synchronous else stale_steps.bands_for(rows, options.num_pipeline_patch, pf.size)
    text_len, image_len = txt.shape[1], img.shape[1]
    sends: list = []
    outputs = []
    # One set of block replacements serves every band: they differ only in the rows they receive.
    replacements = {**transformer_options.get("patches_replace", {}),
                    "dit": _block_replacements(double_count, sum(len(s) for s in plan), plan[pf.rank], state, sends)}
    for band, (top, bottom) in enumerate(bands):
        image = slice(top * width, bottom * width)
        # The text rows travel with the first patch. Flux's blocks cannot take zero text rows, so later patches
        # carry one throwaway text row: position -1, never written to the tables, its output dropped.
        text = slice(0, text_len if band == 0 else 1)
        text_positions = range(text_len) if band == 0 else range(-1, 0)
        positions = shard_positions([text_positions, range(text_len + image.start, text_len + image.stop)], sp.size)
        call_options = dict(transformer_options)
        call_options["optimized_attention_override"] = functools.partial(_attention_override, state, cache, stream, positions, text_len + image_len)
        call_options["patches_replace"] = replacements
        local = [split_over(t, 1, sp) for t in (img[:, image], img_ids[:, image], txt[:, text], txt_ids[:, text])]
        out = original(*local, timesteps, y, guidance, None, transformer_options=call_options)
        outputs.append(gather_over(out, 1, sp, state, image.stop - image.start) if pf.rank == pf.size - 1 else None)
    for work, _ in sends:
        work.wait()
    if synchronous:
        cache.mark_filled(stream)
    if pf.rank == pf.size - 1:
        result = torch.cat(outputs, dim=1)
    else:
        result = out.new_empty(out.shape[0], image_len, out.shape[2])
    started = time.perf_counter()
    result = broadcast(result, pf.size - 1, pf, state.comm)  # earlier stages wait here for the pipeline to drain
    state.comm.record_wait("broadcast", pf.name, time.perf_counter() - started)
    return result


def parallelize(model_patcher, state: ParallelState, containers: tuple[str, ...]):
    """A clone of `model_patcher` running Flux as a PipeFusion pipeline over `state` (its model may hold only this
    stage's blocks, see stage_loading.py); `containers` hold its blocks in execution order."""
    diffusion_model = model_patcher.model.diffusion_model
    plan = stage_plan(diffusion_model, containers, state.pipefusion.size)
    original = functools.partial(type(diffusion_model).forward_orig, diffusion_model)
    patched = model_patcher.clone()
    cache = stale_steps.attach_cache(patched)
    patched.add_object_patch(OBJECT_PATCH_KEY, functools.partial(
        _pipefusion_forward_orig, original, state, cache, plan, len(diffusion_model.double_blocks)))
    return patched
