"""Unified sequence-parallel attention: Ulysses all-to-all inside, Ring attention outside.

Each rank holds a contiguous shard of the (padded) sequence. Ulysses trades the sequence shard for a head shard
within its group, so a ring rank then holds one contiguous block of U shards with H/U heads; the ring passes K/V
blocks around and merges partial results by log-sum-exp.

Decisions:
- Heads that do not divide the Ulysses degree are padded with zero heads (their output is dropped): exact for any
  head count, at the cost of computing the padding heads.
- Padded sequence positions (lengths that do not divide the degree) only ever sit at the end of the sequence, so
  keys are trimmed rather than masked; the causal diagonal block is left whole because causality already hides
  the padding from every real query.
- Joint (text) tokens are replicated. Their keys join ring block 0; their queries ride along with every block.
  Partial results are merged in global block order, so replicated text rows come out bit-identical on all ranks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .attention_kernels import attention, attention_with_lse, merge_partials
from .comm import HeadsToSequenceByPeer, RingShift, all_gather, sequence_to_heads
from .sharding import chunk_length
from .state import ParallelState

JOINT_STRATEGIES = ("front", "rear")


def _check_inputs(q, k, v, joint, joint_strategy, causal):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (batch, seq_local, heads, head_dim) shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    present = [t is not None for t in joint]
    if any(present) and not all(present):
        raise ValueError("pass all of joint_q, joint_k, joint_v or none of them")
    if joint_strategy not in JOINT_STRATEGIES:
        raise ValueError(f"joint_strategy must be one of {JOINT_STRATEGIES}, got {joint_strategy!r}")
    if all(present):
        jq, jk, jv = joint
        if jk.shape != jq.shape or jv.shape != jq.shape or jq.dim() != 4:
            raise ValueError("joint_q, joint_k, joint_v must share one (batch, text_len, heads, head_dim) shape")
        if (jq.shape[0], jq.shape[2], jq.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
            raise ValueError(f"joint tensors {tuple(jq.shape)} must match q {tuple(q.shape)} in batch, heads and head_dim")
        if causal:
            raise ValueError("causal attention with joint tokens is not defined here; use causal=False with joint tensors")
    return all(present)


def pad_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    missing = heads - x.shape[-2]
    return x if missing == 0 else F.pad(x, (0, 0, 0, missing))


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: ParallelState,
    *,
    joint_q: torch.Tensor | None = None,
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    joint_strategy: str = "front",
    causal: bool = False,
    seq_len: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over the whole sequence sharded across the sequence-parallel group; returns this rank's rows.

    q, k, v: (batch, seq_local, heads, head_dim), rank i holding rows [i*seq_local, (i+1)*seq_local) of the
    padded sequence. seq_len: the true global length (default: the one split_sequence recorded, else no padding).
    Joint tensors (batch, text_len, heads, head_dim) are replicated; with them the result is
    [text, local] ("front") or [local, text] ("rear") as one tensor.
    """
    has_joint = _check_inputs(q, k, v, (joint_q, joint_k, joint_v), joint_strategy, causal)
    ulysses, ring = state.ulysses, state.ring
    local_len, heads = q.shape[1], q.shape[2]
    padded_len = local_len * state.sequence.size
    total = seq_len if seq_len is not None else state.lengths.get("sequence", padded_len)
    if chunk_length(total, state.sequence.size) != local_len:
        raise ValueError(
            f"sequence length {total} over {state.sequence.size} sequence-parallel ranks gives shards of "
            f"{chunk_length(total, state.sequence.size)}, but q holds {local_len} rows; split with split_sequence"
        )
    padded_heads = chunk_length(heads, ulysses.size) * ulysses.size
    heads_here = padded_heads // ulysses.size

    # Ulysses: sequence shard -> head shard (one collective for q, k and v together).
    bq, bk, bv = sequence_to_heads([q, k, v], padded_heads, ulysses, state.comm).unbind(0)  # (B, U*local_len, heads_here, D): ring block `ring.rank`
    block_len = bq.shape[1]

    if has_joint:
        head_slice = slice(ulysses.rank * heads_here, (ulysses.rank + 1) * heads_here)
        jq, jk, jv = (pad_heads(t, padded_heads)[:, :, head_slice] for t in (joint_q, joint_k, joint_v))
        front = joint_strategy == "front"

    def valid_keys(block: int) -> int:
        return max(0, min(block_len, total - block * block_len))

    # Image and text queries are attended apart (the text rows whole, alike on every rank: replicated text rows come
    # out bit-identical, as kernels may round a row differently in a different group of rows).
    if ring.size == 1:
        n = valid_keys(0) if not causal else block_len
        keys, values = bk[:, :n], bv[:, :n]
        if has_joint:
            keys = torch.cat([jk, keys] if front else [keys, jk], dim=1)
            values = torch.cat([jv, values] if front else [values, jv], dim=1)

        def attend(queries: torch.Tensor) -> torch.Tensor:
            return attention(queries, keys, values, causal=causal, scale=scale, backend=state.attention_backend)

        if causal:  # the causal mask is aligned to the first query row: attend all rows at once, send their slices
            whole = attend(bq)
            image_rows = lambda ranges: _rows(whole, ranges)  # noqa: E731
        else:
            image_rows = lambda ranges: attend(_rows(bq, ranges))  # noqa: E731
        text_rows = lambda: attend(jq)  # noqa: E731
    else:
        def block_attention(queries, kv, block):
            if causal and block > ring.rank:
                return None
            diagonal = causal and block == ring.rank  # never the last block: its rows are attended all at once
            n = kv.shape[2] if diagonal else valid_keys(block)
            keys, values = kv[0][:, :n], kv[1][:, :n]
            if block == 0 and has_joint:
                keys, values = torch.cat([jk, keys], dim=1), torch.cat([jv, values], dim=1)
            if keys.shape[1] == 0:
                return None
            return attention_with_lse(queries, keys, values, causal=diagonal, scale=scale, backend=state.attention_backend)

        ring_rows = _RingRows([bq, jq] if has_joint else [bq], torch.stack([bk, bv]), state, block_attention)
        image_rows = lambda ranges: ring_rows(0, ranges)  # noqa: E731
        text_rows = lambda: ring_rows(1)  # noqa: E731

    # Ulysses back (head shard -> sequence shard), one peer's rows at a time while the next peer's are attended.
    exchange = HeadsToSequenceByPeer(q.shape[0], local_len, heads, heads_here, q.shape[3], q.dtype, q.device, ulysses, state.comm)
    for peer in exchange.peers:
        exchange.send(peer, image_rows([(peer * local_len, (peer + 1) * local_len)]))
    text_out = text_rows() if has_joint else None
    image_out = exchange.finish(image_rows([(ulysses.rank * local_len, (ulysses.rank + 1) * local_len)]))
    if not has_joint:
        return image_out
    text_out = all_gather(text_out, 2, ulysses, state.comm)[:, :, :heads]  # text rows gather their heads
    return torch.cat([text_out, image_out] if front else [image_out, text_out], dim=1)


