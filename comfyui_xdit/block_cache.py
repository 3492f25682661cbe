"""Per-block step-to-step change (XDiTRedundancyAnalysis) and per-block residual reuse (XDiTCacheSchedule), on a
worker's model, for any family whose adapter names its block containers.

Every block's `forward` gets an object patch on the job's clone of the parallel model (wrapping whatever object
patch that key already had), and an APPLY_MODEL wrapper tells them which sampling step each model call is (the
call's sigma in the sampler's sigmas) and which conds it carries. Then, per block and per call:
- analysis: |x_t - x_{t-1}| and |x_{t-1}| summed for the block's inputs, its outputs and its residual (each output
  minus the input it updates), with the previous call of the same conds. Sums are over the rows this rank holds
  that are real (padding from uneven sequence and data splits excluded) in calls no other rank counts (a cond every
  cfg rank computes counts on the first), then added up over the sequence, cfg and data groups, so they equal the
  one-process sums up to float64 summation order;
- schedule: at a step where the schedule marks the block, its output is its input plus its residual from the last
  step it ran (for the same conds and patch), without running it. The decision depends only on the schedule, the
  step and whether that residual exists (the same history on every rank), so every rank takes it alike; the
  residual is each rank's own rows, so sequence parallel and cfg parallel need nothing more. A step the schedule
  does not mark runs the block itself: an empty schedule is the uncached model.

Under PipeFusion a model call runs each block once per patch (band of image rows) on the stage holding it, and
under displaced patch parallel each rank runs its own patch: residuals are kept per (block, conds, patch), the patch
being the block's n-th run within the call, with the block's global index (a stage holds RemoteBlock stand-ins for
the others). Both methods keep last step's keys/values per attention call (stale_forwards.py); every block runs
announced (stale_steps.running_block), so its tables are named by its index and a skipped block shifts no other
block's tables. A skipped block does not refresh its keys/values: its table keeps the rows of the last step it ran
(PipeFusion: later patches and steps read those; patch parallel: the exchange started then is read when it next
runs, so the other patches' rows are as old as that step). At full warmup (every call synchronous: one patch, all
rows fresh) nothing is stale and the schedule gives the one-process result. The analysis is not run there (see
refuse_analysis_degrees).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import comfy.patcher_extension
import torch

from parallel_core import ParallelState, all_gather
from parallel_core.sharding import chunk_length

from .cfg_parallel import REPEATED_CALL_KEY
from .errors import UnsupportedByXDiT
from .stale_steps import running_block

WRAPPER_KEY = "comfyui_xdit.block_cache"
SCHEDULE_ATTACHMENT = "comfyui_xdit.cache_schedule"  # the MODEL's schedule (plain data) from XDiTCacheSchedule
SUMS = ("output_diff", "output_prev", "input_diff", "input_prev", "residual_diff", "residual_prev")
# Degrees the analysis refuses: under them blocks compute with stale keys/values (stale_forwards.py).
_ANALYSIS_REFUSED = ("pipefusion_degree", "patch_degree")


def block_names(diffusion_model: torch.nn.Module, containers: tuple[str, ...]) -> list[str]:
    """The model's blocks, in execution order, as '<container>.<index>'."""
    return [f"{c}.{i}" for c in containers for i in range(len(getattr(diffusion_model, c)))]


def refuse_analysis_degrees(degrees: dict[str, int]) -> None:
    """Raise, naming the degrees to change, for a pool the analysis cannot measure on. Under PipeFusion and patch
    parallel a block runs per patch with other rows' keys/values from earlier steps (and PipeFusion's later patches
    carry a throwaway text row): its step-to-step change would measure that staleness, not the model's redundancy,
    and would not equal the one-process sums. Cache schedules do run there."""
    refused = [d for d in _ANALYSIS_REFUSED if degrees.get(d, 1) > 1]
    if refused:
        raise UnsupportedByXDiT(f"XDiTRedundancyAnalysis cannot run with {', '.join(f'{d} {degrees[d]}' for d in refused)} "
                                "(its blocks compute patches against stale keys/values, so their changes would not be the model's); "
                                f"set {' and '.join(refused)} to 1 on XDiTUNetLoader for the analysis: the XDiTCacheSchedule made "
                                "from it runs with them")


def _tensors(values) -> list[torch.Tensor]:
    # A block's token streams: (batch, tokens, width). Modulation vectors and RoPE tables have other ranks.
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 3]


def _valid(length: int, chunk: int, rank: int) -> torch.Tensor:
    return torch.arange(chunk) < max(0, min(chunk, length - rank * chunk))


