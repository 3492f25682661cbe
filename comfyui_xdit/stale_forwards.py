"""PipeFusion and displaced patch parallel for every family whose forward is one plain sequence of replaceable blocks
over joint [text, image] attention: the family-independent half of both methods.

A family's hooks (families/) supply two things. `call(img, img_ids, txt, txt_ids, transformer_options)` runs its
forward on just these tokens (image tokens in whole rows, their positions in ComfyUI's (index, row, column, ...)
layout: the row is axis 1) and returns the image tokens' output. `blocks` names the blocks in execution order by
their ComfyUI replacement keys (transformer_options patches_replace "dit", e.g. ("double_block", i)) and says
whether each keeps text apart (returns "img" and "txt") or runs one joint [text, image] stream (returns "img").

Displaced patch parallel (DistriFusion-style): each rank of the patch group computes its band of image rows plus
the whole text; attention uses the other bands' keys/values from the previous step (displaced_attention).

PipeFusion: within one model call (ComfyUI's sampler owns the loop) the image is cut into patches (bands of rows;
the text travels with the first) and each runs through the family's forward on every stage. Block replacements
make each stage run only its own blocks: a stage's first block receives the patch's rows from the previous stage,
its last hands them on without waiting, the others' blocks pass through. A patch's queries see the whole
sequence: fresh keys/values for the rows already computed in this call, last call's for the rest
(pipefusion_attention, sequence-parallel over the stage's Ulysses x Ring ranks). The last stage's output is
broadcast so every rank continues the sampler loop with the same prediction. Where the family's hooks give the
forward at other timesteps (FamilyCall), the first stage also runs the next call's first patch ahead, so the
pipeline does not fill and drain once per call (pipefusion_lookahead).

Each attention call's key/value table is named by its place in the call's sequence of attention calls (the
blocks run in the same order every call, and a stage runs the same blocks for every patch), so a family's blocks
need not record which block is running; a block that a cache schedule wraps names its tables by its own index
instead (stale_steps.TableNames), because a block the schedule skips makes no attention call.

Warmup calls (stale_steps.py) are synchronous: every row fresh, exact against stock, and they fill the tables.
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import torch

import comfy.patcher_extension

from parallel_core import KVCache, ParallelState, broadcast, displaced_attention, pipefusion_attention
from parallel_core.comm import recv, send_async
from parallel_core.sharding import gather_over, padded_piece, shard_positions, split_over

from . import stale_steps
from .block_stages import RemoteBlock, balance_of, blocks as model_blocks, stage_plan
from .errors import UnsupportedByXDiT
from .families import adapter_for
from .parallel_glue import from_bshd, to_bshd
from .pipefusion_lookahead import (SAMPLER_INPUT_KEY, FamilyCall, Lookahead, Prediction, looks_ahead, sampler_input_wrapper,
                                   sampler_wrapper, serves)

# forward_orig of a family on (img, img_ids, txt, txt_ids) with these transformer_options: the image tokens' output.
TokenCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
# The model patcher attachment holding a PipeFusion model's Lookahead (its used / missed counts for reports and tests).
LOOKAHEAD_ATTACHMENT = "comfyui_xdit.pipefusion_lookahead"
SAMPLER_INPUT_WRAPPER_KEY = "comfyui_xdit.sampler_input"
SAMPLER_WRAPPER_KEY = "comfyui_xdit.lookahead_sampler"
# A block's replacement key and whether it keeps text apart (double) or runs one joint stream (single).
BlockKey = tuple[tuple[str, int], bool]


def dit_block_keys(double_count: int, single_count: int = 0) -> list[BlockKey]:
    """ComfyUI's "dit" replacement keys: double blocks ("double_block", i), then single blocks ("single_block", i)."""
    return ([(("double_block", i), True) for i in range(double_count)]
            + [(("single_block", i), False) for i in range(single_count)])


