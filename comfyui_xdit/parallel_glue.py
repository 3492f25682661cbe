"""Family-independent glue between ComfyUI's model calls and parallel_core: attention layouts and data parallel.

Data parallelism works for every ComfyUI model the same way: an APPLY_MODEL wrapper (the outermost per-call
extension point of comfy.model_base.BaseModel, which every model class has) shares the call's batch out over
the data group and gathers the denoised outputs, so the model itself never sees more than its own rows.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from parallel_core import ParallelState, gather_batch, split_batch

from .errors import UnsupportedByXDiT

DATA_WRAPPER_KEY = "comfyui_xdit.data_parallel"


def to_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, skip_reshape: bool):
    """ComfyUI's attention inputs as (B, S, H, D), the layout parallel_core's attention takes."""
    if not skip_reshape:  # (B, S, H*D) -> (B, H, S, D), the layout ComfyUI's DiTs pass
        b, s, _ = q.shape
        q, k, v = (t.view(b, s, heads, -1).transpose(1, 2) for t in (q, k, v))
    return (t.transpose(1, 2) for t in (q, k, v))


def from_bshd(out: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    """(B, S, H, D) back to the layout ComfyUI's optimized_attention returns."""
    if skip_output_reshape:
        return out.transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _batch_piece(value: Any, batch: int, state: ParallelState) -> Any:
    # Per-sample inputs (latents, sigmas, conds, pooled vectors, guidance) lead with the call's batch; anything
    # else (constants, shared tensors) is the same for every row and goes to every rank whole.
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return split_batch(value, state, 0, "data")
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch for v in value):
        raise UnsupportedByXDiT("a list-valued model input with per-sample rows (e.g. reference latents per image) cannot be shared out by data parallel; set data_degree to 1")
    return value


def data_parallel_wrapper(state: ParallelState) -> Callable[..., Any]:
    """An APPLY_MODEL wrapper running each rank's share of the batch and gathering the outputs in rank order."""

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if state.data.size == 1:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if control is not None:
            raise UnsupportedByXDiT("ControlNet is not supported with data parallel yet; remove the ControlNet apply node or set data_degree to 1")
        batch = x.shape[0]
        local = {name: _batch_piece(value, batch, state) for name, value in kwargs.items()}
        out = executor(split_batch(x, state, 0, "data"), _batch_piece(t, batch, state), _batch_piece(c_concat, batch, state),
                       _batch_piece(c_crossattn, batch, state), control, transformer_options, **local)
        return gather_batch(out, state, 0, "data", length=batch)

    return apply_model