def _row_weights(rows: int, state: ParallelState | None) -> torch.Tensor | None:
    """Which of this rank's `rows` are real tokens (1) or padding / copies another rank counts (0); None: all real.
    Sequence-parallel rows are [text piece, image piece] (parallel_glue's text-in-front layout), or one of them."""
    if state is None or state.sequence.size == 1:
        return None
    sp = state.sequence
    image, text = state.lengths.get("sequence"), state.lengths.get("text")
    image_chunk = chunk_length(image, sp.size) if image else -1
    text_chunk = chunk_length(text, sp.size) if text else -1
    if text and rows == text_chunk + image_chunk:
        return torch.cat([_valid(text, text_chunk, sp.rank), _valid(image, image_chunk, sp.rank)]).double()
    if rows == image_chunk and rows == text_chunk and not torch.equal(_valid(image, rows, sp.rank), _valid(text, rows, sp.rank)):
        raise UnsupportedByXDiT(f"text ({text}) and image ({image}) tokens split into equal pieces of {rows} rows with different "
                                "padding: the analysis cannot tell them apart; change the image size or the prompt length")
    if rows == image_chunk:
        return _valid(image, rows, sp.rank).double()
    if rows == text_chunk:
        return _valid(text, rows, sp.rank).double()
    return torch.full((rows,), float(sp.rank == 0), dtype=torch.float64)  # the same on every rank: count it once


def _batch_weights(batch: int, state: ParallelState | None) -> torch.Tensor | None:
    """Which of this rank's batch rows are real (1) or padding of an uneven data-parallel split (0); None: all real."""
    if state is None or state.data.size == 1:
        return None
    total = state.lengths["data"]  # the call's rows, recorded by the data-parallel split just before the model ran
    chunk = chunk_length(total, state.data.size)
    if batch != chunk:
        raise UnsupportedByXDiT(f"a block saw {batch} batch rows where data parallel gave this rank {chunk}; the analysis "
                                "cannot tell padding rows apart here: set data_degree to 1")
    return _valid(total, chunk, state.data.rank).double()


def _abs_sum(x: torch.Tensor, weights: torch.Tensor | None, batch_weights: torch.Tensor | None) -> torch.Tensor:
    per_cell = x.abs().double().sum(dim=2)  # (batch, tokens)
    per_row = (per_cell if batch_weights is None else per_cell * batch_weights[:, None]).sum(dim=0)
    return per_row.sum() if weights is None else (per_row * weights).sum()


