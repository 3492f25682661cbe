"""Attention over a whole sequence whose keys/values are partly one step old (PipeFusion, displaced patch parallel).

Both methods compute only some rows of the sequence fresh at a time (a patch) and let those rows attend to every
row: fresh keys/values where they were just computed, the last ones computed elsewhere for the rest. A KVCache
holds, per (stream, layer), the keys/values of every row of the sequence; rows are addressed by their global
position, so any sharding of a patch (Ulysses, Ring, padding) writes to the right place. When every row was
written in the same step (a synchronous step) the attention is exact.

Layouts follow usp.py: (batch, rows, heads, head_dim); `positions_by_rank[r]` lists the global positions of rank r's
rows over the sequence (or patch) group, -1 for padding rows.
"""
from __future__ import annotations

from collections.abc import Hashable

import torch

from .attention_kernels import attention
from .comm import DimensionGroup, PendingGather, all_gather, all_to_all, sequence_to_heads
from .sharding import chunk_length
from .state import ParallelState


class KVCache:
    """Keys and values of the whole sequence, per (stream, layer), kept across steps; plus exchanges in flight."""

    def __init__(self) -> None:
        self._tables: dict[tuple[Hashable, Hashable], torch.Tensor] = {}
        self._pending: dict[tuple[Hashable, Hashable], PendingGather] = {}
        self._streams: set[Hashable] = set()
        self.peak_bytes = 0  # the most the tables held at once (they are emptied between sampling runs)

    def has_stream(self, stream: Hashable) -> bool:
        """Whether a synchronous step has filled this stream's tables (only then may later steps reuse them)."""
        return stream in self._streams

    def mark_filled(self, stream: Hashable) -> None:
        self._streams.add(stream)

    def table(self, stream: Hashable, layer: Hashable, like: torch.Tensor, total: int) -> torch.Tensor:
        """The (2, batch, total, heads, head_dim) key/value table of one layer, zeros when new; `like`: keys, or
        keys and values stacked (batch, heads and head_dim are its last dims but one)."""
        key = (stream, layer)
        shape = (2, like.shape[-4], total, like.shape[-2], like.shape[-1])
        table = self._tables.get(key)
        if table is None or tuple(table.shape) != shape or table.dtype != like.dtype:
            table = self._tables[key] = like.new_zeros(shape)
            self.peak_bytes = max(self.peak_bytes, self.bytes_held())
        return table

    def take_pending(self, stream: Hashable, layer: Hashable) -> PendingGather | None:
        return self._pending.pop((stream, layer), None)

    def put_pending(self, stream: Hashable, layer: Hashable, pending: PendingGather) -> None:
        self._pending[(stream, layer)] = pending

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tables.values())

    def clear(self) -> None:
        """Forget every table; exchanges still in flight are completed first (every rank started them)."""
        for pending in self._pending.values():
            pending.wait()
        self._pending.clear()
        self._tables.clear()
        self._streams.clear()


def _contiguous_run(positions: torch.Tensor) -> tuple[int, int, int] | None:
    """(first row, its position, rows) when the rows past some leading -1s hold consecutive positions (one patch on
    one rank, or a whole sequence), else None."""
    values = positions.tolist()
    first = next((row for row, position in enumerate(values) if position >= 0), len(values))
    if first == len(values):
        return first, 0, 0
    start, count = values[first], len(values) - first
    return (first, start, count) if values[first:] == list(range(start, start + count)) else None


def _write(table: torch.Tensor, kv, positions: torch.Tensor) -> None:
    """Write rows of `kv` (keys and values stacked, or a (keys, values) pair) to their positions in `table`."""
    run = _contiguous_run(positions)
    if run is not None:  # slices: no index tensors, no gathered copy of the rows
        row, start, count = run
        for half, new in zip(table, kv):
            half[:, start:start + count].copy_(new[:, row:row + count])
        return
    valid = positions >= 0
    for half, new in zip(table, kv):
        half[:, positions[valid]] = new[:, valid.to(new.device)]


def pipefusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions_by_rank: torch.Tensor, total: int,
                         cache: KVCache, stream: Hashable, layer: Hashable, state: ParallelState,
                         scale: float | None = None) -> torch.Tensor:
    """A patch's attention inside one PipeFusion stage, sequence-parallel over the stage's Ulysses × Ring ranks.

    The patch's rows are sharded over `state.sequence`; their keys/values overwrite their rows of the stage's table
    (each rank keeps the whole sequence for its Ulysses head shard) and the queries attend to the whole table.
    Returns this rank's rows, like usp_attention.
    """
    ulysses, ring = state.ulysses, state.ring
    heads = q.shape[2]
    if ulysses.size == 1 and ring.size == 1:  # one rank per stage: nothing to exchange, nothing to copy
        table = cache.table(stream, layer, k, total)
        _write(table, (k, v), positions_by_rank.reshape(-1))
        return attention(q, table[0], table[1], scale=scale, backend=state.attention_backend)
    padded_heads = chunk_length(heads, ulysses.size) * ulysses.size
    qkv = sequence_to_heads([q, k, v], padded_heads, ulysses, state.comm)
    kv = all_gather(qkv[1:], 2, ring, state.comm)  # every row of the patch, this rank's heads
    table = cache.table(stream, layer, kv, total)
    _write(table, kv, positions_by_rank.reshape(-1))
    out = attention(qkv[0], table[0], table[1], scale=scale, backend=state.attention_backend)
    return all_to_all(out, scatter_dim=1, gather_dim=2, dim_group=ulysses, stats=state.comm)[:, :, :heads]


def displaced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions_by_rank: torch.Tensor, total: int,
                        cache: KVCache, stream: Hashable, layer: Hashable, group: DimensionGroup, state: ParallelState,
                        synchronous: bool, scale: float | None = None) -> torch.Tensor:
    """Displaced patch parallel attention (DistriFusion): each rank of `group` holds one patch of the sequence.

    Synchronous: the patches' keys/values are gathered now and used at once (exact). Otherwise this rank's rows are
    fresh and the others' are those gathered during the previous step, while this step's gather runs in the
    background until the same layer of the next step needs it.
    """
    kv = torch.stack([k, v])
    table = cache.table(stream, layer, kv, total)
    pending = cache.take_pending(stream, layer)
    if synchronous:
        if pending is not None:
            pending.wait()
        _write(table, all_gather(kv, 2, group, state.comm), positions_by_rank.reshape(-1))
    else:
        if pending is not None:
            _write(table, pending.wait(), positions_by_rank.reshape(-1))
        _write(table, kv, positions_by_rank[group.rank])
        cache.put_pending(stream, layer, PendingGather(kv, 2, group, state.comm))
    return attention(q, table[0], table[1], scale=scale, backend=state.attention_backend)
