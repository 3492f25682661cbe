"""Where a rank's sampling step goes: torch profiler events sorted into a few categories.

An event's category comes from the innermost labelled range around it (a record_function the profiling harness
opens around a module: the diffusion model, its modulation and conditioning embedders, its RoPE table), then from
the outermost op name around it that a rule knows: attention kernels, linear layers, collectives, layout copies,
RoPE application. Other work inside the model (norms, activations, residual adds) is `model_other`; anything
outside the model call is `sampler` (the sampler loop, guider, ComfyUI's per-step bookkeeping).
"""
from __future__ import annotations

from typing import Iterable, Sequence

LABEL_PREFIX = "xdit.profile/"
MODEL, MODULATION, ROPE = "model", "modulation", "rope"
CATEGORIES = ("attention", "linear", "collectives", "layout_copies", "rope", "modulation", "model_other", "sampler")

# Op-name rules, first match wins; matched against the lower-cased name as a substring.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("collectives", ("gloo:", "nccl:", "c10d::", "all_to_all", "alltoall", "all_gather", "allgather", "broadcast",
                     "send", "recv", "barrier", "record_param_comms", "wait_tensor", "all_reduce", "allreduce")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "flash_attn")),
    ("rope", ("apply_rope",)),
    ("linear", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "aten::baddbmm")),
    ("layout_copies", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::stack",
                       "aten::_to_copy", "aten::constant_pad_nd", "aten::pad", "aten::zero_", "aten::fill_")),
)


def label(category: str) -> str:
    """The record_function name that marks a range as `category` (one of MODEL, MODULATION, ROPE)."""
    return LABEL_PREFIX + category


def _rule(name: str) -> str | None:
    name = name.lower()
    for category, needles in _RULES:
        if any(needle in name for needle in needles):
            return category
    return None


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