def refuse_mask(mask, family: str) -> None:
    if mask is not None:
        raise UnsupportedByXDiT(f"an attention mask on {family} (e.g. from an attention-mask node) is not supported in parallel; remove it or use UNETLoader")


def image_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """(rows, tokens per row) of the image tokens, which PipeFusion cuts into bands of whole rows (row positions on
    axis 1 of ComfyUI's position ids, whatever the number of axes)."""
    row_ids = img_ids[0, :, 1]
    width = int((row_ids == row_ids[0]).sum())
    rows = img_ids.shape[1] // max(width, 1)
    if rows * width != img_ids.shape[1] or not bool((row_ids[::width].diff() > 0).all()):
        raise UnsupportedByXDiT("PipeFusion needs the image tokens in whole rows; extra image tokens (reference latents) are not supported; use pipefusion_degree 1")
    return rows, width


def _displaced_attention_override(family: str, state: ParallelState, cache: KVCache, stream, synchronous: bool,
                                  positions: torch.Tensor, total: int, layers, func, q, k, v, heads, mask=None, skip_reshape=False,
                                  skip_output_reshape=False, transformer_options=None, **kwargs):
    """Joint attention with this rank's rows fresh and the other patches' keys/values one step old."""
    refuse_mask(mask, family)
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    out = displaced_attention(q, k, v, positions, total, cache, stream, next(layers), state.patch, state,
                              synchronous, scale=kwargs.get("scale"))
    return from_bshd(out, skip_output_reshape)


def displaced_forward(family: str, state: ParallelState, cache: KVCache, call: TokenCall, img: torch.Tensor,
                      img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor, transformer_options: dict,
                      family_call: FamilyCall | None = None) -> torch.Tensor:
    """The image tokens' output of `call` with this rank computing its band of rows (patch group), all rows gathered
    (`family_call` serves PipeFusion's lookahead only)."""
    patch = state.patch
    text_len, image_len = txt.shape[1], img.shape[1]
    stream = stale_steps.stream_of(transformer_options, img, txt)
    synchronous = stale_steps.is_synchronous(cache, stream, transformer_options, stale_steps.options_from(transformer_options).warmup_steps)
    # Each rank's patch is its band of image rows plus the whole text: text rows are few, and computing them on
    # every rank keeps their keys/values fresh everywhere (only other patches' image rows are a step old).
    positions = torch.cat([torch.arange(text_len).expand(patch.size, -1),
                           shard_positions([range(text_len, text_len + image_len)], patch.size)], dim=1)
    options = dict(transformer_options)
    options["optimized_attention_override"] = functools.partial(
        _displaced_attention_override, family, state, cache, stream, synchronous, positions, text_len + image_len, stale_steps.TableNames())
    out = call(split_over(img, 1, patch), split_over(img_ids, 1, patch), txt, txt_ids, options)
    if synchronous:
        cache.mark_filled(stream)
    return gather_over(out, 1, patch, state, image_len)


def _run_block(index: int, double: bool, stage: range, state: ParallelState, hand_over: Callable[[torch.Tensor], None],
               args: dict, extra: dict) -> dict:
    """One block of the family's loop on this stage: pass through, or receive / compute / hand over the patch's rows."""
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
        hand_over(torch.cat([out["txt"], out["img"]], 1) if double else out["img"])
    return out


def _block_replacements(blocks: list[BlockKey], stage: range, state: ParallelState, hand_over: Callable[[torch.Tensor], None]) -> dict:
    return {key: functools.partial(_run_block, index, double, stage, state, hand_over) for index, (key, double) in enumerate(blocks)}


def _pipefusion_attention_override(family: str, state: ParallelState, cache: KVCache, stream, positions: torch.Tensor,
                                   total: int, layers, func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                                   transformer_options=None, **kwargs):
    refuse_mask(mask, family)
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    out = pipefusion_attention(q, k, v, positions, total, cache, stream, next(layers), state, scale=kwargs.get("scale"))
    return from_bshd(out, skip_output_reshape)


