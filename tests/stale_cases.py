"""Rank-side cases for test_stale_kv: the stale-KV attentions against full-tensor references built from their
definition (which rows are fresh, which are one step old)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import parallel_core as pc
from parallel_core.sharding import shard_positions

TEXT, IMAGE, HEADS, HEAD_DIM = 5, 37, 3, 16
TOTAL = TEXT + IMAGE


def _reference(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _qkv(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, TOTAL, HEADS, HEAD_DIM, generator=generator)


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x's rows at `positions` (padding rows zero), in the order a rank holds them."""
    picked = x[:, positions.clamp(min=0)]
    return picked * (positions >= 0).view(1, -1, 1, 1)


def _valid_error(out: torch.Tensor, expected: torch.Tensor, positions: torch.Tensor) -> float:
    valid = positions >= 0
    return (out[:, valid] - expected[:, valid]).abs().max().item() if bool(valid.any()) else 0.0


def pipefusion_case(state: pc.ParallelState) -> dict:
    """A synchronous step (one patch of every row), then a step in three patches over the stage's sequence ranks."""
    sp = state.sequence
    cache = pc.KVCache()
    errors = {}
    old = _qkv(1)
    positions = shard_positions([range(TOTAL)], sp.size)
    mine = positions[sp.rank]
    out = pc.pipefusion_attention(*(_rows(t, mine) for t in old), positions, TOTAL, cache, "s", 0, state)
    errors["synchronous"] = _valid_error(out, _rows(_reference(*old), mine), mine)
    new = _qkv(2)
    keys, values = old[1].clone(), old[2].clone()
    for index, (start, stop) in enumerate(pc.patch_bands(TOTAL, 3)):
        positions = shard_positions([range(start, stop)], sp.size)
        mine = positions[sp.rank]
        out = pc.pipefusion_attention(*(_rows(t, mine) for t in new), positions, TOTAL, cache, "s", 0, state)
        keys[:, start:stop], values[:, start:stop] = new[1][:, start:stop], new[2][:, start:stop]
        expected = _reference(new[0], keys, values)  # rows of patches 0..index fresh, the rest one step old
        errors[f"patch{index}"] = _valid_error(out, _rows(expected, mine), mine)
    cache.clear()
    return {"errors": errors, "bytes": state.comm.snapshot()}


def displaced_case(state: pc.ParallelState) -> dict:
    """Step 1 synchronous; steps 2 and 3 see their own rows fresh and the others' rows of the step before."""
    group = state.patch
    cache = pc.KVCache()
    positions = shard_positions([range(TEXT), range(TEXT, TOTAL)], group.size)
    mine = positions[group.rank]
    steps = [_qkv(seed) for seed in (11, 12, 13)]
    errors = {}
    for step, qkv in enumerate(steps):
        out = pc.displaced_attention(*(_rows(t, mine) for t in qkv), positions, TOTAL, cache, "s", 0, group, state, synchronous=step == 0)
        if step == 0:
            keys, values = qkv[1], qkv[2]
        else:
            keys, values = steps[step - 1][1].clone(), steps[step - 1][2].clone()
            own = mine[mine >= 0]
            keys[:, own], values[:, own] = qkv[1][:, own], qkv[2][:, own]
        errors[f"step{step}"] = _valid_error(out, _rows(_reference(qkv[0], keys, values), mine), mine)
    cache.clear()
    return {"errors": errors, "bytes": state.comm.snapshot()}


def stale_rank(rank: int, world_size: int, configs: list[dict]) -> dict:
    results = {}
    for degrees in configs:
        state = pc.init_parallel(pc.ParallelConfig(**degrees))
        case = displaced_case if state.patch.size > 1 else pipefusion_case
        results[str(sorted(degrees.items()))] = case(state)
    return results


def pipeline_send_rank(rank: int, world_size: int) -> dict:
    """send_async / recv between neighbouring pipefusion ranks, with the bytes recorded on the sender."""
    from parallel_core.comm import recv, send_async

    state = pc.init_parallel(pc.ParallelConfig(pipefusion_degree=world_size))
    pf = state.pipefusion
    x = torch.full((2, 3), float(rank))
    if pf.rank > 0:
        x = recv(x, pf.rank - 1, pf, state.comm) + 1
    if pf.rank < pf.size - 1:
        send_async(x, pf.rank + 1, pf, state.comm).wait()
    return {"value": x[0, 0].item(), "bytes": state.comm.bytes_sent("send", "pipefusion")}
