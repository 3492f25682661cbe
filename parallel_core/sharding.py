"""Split tensors over a parallel dimension and gather them back, for any length.

A length that does not divide the degree is padded with zeros at its end: rank i holds elements
[i*c, (i+1)*c) of the padded tensor, c = ceil(length / degree). The true length is recorded on the state, so
attention ignores padded keys (usp.py) and gathers trim the padding.
"""
from __future__ import annotations

import torch

from .comm import DimensionGroup, all_gather
from .state import ParallelState

_BATCH_DIMENSIONS = ("cfg", "data")


def chunk_length(length: int, parts: int) -> int:
    return -(-length // parts)


def padded_piece(x: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """The `index`-th of `parts` equal chunks of `x` along `dim`, zero-padded at the end to equal length."""
    length = x.shape[dim]
    chunk = chunk_length(length, parts)
    start = min(index * chunk, length)
    piece = x.narrow(dim, start, min(chunk, length - start))
    missing = chunk - piece.shape[dim]
    if missing == 0:
        return piece
    pad_shape = list(x.shape)
    pad_shape[dim] = missing
    return torch.cat([piece, x.new_zeros(pad_shape)], dim=dim)


def shard_positions(segments: list[range], parts: int) -> torch.Tensor:
    """(parts, rows) global positions of each rank's rows when every segment is split with padded_piece over
    `parts` ranks and each rank concatenates its pieces in segment order; -1 marks padding rows (and a segment
    may list -1 for rows that are not part of the sequence)."""
    pieces = []
    for segment in segments:
        shifted = torch.tensor(list(segment), dtype=torch.long) + 1  # padding comes out as 0, i.e. -1 after the shift
        pieces.append(torch.stack([padded_piece(shifted, 0, parts, r) for r in range(parts)]) - 1)
    return torch.cat(pieces, dim=1) if pieces else torch.empty(parts, 0, dtype=torch.long)


def split_over(x: torch.Tensor, dim: int, dim_group: DimensionGroup) -> torch.Tensor:
    """This rank's padded_piece of `x` along `dim` over any group (the length is not recorded)."""
    return padded_piece(x, dim % x.dim(), dim_group.size, dim_group.rank)


def gather_over(x: torch.Tensor, dim: int, dim_group: DimensionGroup, state: ParallelState, length: int) -> torch.Tensor:
    """Inverse of split_over: every rank's piece concatenated, trimmed to `length`."""
    return _gather_trimmed(x, dim % x.dim(), dim_group, state, length)


def _gather_trimmed(x: torch.Tensor, dim: int, dim_group: DimensionGroup, state: ParallelState, length: int) -> torch.Tensor:
    full = all_gather(x, dim, dim_group, state.comm)
    if length > full.shape[dim]:
        raise ValueError(f"gather over {dim_group.name}: length {length} exceeds the {full.shape[dim]} elements gathered")
    return full.narrow(dim, 0, length)


def _recorded_length(state: ParallelState, kind: str, length: int | None) -> int:
    if length is not None:
        return length
    if kind not in state.lengths:
        raise ValueError(f"no {kind} length recorded: split first, or pass length= explicitly")
    return state.lengths[kind]


def split_sequence(x: torch.Tensor, state: ParallelState, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of `x` along `dim` over the sequence-parallel (Ulysses × Ring) group."""
    dim = dim % x.dim()
    state.lengths["sequence"] = x.shape[dim]
    return padded_piece(x, dim, state.sequence.size, state.sequence.rank)


def gather_sequence(x: torch.Tensor, state: ParallelState, dim: int, length: int | None = None) -> torch.Tensor:
    """Inverse of split_sequence: the full tensor on every rank, padding removed."""
    dim = dim % x.dim()
    return _gather_trimmed(x, dim, state.sequence, state, _recorded_length(state, "sequence", length))


def split_batch(x: torch.Tensor, state: ParallelState, dim: int = 0, over: str = "cfg") -> torch.Tensor:
    """This rank's share of a batch over the cfg (or data) group, in rank order."""
    if over not in _BATCH_DIMENSIONS:
        raise ValueError(f"split_batch over {over!r}: expected one of {', '.join(_BATCH_DIMENSIONS)}")
    dim = dim % x.dim()
    group = state.group_of(over)
    state.lengths[over] = x.shape[dim]
    return padded_piece(x, dim, group.size, group.rank)


def gather_batch(x: torch.Tensor, state: ParallelState, dim: int = 0, over: str = "cfg", length: int | None = None) -> torch.Tensor:
    """Inverse of split_batch: the outputs of every rank of the group, in order, padding removed."""
    if over not in _BATCH_DIMENSIONS:
        raise ValueError(f"gather_batch over {over!r}: expected one of {', '.join(_BATCH_DIMENSIONS)}")
    dim = dim % x.dim()
    return _gather_trimmed(x, dim, state.group_of(over), state, _recorded_length(state, over, length))
