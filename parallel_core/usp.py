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
from .comm import RingShift, all_gather, all_to_all, heads_to_sequence, sequence_to_heads
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

    text_len = 0
    if has_joint:
        text_len = joint_q.shape[1]
        head_slice = slice(ulysses.rank * heads_here, (ulysses.rank + 1) * heads_here)
        jq, jk, jv = (pad_heads(t, padded_heads)[:, :, head_slice] for t in (joint_q, joint_k, joint_v))
        front = joint_strategy == "front"
        queries = torch.cat([jq, bq] if front else [bq, jq], dim=1)
    else:
        queries = bq

    def valid_keys(block: int) -> int:
        return max(0, min(block_len, total - block * block_len))

    if ring.size == 1:
        n = valid_keys(0) if not causal else block_len
        keys, values = bk[:, :n], bv[:, :n]
        if has_joint:
            keys = torch.cat([jk, keys] if front else [keys, jk], dim=1)
            values = torch.cat([jv, values] if front else [values, jv], dim=1)
        out = attention(queries, keys, values, causal=causal, scale=scale, backend=state.attention_backend)
    else:
        out = _ring_attention(queries, bk, bv, (jk, jv) if has_joint else None, state, causal, scale, valid_keys)

    if has_joint:
        text_out = out[:, :text_len] if front else out[:, block_len:]
        image_out = out[:, text_len:] if front else out[:, :block_len]
    else:
        image_out = out
    # Ulysses back: head shard -> sequence shard; text rows gather their heads.
    image_out = all_to_all(image_out, scatter_dim=1, gather_dim=2, dim_group=ulysses, stats=state.comm)[:, :, :heads]
    if not has_joint:
        return image_out
    text_out = all_gather(text_out, 2, ulysses, state.comm)[:, :, :heads]
    return torch.cat([text_out, image_out] if front else [image_out, text_out], dim=1)


def _ring_attention(queries, block_k, block_v, joint_kv, state, causal, scale, valid_keys):
    """Attention of `queries` over every ring rank's K/V block (plus joint K/V), merged in global block order."""
    ring = state.ring
    partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kv = torch.stack([block_k, block_v])
    for step in range(ring.size):
        shift = RingShift(kv, ring, state.comm) if step < ring.size - 1 else None
        block = (ring.rank - step) % ring.size
        diagonal = causal and block == ring.rank
        if not (causal and block > ring.rank):
            n = block_k.shape[1] if diagonal else valid_keys(block)
            keys, values = kv[0][:, :n], kv[1][:, :n]
            if block == 0 and joint_kv is not None:
                keys = torch.cat([joint_kv[0], keys], dim=1)
                values = torch.cat([joint_kv[1], values], dim=1)
            if keys.shape[1] > 0:
                partials[block] = attention_with_lse(queries, keys, values, causal=diagonal, scale=scale, backend=state.attention_backend)
        if shift is not None:
            kv = shift.wait()
    return merge_partials([partials[b] for b in sorted(partials)], queries.dtype)


def usp_segments_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ParallelState,
                           segments: Sequence[tuple[int, int]], scale: float | None = None) -> torch.Tensor:
    """Non-causal attention over several sequences joined end to end (e.g. text then image), each split over the
    sequence group as split_sequence/padded_piece split it; returns this rank's rows in the layout it passed.

    q, k, v: (batch, rows, heads, head_dim) where rows are this rank's piece of segment 0, then of segment 1, ...
    `segments`: (rows of this rank's piece, true length) per segment. Every row, text included, travels in Ulysses'
    all-to-all with the others, so nothing is gathered whole or computed on two ranks. Attention does not depend on
    the order of its keys, so after the exchange the rows stay rank by rank as they arrived (each rank's pieces in
    turn: no copy to put each segment back together); a ring block is its U ranks' rows, and its valid keys are
    those rows less each piece's padding. With one sequence rank the keys are the joined sequence in order.
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
        bq, bk, bv = sequence_to_heads([q, k, v], padded_heads, ulysses, state.comm).unbind(0)

    def key_ranges(block: int) -> list[tuple[int, int]]:
        """Rows of ring block `block` that are real keys: each of its U sequence ranks' pieces less their padding."""
        ranges, offset = [], 0
        for sequence_rank in range(block * ulysses.size, (block + 1) * ulysses.size):
            for rows, length in segments:
                valid = max(0, min(rows, length - sequence_rank * rows))
                if valid and ranges and ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], offset + valid)
                elif valid:
                    ranges.append((offset, offset + valid))
                offset += rows
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
        out = attention(bq, keys, values, scale=scale, backend=backend)
    else:
        partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        kv = torch.stack([bk, bv])
        for step in range(ring.size):
            shift = RingShift(kv, ring, state.comm) if step < ring.size - 1 else None
            block = (ring.rank - step) % ring.size
            keys = block_keys(kv, block)
            if keys is not None:
                partials[block] = attention_with_lse(bq, *keys, scale=scale, backend=backend)
            if shift is not None:
                kv = shift.wait()
        out = merge_partials([partials[b] for b in sorted(partials)], bq.dtype)
    return heads_to_sequence(out, heads, ulysses, state.comm)