def _band_call(family: str, state: ParallelState, cache: KVCache, stream, call: TokenCall, img, img_ids, txt, txt_ids,
               options: dict, replacements: dict, band: int, top: int, bottom: int, width: int) -> torch.Tensor:
    """One patch (band of image rows `top`..`bottom`) through the family's forward on this stage."""
    sp = state.sequence
    text_len = txt.shape[1]
    image = slice(top * width, bottom * width)
    # The text rows travel with the first patch. Joint blocks cannot take zero text rows, so later patches carry
    # one throwaway text row: position -1, never written to the tables, its output dropped.
    text = slice(0, text_len if band == 0 else 1)
    text_positions = range(text_len) if band == 0 else range(-1, 0)
    positions = shard_positions([text_positions, range(text_len + image.start, text_len + image.stop)], sp.size)
    call_options = dict(options)
    call_options["optimized_attention_override"] = functools.partial(
        _pipefusion_attention_override, family, state, cache, stream, positions, text_len + img.shape[1], stale_steps.TableNames())
    call_options["patches_replace"] = replacements
    return call(*(split_over(t, 1, sp) for t in (img[:, image], img_ids[:, image], txt[:, text], txt_ids[:, text])), call_options)


def _data_share(sigmas: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """This rank's share of the batch's sigmas, as the data-parallel wrapper shares out the model's inputs."""
    return padded_piece(sigmas, 0, state.data.size, state.data.rank)


def _run_ahead(family: str, state: ParallelState, cache: KVCache, lookahead: Lookahead, model_sampling, stream,
               family_call: FamilyCall, rows: torch.Tensor, img, img_ids, txt, txt_ids, blocks: list[BlockKey], stage: range,
               band: tuple[int, int], width: int, out_channels: int, transformer_options: dict) -> None:
    """First stage, after this call's last patch: receive the last stage's output of the first patch (`rows`: its
    input at the sampler's precision), find the next call's input by replaying the sampler, and run this stage's
    blocks on it, holding back the rows for the next stage."""
    pf = state.pipefusion
    image = slice(band[0] * width, band[1] * width)
    output = recv(img.new_empty(img.shape[0], image.stop - image.start, out_channels), pf.size - 1, pf, state.comm)
    if lookahead.off or rows is None:  # a prediction failed in this run, or no sampler to replay: received only
        return
    conds = transformer_options["cond_or_uncond"]
    lookahead.record(stream, rows, output, _data_share(transformer_options["sigmas"], state), model_sampling, conds)
    found = lookahead.next_input(stream, model_sampling, transformer_options["sample_sigmas"])
    if found is None:
        lookahead.miss()
        return
    next_rows, next_sigmas = found
    # This rank's share of the batch's timesteps, as the data-parallel wrapper and ComfyUI's _apply_model make them
    # (once per cond of a CFG batch, as its model input holds the latent once per cond).
    timesteps = model_sampling.timestep(torch.cat([_data_share(next_sigmas, state)] * len(conds))).float()
    predicted = img.clone()
    predicted[:, image] = torch.cat([next_rows] * len(conds))  # cast to the model's dtype as ComfyUI casts the sampler's latent
    held: list = []
    replacements = {**transformer_options.get("patches_replace", {}), "dit": _block_replacements(blocks, stage, state, held.append)}
    _band_call(family, state, cache, stream, family_call.call_at(timesteps), predicted, img_ids, txt, txt_ids,
               {**transformer_options, "sigmas": next_sigmas}, replacements, 0, band[0], band[1], width)
    lookahead.predictions[stream] = Prediction(predicted[:, image], img_ids[:, image], txt, timesteps, family_call.fixed_inputs, held)


def _foreign_hooks(transformer_options: dict) -> bool:
    """Whether hooks other than this pack's stateless ones see the model's calls (another node's patches, wrappers or
    callbacks; our block cache): they may keep state or depend on more than the predicted inputs, so no lookahead."""
    from .block_cache import WRAPPER_KEY as BLOCK_CACHE_KEY

    keys = {key for by_key in (transformer_options.get("wrappers") or {}).values() for key in by_key}
    foreign = {key for key in keys if not str(key).startswith("comfyui_xdit.")} | (keys & {BLOCK_CACHE_KEY})
    return bool(foreign or transformer_options.get("patches") or any((transformer_options.get("callbacks") or {}).values()))


def pipefusion_forward(family: str, state: ParallelState, cache: KVCache, lookahead: Lookahead | None, model,
                       plan: list[range], blocks: list[BlockKey], call: TokenCall, img: torch.Tensor, img_ids: torch.Tensor,
                       txt: torch.Tensor, txt_ids: torch.Tensor, transformer_options: dict, family_call: FamilyCall | None = None) -> torch.Tensor:
    """The image tokens' output of `call` run as a pipeline of `plan`'s stages (block indices into `blocks`) over
    the pipefusion group; every rank returns the whole output. With `family_call` (the forward at other timesteps)
    the first stage also runs the next call's first patch ahead (pipefusion_lookahead). `model` is ComfyUI's model
    (its model_sampling read at each call: a node's object patch, such as ModelSamplingFlux's shift, is on it only
    while it samples)."""
    if transformer_options.get("reference_image_num_tokens"):  # set by forwards that append reference latents
        raise UnsupportedByXDiT(f"PipeFusion on {family} does not take reference latents (ReferenceLatent): their tokens "
                                "do not form image rows to pipeline; set pipefusion_degree to 1 (ulysses, ring, cfg or patch parallel take them)")
    if transformer_options.get("patches_replace", {}).get("dit"):
        raise UnsupportedByXDiT(f"another node replaces {family} blocks on this model, which PipeFusion cannot combine with; remove it or set pipefusion_degree to 1")
    pf, sp = state.pipefusion, state.sequence
    model_sampling = model.model_sampling
    first, last = pf.rank == 0, pf.rank == pf.size - 1
    options = stale_steps.options_from(transformer_options)
    stream = stale_steps.stream_of(transformer_options, img, txt)
    synchronous = stale_steps.is_synchronous(cache, stream, transformer_options, options.warmup_steps)
    rows, width = image_grid(img_ids)
    text_len, image_len = txt.shape[1], img.shape[1]
    # The first band is shorter by about the text's rows, so every patch carries about as many tokens.
    pipelined = stale_steps.bands_for(rows, options.num_pipeline_patch, pf.size, width, text_len)
    bands = [(0, rows)] if synchronous else pipelined
    band0 = slice(0, pipelined[0][1] * width)
    # Whether lookahead may serve this run: the first stage then records every call's first-patch rows for replays.
    serving = (lookahead is not None and family_call is not None and options.lookahead and len(pipelined) > 1
               and not _foreign_hooks(transformer_options) and serves(transformer_options, model_sampling, lookahead.cfg, state.data.size))
    # Every rank decides alike (the same options and history) whether this call looks ahead: the last stage then
    # sends the first patch's output back to the first stage.
    ahead_next = serving and not synchronous and looks_ahead(
        transformer_options, stale_steps.step_index(transformer_options), options.warmup_steps)
    ahead = None
    recording = None  # first stage: this call's first-patch input rows at the sampler's precision
    if first and lookahead is not None and family_call is not None:
        if synchronous:
            lookahead.predictions.pop(stream, None)
        else:
            ahead = lookahead.take(stream, img[:, band0], img_ids[:, band0], txt, family_call.timesteps, family_call.fixed_inputs)
        if serving and not lookahead.off and lookahead.sampler is not None:
            recording = lookahead.sampler_rows(stream, transformer_options.get(SAMPLER_INPUT_KEY), family_call, img[:, band0],
                                               band0, state.data.size, state.data.rank, len(transformer_options["cond_or_uncond"]))
    sends: list = []
    outputs = []
    back = None
    # One set of block replacements serves every band: they differ only in the rows they receive.

    def hand_over(joint: torch.Tensor) -> None:
        sends.append((send_async(joint, pf.rank + 1, pf, state.comm), joint))

    replacements = {**transformer_options.get("patches_replace", {}), "dit": _block_replacements(blocks, plan[pf.rank], state, hand_over)}
    for band, (top, bottom) in enumerate(bands):
        if band == 0 and first and ahead is not None:
            for joint in ahead.held:  # computed ahead at the end of the last call: hand over, do not compute again
                hand_over(joint)
            continue
        out = _band_call(family, state, cache, stream, call, img, img_ids, txt, txt_ids, transformer_options, replacements, band, top, bottom, width)
        if last:
            outputs.append(gather_over(out, 1, sp, state, (bottom - top) * width))
            if band == 0 and ahead_next:
                back = send_async(outputs[0], 0, pf, state.comm)
    for work, _ in sends:
        work.wait()
    if synchronous:
        cache.mark_filled(stream)
    if first and ahead_next:
        _run_ahead(family, state, cache, lookahead, model_sampling, stream, family_call, recording, img, img_ids, txt, txt_ids,
                   blocks, plan[pf.rank], pipelined[0], width, out.shape[-1], transformer_options)
        recording = None  # recorded there
    if back is not None:
        back.wait()
    if last:
        result = torch.cat(outputs, dim=1)
    else:
        result = out.new_empty(out.shape[0], image_len, out.shape[2])
    started = time.perf_counter()
    result = broadcast(result, pf.size - 1, pf, state.comm)  # earlier stages wait here for the pipeline to drain
    state.comm.record_wait("broadcast", pf.name, time.perf_counter() - started)
    if recording is not None:
        lookahead.record(stream, recording, result[:, band0], _data_share(transformer_options["sigmas"], state), model_sampling,
                         transformer_options["cond_or_uncond"])
    return result


def stale_method(model_patcher, state: ParallelState, family: str, containers: tuple[str, ...],
                 blocks: list[BlockKey]) -> tuple[object, Callable[..., torch.Tensor]]:
    """A clone of `model_patcher` whose key/value tables (and PipeFusion's lookahead) are emptied around each
    sampling run, and the method `state` asks for bound to them: method(call, img, img_ids, txt, txt_ids,
    transformer_options, family_call=None), PipeFusion over the blocks of `containers` (keyed `blocks`, in the same
    order) or displaced patch parallel."""
    patched = model_patcher.clone()
    if state.pipefusion.size == 1:
        return patched, functools.partial(displaced_forward, family, state, stale_steps.attach_cache(patched))
    lookahead = Lookahead()
    cache = stale_steps.attach_cache(patched, lookahead.clear)
    patched.set_attachments(LOOKAHEAD_ATTACHMENT, lookahead)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, SAMPLER_INPUT_WRAPPER_KEY, sampler_input_wrapper())
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, SAMPLER_WRAPPER_KEY, sampler_wrapper(lookahead))
    diffusion_model = model_patcher.model.diffusion_model
    plan = stage_plan(diffusion_model, adapter_for(model_patcher.model), state.pipefusion.size, balance_of(model_patcher))
    if plan[-1].stop != len(blocks):  # the hooks' keys must cover the registry's containers: a mismatch is a bug
        raise ValueError(f"{family}: {len(blocks)} block keys for {plan[-1].stop} blocks in {containers}")
    held = [i for i, block in enumerate(model_blocks(diffusion_model, containers)) if not isinstance(block, RemoteBlock)]
    if len(held) < len(blocks) and held != list(plan[state.pipefusion.rank]):  # a stage model loaded for another cut
        raise RuntimeError(f"{family}: this rank holds blocks {held[0]}-{held[-1]} but PipeFusion stage {state.pipefusion.rank} "
                           f"of {state.pipefusion.size} runs blocks {plan[state.pipefusion.rank].start}-{plan[state.pipefusion.rank].stop - 1}")
    return patched, functools.partial(pipefusion_forward, family, state, cache, lookahead, model_patcher.model, plan, blocks)