def _rows(x: torch.Tensor, ranges: Sequence[tuple[int, int]], dim: int = 1) -> torch.Tensor:
    """x's rows `ranges` along `dim`, in order: a view for one range, one copy of just those rows for several."""
    if len(ranges) == 1:
        return x.narrow(dim, ranges[0][0], ranges[0][1] - ranges[0][0])
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


class _RingRows:
    """Ring attention with its last K/V block attended per group of query rows, so that each group's result can be
    sent back while the next group is attended. Every other block is attended for all rows of each query tensor while
    the K/V blocks travel (RingShift). `block_attention(queries, kv, block)` gives a block's (out, lse) or None (no
    keys there); the partials are merged in global block order, as a one-piece ring does."""

    def __init__(self, queries: list[torch.Tensor], kv: torch.Tensor, state: ParallelState, block_attention):
        ring = state.ring
        self._partials: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in queries]
        for step in range(ring.size - 1):
            shift = RingShift(kv, ring, state.comm)
            block = (ring.rank - step) % ring.size
            for query, partials in zip(queries, self._partials):
                partial = block_attention(query, kv, block)
                if partial is not None:
                    partials[block] = partial
            kv = shift.wait()
        self._queries, self._kv, self._last, self._attend = queries, kv, (ring.rank + 1) % ring.size, block_attention

    def __call__(self, index: int, ranges: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Rows `ranges` (default all) of query tensor `index`, attended over every block."""
        queries, partials = self._queries[index], self._partials[index]
        if ranges is not None:
            queries = _rows(queries, ranges)
            partials = {block: (_rows(out, ranges), _rows(lse, ranges, dim=2)) for block, (out, lse) in partials.items()}
        last = self._attend(queries, self._kv, self._last)
        if last is not None:
            partials = {**partials, self._last: last}
        return merge_partials([partials[b] for b in sorted(partials)], queries.dtype)


def usp_segments_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ParallelState,
                           segments: Sequence[tuple[int, int]], scale: float | None = None) -> torch.Tensor:
    """Non-causal attention over several sequences joined end to end (e.g. text then image), each split over the
    sequence group as split_sequence/padded_piece split it; returns this rank's rows in the layout it passed.

    q, k, v: (batch, rows, heads, head_dim) where rows are this rank's piece of segment 0, then of segment 1, ...
    `segments`: (rows of this rank's piece, true length) per segment. Every row, text included, travels in Ulysses'
    all-to-all with the others, so nothing is gathered whole or computed on two ranks, and the exchange lays each
    segment out whole in the same copy. A ring block holds each segment's rows of its U shards; its valid keys are
    those ranges less the padding. With one ring rank the keys are the joined sequence in order, as one rank has it.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (batch, rows, heads, head_dim) shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    sp, ulysses, ring = state.sequence, state.ulysses, state.ring
    local = [rows for rows, _ in segments]
    expected = [chunk_length(length, sp.size) for _, length in segments]
    if local != expected or sum(local) != q.shape[1]:
        raise ValueError(f"segments {list(segments)} over {sp.size} sequence-parallel ranks give pieces of {expected} rows; "
                         f"q holds {q.shape[1]} rows as {local}")
    heads = q.shape[2]
    padded_heads = chunk_length(heads, ulysses.size) * ulysses.size
    if ulysses.size == 1:  # the rows already lie segment after segment: no exchange, no copy
        bq, bk, bv = q, k, v
    else:
        bq, bk, bv = sequence_to_heads([q, k, v], padded_heads, ulysses, state.comm, segments=local).unbind(0)

    def key_ranges(block: int) -> list[tuple[int, int]]:
        """Rows of ring block `block` that are real keys: each segment's rows of the block less its padding."""
        ranges, offset = [], 0
        for rows, length in segments:
            width = ulysses.size * rows
            valid = max(0, min(width, length - block * width))
            if valid and ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], offset + valid)
            elif valid:
                ranges.append((offset, offset + valid))
            offset += width
        return ranges

    def block_keys(kv: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        ranges = key_ranges(block)
        if not ranges:
            return None
        if len(ranges) == 1:
            return kv[0][:, ranges[0][0]:ranges[0][1]], kv[1][:, ranges[0][0]:ranges[0][1]]
        return tuple(torch.cat([x[:, a:b] for a, b in ranges], dim=1) for x in kv)

    backend = state.attention_backend
    if ring.size == 1:
        keys, values = block_keys((bk, bv), 0)
        attend = lambda ranges: attention(_rows(bq, ranges), keys, values, scale=scale, backend=backend)  # noqa: E731
    else:
        def block_attention(rows_q, kv, block):
            keys = block_keys(kv, block)
            return None if keys is None else attention_with_lse(rows_q, *keys, scale=scale, backend=backend)

        ring_rows = _RingRows([bq], torch.stack([bk, bv]), state, block_attention)
        attend = lambda ranges: ring_rows(0, ranges)  # noqa: E731

    def rows_of(rank: int) -> list[tuple[int, int]]:
        """Rows of Ulysses rank `rank` in the exchanged layout: its piece of each segment (adjacent pieces joined)."""
        ranges, start = [], 0
        for rows in local:
            first = ulysses.size * start + rank * rows
            if ranges and ranges[-1][1] == first:
                ranges[-1] = (ranges[-1][0], first + rows)
            elif rows:
                ranges.append((first, first + rows))
            start += rows
        return ranges

    # Ulysses back (head shard -> sequence shard), one peer's rows at a time while the next peer's are attended.
    exchange = HeadsToSequenceByPeer(q.shape[0], q.shape[1], heads, padded_heads // ulysses.size, q.shape[3], q.dtype,
                                     q.device, ulysses, state.comm)
    for peer in exchange.peers:
        exchange.send(peer, attend(rows_of(peer)))
    return exchange.finish(attend(rows_of(ulysses.rank)))
