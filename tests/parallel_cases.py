"""Rank-side cases for test_parallel_core: run inside gloo ranks, compared against full-tensor references.

Every rank builds the same full tensors from one seed, runs the parallel path on its shard, and reports the max
error against torch's scaled_dot_product_attention on the full tensors, plus the bytes it sent vs the formula.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

import parallel_core as pc


def factorisations(world_size: int) -> list[tuple[int, int, int]]:
    """Every (ulysses, ring, cfg) with cfg in {1, 2} whose product is world_size."""
    out = []
    for cfg in (1, 2):
        if world_size % cfg:
            continue
        sp = world_size // cfg
        for ulysses in range(1, sp + 1):
            if sp % ulysses == 0:
                out.append((ulysses, sp // ulysses, cfg))
    return out


def reference(q, k, v, causal=False, joint=None, strategy="front"):
    if joint is not None:
        jq, jk, jv = joint
        order = (lambda a, b: [a, b]) if strategy == "front" else (lambda a, b: [b, a])
        q, k, v = (torch.cat(order(j, x), dim=1) for j, x in ((jq, q), (jk, k), (jv, v)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=causal)
    return out.transpose(1, 2)


def expected_bytes(state, batch, seq, heads, head_dim, elt, text_len=0):
    """Bytes one rank sends in one usp_attention call, from the method's definition."""
    u, r = state.ulysses.size, state.ring.size
    local = -(-seq // (u * r))
    padded_heads = -(-heads // u) * u
    heads_here = padded_heads // u
    block = u * local
    total = 0
    if u > 1:
        total += 3 * batch * local * padded_heads * head_dim * elt * (u - 1) // u  # q, k, v in
        total += batch * block * heads_here * head_dim * elt * (u - 1) // u  # output back
        total += batch * text_len * heads_here * head_dim * elt * (u - 1)  # text rows' heads
    if r > 1:
        total += (r - 1) * 2 * batch * block * heads_here * head_dim * elt  # K/V blocks around the ring
    return total


def _run_case(state, batch, seq, heads, head_dim, dtype, causal=False, text_len=0, strategy="front", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    joint = None
    if text_len:
        joint = tuple(torch.randn((batch, text_len, heads, head_dim), generator=gen).to(dtype) for _ in range(3))
    ref = reference(q, k, v, causal, joint, strategy)

    mine = [pc.split_batch(t, state, 0, "cfg") for t in (q, k, v)]
    mine = [pc.split_sequence(t, state, 1) for t in mine]
    joint_mine = {}
    if joint:
        jq, jk, jv = (pc.split_batch(t, state, 0, "cfg") for t in joint)
        joint_mine = dict(joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy=strategy)
    state.comm.reset()
    out = pc.usp_attention(*mine, state, causal=causal, **joint_mine)
    sent = state.comm.bytes_sent()
    if joint:
        text_out = out[:, :text_len] if strategy == "front" else out[:, -text_len:]
        image_out = out[:, text_len:] if strategy == "front" else out[:, :-text_len]
    else:
        image_out = out
    image_full = pc.gather_batch(pc.gather_sequence(image_out, state, 1), state, 0, "cfg")
    if joint:
        text_full = pc.gather_batch(text_out.contiguous(), state, 0, "cfg")
        full = torch.cat([text_full, image_full] if strategy == "front" else [image_full, text_full], dim=1)
    else:
        full = image_full
    local_batch = -(-batch // state.cfg.size)
    return {
        "err": (full.float() - ref).abs().max().item(),
        "bytes": sent,
        "expected_bytes": expected_bytes(state, local_batch, seq, heads, head_dim, torch.tensor([], dtype=dtype).element_size(), text_len),
    }


def usp_cases(rank: int, world_size: int) -> dict[str, dict]:
    """All USP cases for this world size; keys name the case."""
    results = {}
    for ulysses, ring, cfg in factorisations(world_size):
        config = pc.ParallelConfig(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg)
        tag = f"u{ulysses}r{ring}c{cfg}"
        for backend in ("auto", "math"):
            state = pc.init_parallel(config, attention_backend=backend)
            b = "" if backend == "auto" else "-math"
            results[f"{tag}{b}-even"] = _run_case(state, 2, 64, 4, 16, torch.float32)
            results[f"{tag}{b}-uneven37"] = _run_case(state, 2, 37, 4, 16, torch.float32, seed=1)
            results[f"{tag}{b}-causal"] = _run_case(state, 2, 40, 2, 16, torch.float32, causal=True, seed=2)
            results[f"{tag}{b}-causal-uneven"] = _run_case(state, 1, 37, 2, 16, torch.float32, causal=True, seed=3)
            for strategy in ("front", "rear"):
                results[f"{tag}{b}-joint-{strategy}"] = _run_case(state, 2, 33, 4, 16, torch.float32, text_len=7, strategy=strategy, seed=4)
        state = pc.init_parallel(config)
        results[f"{tag}-uneven4097"] = _run_case(state, 1, 4097, 2, 16, torch.float32, seed=5)
        results[f"{tag}-tiny5"] = _run_case(state, 2, 5, 2, 8, torch.float32, seed=6)  # some ranks hold only padding
        results[f"{tag}-batch3"] = _run_case(state, 3, 20, 2, 8, torch.float32, seed=7)  # cfg split uneven
        results[f"{tag}-bf16"] = _run_case(state, 2, 48, 4, 32, torch.bfloat16, seed=8)
        results[f"{tag}-bf16-joint"] = _run_case(state, 2, 45, 4, 32, torch.bfloat16, text_len=9, seed=9)
        for heads in range(1, 25):
            results[f"{tag}-heads{heads}"] = _run_case(state, 1, 19, heads, 8, torch.float32, text_len=3, seed=10 + heads)
    return results


def split_gather_roundtrip(rank: int, world_size: int) -> dict[str, bool]:
    """split -> gather is the identity for every length and every dimension."""
    results = {}
    for ulysses, ring, cfg in factorisations(world_size):
        state = pc.init_parallel(pc.ParallelConfig(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg))
        for length, dim in itertools.product((1, 3, 7, 8, 37), (0, 1, -1)):
            x = torch.arange(math.prod((length, 5, length)), dtype=torch.float32).reshape(length, 5, length)
            back = pc.gather_sequence(pc.split_sequence(x, state, dim), state, dim)
            results[f"u{ulysses}r{ring}c{cfg}-seq-len{length}-dim{dim}"] = torch.equal(back, x)
            back = pc.gather_batch(pc.split_batch(x, state, dim, "cfg"), state, dim, "cfg")
            results[f"u{ulysses}r{ring}c{cfg}-cfg-len{length}-dim{dim}"] = torch.equal(back, x)
    return results


def layout_of_ranks(rank: int, world_size: int) -> dict[str, tuple]:
    """Each dimension's (rank, size, member ranks) on this rank, for a data 2 × ring 1 × ulysses 2 or similar."""
    config = pc.ParallelConfig(ulysses_degree=2, ring_degree=world_size // 4, cfg_degree=2) if world_size >= 4 else pc.ParallelConfig(ulysses_degree=world_size)
    state = pc.init_parallel(config)
    return {name: (state.group_of(name).rank, state.group_of(name).size, state.group_of(name).ranks) for name in ("ulysses", "ring", "sequence", "cfg", "data", "pipefusion")}


def fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("= 2")
    return rank


def segments_cases(rank: int, world_size: int) -> dict[str, dict]:
    """usp_segments_attention: [text, image] rows, each split over the sequence group, against full attention over
    the joined sequence; every (ulysses, ring) of the world; uneven lengths and heads, text shorter than the world.
    Bytes: q, k, v in and the output back through Ulysses' all-to-all, K/V blocks around the ring."""
    from parallel_core.usp import usp_segments_attention

    results = {}
    for ulysses, ring, _ in [f for f in factorisations(world_size) if f[2] == 1]:
        state = pc.init_parallel(pc.ParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
        for name, text_len, image_len, heads in (("even", 8, 32, 4), ("uneven", 7, 37, 3), ("short-text", 1, 21, 2)):
            gen = torch.Generator().manual_seed(text_len)
            full = [torch.randn(2, text_len + image_len, heads, 16, generator=gen) for _ in range(3)]
            ref = reference(*full)
            sp = state.sequence
            mine = [torch.cat([pc.sharding.padded_piece(t[:, :text_len], 1, sp.size, sp.rank),
                               pc.split_sequence(t[:, text_len:], state, 1)], dim=1) for t in full]
            text_local = -(-text_len // sp.size)
            segments = [(text_local, text_len), (mine[0].shape[1] - text_local, image_len)]
            state.comm.reset()
            out = usp_segments_attention(*mine, state, segments)
            text = pc.all_gather(out[:, :text_local].contiguous(), 1, sp, state.comm)[:, :text_len]
            image = pc.all_gather(out[:, text_local:].contiguous(), 1, sp, state.comm)[:, :image_len]
            rows, heads_here = mine[0].shape[1], -(-heads // ulysses)
            expected = (4 * 2 * rows * heads_here * ulysses * 16 * 4 * (ulysses - 1) // ulysses
                        + (ring - 1) * 2 * 2 * ulysses * rows * heads_here * 16 * 4)
            results[f"u{ulysses}r{ring}-{name}"] = {
                "err": (torch.cat([text, image], dim=1) - ref).abs().max().item(),
                "bytes": state.comm.bytes_sent("all_to_all") + state.comm.bytes_sent("ring_send"), "expected_bytes": expected}
    return results