def _pairing(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[int] | None:
    """For each output, the input it updates (the same shape; the nearest one if several); None if one has none."""
    pairs = []
    for out in outputs:
        candidates = [i for i, x in enumerate(inputs) if x.shape == out.shape]
        if not candidates:
            return None
        pairs.append(min(candidates, key=lambda i: (out - inputs[i]).abs().mean().item()) if len(candidates) > 1 else candidates[0])
    return pairs


@dataclass
class _Call:
    step: int = -1
    key: tuple = ()
    runs: dict[int, int] = field(default_factory=dict)  # block -> how many times it ran (or was skipped) in this call


@dataclass
class BlockRuntime:
    """One job's per-block state on one rank."""

    names: list[str]
    state: ParallelState | None
    analyse: bool
    reuse: dict[int, frozenset[int]]  # step -> blocks that reuse their residual there
    steps: int = 0
    call: _Call = field(default_factory=_Call)
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (blocks, len(SUMS)) float64
    previous: dict[tuple, tuple] = field(default_factory=dict)  # (block, conds, patch) -> (outputs, inputs, residuals)
    # (block, conds, patch, input shapes) -> (pairing, residuals, tuple shape)
    residuals: dict[tuple, tuple] = field(default_factory=dict)
    reused: int = 0  # block evaluations skipped on this rank
    ran: int = 0
    counted: bool = True  # whether this call's sums are this rank's to add (REPEATED_CALL_KEY)

    def begin(self, transformer_options: dict, rows: int) -> None:
        sample_sigmas = transformer_options["sample_sigmas"]
        sigma = transformer_options["sigmas"].reshape(-1)[0].to(sample_sigmas)
        self.steps = len(sample_sigmas) - 1
        self.call = _Call(int((sample_sigmas[:-1] - sigma).abs().argmin()), (tuple(transformer_options.get("cond_or_uncond", ())), rows))
        self.counted = not transformer_options.get(REPEATED_CALL_KEY, False)
        if self.state is not None:
            self.state.lengths.pop("text", None)  # set again by this call's joint attention, if it has text in front

    def forward(self, index: int, original, *args, **kwargs):
        inputs = _tensors(list(args) + list(kwargs.values()))
        patch = self.call.runs.get(index, 0)  # PipeFusion: the block's n-th patch of this call; else 0
        self.call.runs[index] = patch + 1
        slot = (index, self.call.key, patch)
        # A residual fits only inputs of its shapes (PipeFusion's synchronous calls run the whole image as one patch).
        kept = slot + (tuple(tuple(x.shape) for x in inputs),)
        cached = self.residuals.get(kept)
        if index in self.reuse.get(self.call.step, ()) and cached is not None:
            pairing, residuals, shape = cached
            self.reused += 1
            outputs = iter([inputs[i] + r for i, r in zip(pairing, residuals)])
            return next(outputs) if shape is None else tuple(None if empty else next(outputs) for empty in shape)
        keeps_residual = any(index in blocks for blocks in self.reuse.values())
        if self.analyse or keeps_residual:
            inputs = [x.clone() for x in inputs]  # blocks update their streams in place (Flux: img += ...)
        with running_block(index):  # names its key/value tables under PipeFusion / patch parallel
            result = original(*args, **kwargs)
        self.ran += 1
        outputs = _tensors(result if isinstance(result, (tuple, list)) else [result])
        if self.analyse and self.counted:
            self._record(slot, inputs, outputs)
        if keeps_residual:
            pairing = _pairing(inputs, outputs)
            # None: a lone tensor; else which places of the returned tuple are None (SD3's last block drops its text).
            shape = tuple(v is None for v in result) if isinstance(result, (tuple, list)) else None
            if pairing is None or len(outputs) != (1 if shape is None else shape.count(False)):
                raise UnsupportedByXDiT(f"block {self.names[index]} returns values that are not updates of its inputs; "
                                        "a cache schedule cannot reuse its residual there")
            self.residuals[kept] = (pairing, [o - inputs[i] for o, i in zip(outputs, pairing)], shape)
        return result

    def _record(self, slot: tuple, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        index = slot[0]
        pairing = _pairing(inputs, outputs)
        residuals = [o - inputs[i] for o, i in zip(outputs, pairing)] if pairing is not None else []
        current = (outputs, inputs, residuals)  # SUMS' order
        before = self.previous.get(slot)
        self.previous[slot] = tuple([t.detach().clone() for t in group] for group in current)
        if before is None:
            return
        sums = self.sums.setdefault(self.call.step, torch.zeros(len(self.names), len(SUMS), dtype=torch.float64))
        for column, (now, then) in enumerate(zip(current, before)):
            if len(now) != len(then) or any(a.shape != b.shape for a, b in zip(now, then)):
                continue  # a call of another shape (e.g. the conds batched differently): nothing comparable
            for a, b in zip(now, then):
                weights, batch_weights = _row_weights(a.shape[1], self.state), _batch_weights(a.shape[0], self.state)
                sums[index, 2 * column] += _abs_sum(a - b, weights, batch_weights)
                sums[index, 2 * column + 1] += _abs_sum(b, weights, batch_weights)

    def table(self) -> dict[str, Any]:
        """Per step and block, the sums (added over the sequence, cfg and data groups) and the relative L1 changes."""
        steps = max(self.steps, max(self.sums, default=-1) + 1)
        sums = torch.zeros(steps, len(self.names), len(SUMS), dtype=torch.float64)
        for step, values in self.sums.items():
            sums[step] = values
        seen = torch.zeros(steps, dtype=torch.bool)
        seen[list(self.sums)] = True
        groups = () if self.state is None else (self.state.sequence, self.state.cfg, self.state.data)
        for group in (g for g in groups if g.size > 1):  # every rank calls table() at the job's end
            sums = all_gather(sums.unsqueeze(0), 0, group, self.state.comm).sum(0)
            seen = all_gather(seen.unsqueeze(0), 0, group, self.state.comm).any(0)

        def relative(diff: torch.Tensor, prev: torch.Tensor) -> list:
            ratio = diff / prev.clamp_min(1e-300)
            return [[float(v) for v in row] if ok else None for row, ok in zip(ratio, seen)]

        return {"blocks": list(self.names), "steps": steps,
                "sums": {name: sums[..., i].tolist() for i, name in enumerate(SUMS)},
                "output_change": relative(sums[..., 0], sums[..., 1]), "input_change": relative(sums[..., 2], sums[..., 3]),
                "residual_change": relative(sums[..., 4], sums[..., 5]),
                # The error reusing a residual adds at a step, relative to the block's output: what the schedule ranks.
                "reuse_error": relative(sums[..., 4], sums[..., 1])}


def _step_wrapper(runtime: BlockRuntime):
    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        runtime.begin(transformer_options, x.shape[0])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return apply_model


def apply(model_patcher, spec: dict, adapter, state: ParallelState | None) -> BlockRuntime | None:
    """Patch `model_patcher` (the job's clone) for `spec` ({"analyse": bool, "reuse": {step: [block indices]}});
    None for an empty spec. `adapter` is the model's family adapter (families/)."""
    if not spec:
        return None
    diffusion_model = model_patcher.model.diffusion_model
    names = block_names(diffusion_model, adapter.block_containers)
    if not names:
        raise UnsupportedByXDiT(f"{adapter.family_name(model_patcher.model)} has no block list XDiT knows; the redundancy analysis and cache schedules need one")
    if state is not None and state.sequence.size > 1 and adapter.joint_attention == "rear":
        raise UnsupportedByXDiT(f"{adapter.family_name(model_patcher.model)} puts its text pieces behind the image: per-block sums over "
                                "sequence-parallel ranks are not implemented for it; set ulysses_degree and ring_degree to 1")
    reuse = {int(step): frozenset(int(b) for b in blocks) for step, blocks in spec.get("reuse", {}).items()}
    runtime = BlockRuntime(names, state, bool(spec.get("analyse")), reuse)
    for index, name in enumerate(names):
        key = f"diffusion_model.{name}.forward"
        block = functools.reduce(getattr, name.split("."), diffusion_model)
        original = model_patcher.object_patches.get(key) or functools.partial(type(block).forward, block)
        model_patcher.add_object_patch(key, functools.partial(runtime.forward, index, original))
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _step_wrapper(runtime))
    return runtime
