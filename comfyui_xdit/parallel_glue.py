"""Family-independent glue between ComfyUI's model calls and parallel_core: attention layouts and data parallel.

Data parallelism works for every ComfyUI model the same way: an APPLY_MODEL wrapper (the outermost per-call
extension point of comfy.model_base.BaseModel, which every model class has) shares the call's batch out over
the data group and gathers the denoised outputs, so the model itself never sees more than its own rows.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from parallel_core import ParallelState, gather_batch, split_batch, usp_attention, usp_segments_attention
from parallel_core.sharding import chunk_length

from .errors import UnsupportedByXDiT

DATA_WRAPPER_KEY = "comfyui_xdit.data_parallel"
BATCH_ROWS_WRAPPER_KEY = "comfyui_xdit.batch_rows"


def refuse_foreign_attention_override(transformer_options: dict) -> None:
    """Our sequence parallel owns `optimized_attention_override`; a second one (another node pack's) would be lost."""
    if "optimized_attention_override" in transformer_options:
        raise UnsupportedByXDiT("another node pack already overrides attention on this model; remove that patch to sample with XDiT")


def patches_at(transformer_options: dict, points: tuple[str, ...]) -> list[str]:
    """Which of a forward's patch lists (`points`) other nodes filled: such patches would see one rank's token shard."""
    return [name for name in points if transformer_options.get("patches", {}).get(name)]


def refuse_row_patches(family: str, transformer_options: dict, points: tuple[str, ...]) -> None:
    """Refuse other nodes' patches at `points` and "dit" block replacements (they would see or replace one rank's
    rows instead of the whole grid), and another pack's attention override, naming the family and the fix."""
    patches = patches_at(transformer_options, points)
    if transformer_options.get("patches_replace", {}).get("dit"):
        patches.append("dit block replacement")
    if patches:
        raise UnsupportedByXDiT(f"a model patch on {family}'s {' and '.join(patches)} is not supported with sequence "
                                "parallel; remove the node that adds it, or set ulysses_degree and ring_degree to 1")
    refuse_foreign_attention_override(transformer_options)


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


def text_front_attention(state: ParallelState, text_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Joint [text, image] attention (B, S, H, D) where each rank's rows are [its text shard, its image shard].

    The text and image rows both travel in Ulysses' all-to-all and Ring's blocks (usp_segments_attention), so no
    rank gathers the text's q/k/v or computes another rank's text queries, and nothing is concatenated around the
    collectives; each rank gets the output rows of its own shards.
    """
    state.lengths["text"] = text_len  # which of a block's rows are text padding (block_cache.py's sums skip them)
    text_local = chunk_length(text_len, state.sequence.size)
    segments = [(text_local, text_len), (q.shape[1] - text_local, state.lengths["sequence"])]
    return usp_segments_attention(q, k, v, state, segments, scale=scale)


def text_front_attention_override(family: str, state: ParallelState, text_len: int, func, q, k, v, heads, mask=None,
                                  skip_reshape=False, skip_output_reshape=False, transformer_options=None, **kwargs):
    """ComfyUI's optimized_attention replaced by text_front_attention (bind family, state and text_len first)."""
    if mask is not None:
        raise UnsupportedByXDiT(f"an attention mask on {family} (e.g. from an attention-mask node) is not supported in "
                                f"parallel; remove it or use UNETLoader")
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    return from_bshd(text_front_attention(state, text_len, q, k, v, kwargs.get("scale")), skip_output_reshape)


def text_rear_attention(state: ParallelState, text_lengths: Sequence[int], q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Joint [image, text] attention (B, S, H, D) over text made of pieces (e.g. one per text encoder) of these
    lengths, each split over the sequence group as padded_piece splits it: each rank's rows are [its image shard
    (as split_sequence made it), its shard of piece 1, ..., its shard of the last piece].

    Image and text rows travel together in Ulysses' all-to-all and Ring's blocks (usp_segments_attention), the keys
    laid out [image, piece 1, ...] as one process has them: no text gathers, no rank computing another's text queries.
    """
    sp = state.sequence
    image = state.lengths["sequence"]
    segments = [(chunk_length(n, sp.size), n) for n in (image, *text_lengths)]
    return usp_segments_attention(q, k, v, state, segments, scale=scale)


def text_rear_attention_override(family: str, state: ParallelState, text_lengths: Sequence[int], func, q, k, v, heads,
                                 mask=None, skip_reshape=False, skip_output_reshape=False, transformer_options=None, **kwargs):
    """ComfyUI's optimized_attention replaced by text_rear_attention (bind family, state and text_lengths first)."""
    if mask is not None:
        raise UnsupportedByXDiT(f"an attention mask on {family} (e.g. from an attention-mask node) is not supported in "
                                f"parallel; remove it or use UNETLoader")
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    return from_bshd(text_rear_attention(state, text_lengths, q, k, v, kwargs.get("scale")), skip_output_reshape)


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


def _holds_rows(value: Any, rows: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == rows
    if isinstance(value, (list, tuple)):
        return any(_holds_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return any(_holds_rows(v, rows) for v in value.values())
    return False


def _rows_piece(value: Any, rows: int, state: ParallelState) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return split_batch(split_batch(value, state, 0, "cfg"), state, 0, "data")
    if _holds_rows(value, rows):
        raise UnsupportedByXDiT("a nested per-row model input (e.g. ControlNet or reference latents) cannot be shared out over "
                                "cfg/data ranks inside a whole-call cache (EasyCache); set cfg_degree and data_degree to 1, or remove EasyCache")
    return value


def batch_rows_wrapper(state: ParallelState) -> Callable[..., Any]:
    """A DIFFUSION_MODEL wrapper doing cfg and data parallelism on one diffusion-model call: its rows (conds x batch,
    as calc_cond_batch stacked them) are shared out over the cfg group, then the data group, and the outputs gathered
    back in order. Used instead of the CALC_COND_BATCH/APPLY_MODEL wrappers under a wrapper (EasyCache) that must
    see the whole call. The call's transformer_options (the last positional dict, or the keyword) pass unchanged."""

    def diffusion_model(executor, x, *args, **kwargs):
        rows = x.shape[0]
        options = kwargs.get("transformer_options")
        if options is None:
            options = next((a for a in reversed(args) if isinstance(a, dict)), None)
        local_args = [a if a is options else _rows_piece(a, rows, state) for a in args]
        local_kwargs = {k: v if v is options else _rows_piece(v, rows, state) for k, v in kwargs.items()}
        out = executor(_rows_piece(x, rows, state), *local_args, **local_kwargs)
        per_cfg_rank = -(-rows // state.cfg.size)
        return gather_batch(gather_batch(out, state, 0, "data", length=per_cfg_rank), state, 0, "cfg", length=rows)

    return diffusion_model


def self_attention_override(family: str, state: ParallelState, func, q, k, v, heads, mask=None, skip_reshape=False,
                            skip_output_reshape=False, transformer_options=None, **kwargs):
    """ComfyUI's optimized_attention replaced by attention of this rank's tokens over every rank's (usp_attention; the
    tokens split by split_sequence, text not among them). Bind family and state first."""
    if mask is not None:
        raise UnsupportedByXDiT(f"an attention mask on {family}'s self-attention is not supported in parallel; remove "
                                "the node that adds it, or use UNETLoader")
    q, k, v = to_bshd(q, k, v, heads, skip_reshape)
    return from_bshd(usp_attention(q, k, v, state, scale=kwargs.get("scale")), skip_output_reshape)
