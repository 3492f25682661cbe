"""Where a rank's sampling step goes: torch profiler events sorted into a few categories.

An event's category comes from the innermost labelled range around it (a record_function the profiling harness
opens around a module: the diffusion model, its modulation and conditioning embedders, its RoPE table), then from
the outermost op name around it that a rule knows: attention kernels, linear layers, collectives, layout copies,
RoPE application. Other work inside the model (norms, activations, residual adds) is `model_other`; anything
outside the model call is `sampler` (the sampler loop, guider, ComfyUI's per-step bookkeeping).

diffusers' Flux transformer (the bench's baseline) gets the same labels from its own module classes
(`diffusers_label`): its op names (aten ops, its functional collectives) already match the rules.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from parallel_core.comm import TRACE_PREFIX

LABEL_PREFIX = "xdit.profile/"
MODEL, MODULATION, ROPE = "model", "modulation", "rope"
CATEGORIES = ("attention", "linear", "collectives", "layout_copies", "rope", "modulation", "model_other", "sampler")

# Op-name rules, first match wins; matched against the lower-cased name as a substring.
# parallel_core.comm's ranges (TRACE_PREFIX) hold its transfers and its waits: gloo blocks in Work.wait(), no op.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("collectives", (TRACE_PREFIX, "gloo:", "nccl:", "c10d::", "all_to_all", "alltoall", "all_gather", "allgather",
                     "broadcast", "send", "recv", "barrier", "record_param_comms", "wait_tensor", "all_reduce", "allreduce")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "flash_attn")),
    ("rope", ("apply_rope",)),
    ("linear", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "aten::baddbmm")),
    ("layout_copies", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::stack",
                       "aten::_to_copy", "aten::constant_pad_nd", "aten::pad", "aten::zero_", "aten::fill_")),
)


# diffusers' Flux modules that do ComfyUI's labelled work: its timestep/guidance/pooled-text embedder and the linear
# layer of each adaptive norm (ComfyUI's time_in/vector_in/guidance_in and Modulation/adaLN_modulation: the norm and
# its scale/shift stay model work on both sides) are modulation; its position embedder builds the RoPE table (EmbedND).
_DIFFUSERS_MODULATION = ("CombinedTimestepGuidanceTextProjEmbeddings", "CombinedTimestepTextProjEmbeddings")
_DIFFUSERS_ADAPTIVE_NORMS = ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous")
_DIFFUSERS_ROPE_TABLE = ("FluxPosEmbed",)


def label(category: str) -> str:
    """The record_function name that marks a range as `category` (one of MODEL, MODULATION, ROPE)."""
    return LABEL_PREFIX + category


def _rule(name: str) -> str | None:
    name = name.lower()
    for category, needles in _RULES:
        if any(needle in name for needle in needles):
            return category
    return None


def diffusers_label(name: str, class_name: str, parent_class: str | None) -> str | None:
    """The labelled range (MODEL, MODULATION, ROPE or None) of a diffusers Flux module: `name` as named_modules gives
    it ("" for the transformer itself), its class name and its parent module's class name."""
    if name == "":
        return MODEL
    if class_name in _DIFFUSERS_MODULATION or (parent_class in _DIFFUSERS_ADAPTIVE_NORMS and name.rsplit(".", 1)[-1] == "linear"):
        return MODULATION
    return ROPE if class_name in _DIFFUSERS_ROPE_TABLE else None


def label_modules(model: torch.nn.Module, kind: Callable[[str, torch.nn.Module, torch.nn.Module | None], str | None]) -> list:
    """Forward hooks opening a profiler range label(category) around each module of `model` that
    kind(name, module, parent) names a category for; returns the hook handles (remove them when done)."""
    parents = {f"{name}.{child}" if name else child: module for name, module in model.named_modules()
               for child, _ in module.named_children()}
    handles, open_ranges = [], []
    for name, module in model.named_modules():
        category = kind(name, module, parents.get(name))
        if category is None:
            continue

        def enter(_module, _args, category=category):
            open_ranges.append(torch.profiler.record_function(label(category)).__enter__())

        def leave(_module, _args, _out):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def labelled(function: Callable, category: str) -> Callable:
    """`function` inside a profiler range label(category): for work done by a Python function, not a module or an
    op of its own (diffusers' apply_rotary_emb)."""
    def call(*args, **kwargs):
        with torch.profiler.record_function(label(category)):
            return function(*args, **kwargs)
    return call


def categorize(op_name: str, ancestors: Sequence[str]) -> str:
    """The category of one profiler event named `op_name` whose enclosing events are `ancestors` (outermost first).

    A labelled modulation or RoPE range claims everything inside it; otherwise the outermost op with a rule decides
    (aten::linear's addmm is linear, a collective's copies are the collective's, comfy_kitchen::apply_rope's
    multiplies are RoPE)."""
    chain = [*ancestors, op_name]
    labels = [name[len(LABEL_PREFIX):] for name in chain if name.startswith(LABEL_PREFIX)]
    if labels and labels[-1] in (MODULATION, ROPE):
        return labels[-1]
    for name in chain:
        if not name.startswith(LABEL_PREFIX) and (category := _rule(name)) is not None:
            return category
    return "model_other" if MODEL in labels else "sampler"


def breakdown(events: Iterable) -> dict[str, float]:
    """Self CPU milliseconds by category over torch.profiler FunctionEvents (each event's own time, children
    excluded, so every microsecond is counted once)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        totals[categorize(event.name, ancestors[::-1])] += event.self_cpu_time_total / 1e3
    return totals
