"""parallel_core on real gloo ranks (CPU): USP exactness, padding, heads, joint tokens, CFG split, byte counts."""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

import parallel_cases
import parallel_core as pc
from parallel_core.local_launch import RankFailed, run_on_ranks

pytestmark = pytest.mark.fast

WORLD_SIZES = (1, 2, 4)
FP32_TOL = 1e-5
BF16_TOL = 2e-2


@functools.lru_cache(maxsize=None)
def usp_results(world_size: int) -> dict[str, dict]:
    """One spawn per world size runs every case; rank 0's view is the one checked (all ranks must agree)."""
    per_rank = run_on_ranks(parallel_cases.usp_cases, world_size, timeout_s=600)
    for rank, results in enumerate(per_rank[1:], start=1):
        for name, result in results.items():
            assert result["err"] == per_rank[0][name]["err"], f"rank {rank} disagrees with rank 0 on {name}"
    # Each rank's bytes are checked separately: they differ by rank only through padding, never in formula.
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


def _case_names(world_size: int) -> list[str]:
    names = []
    for u, r, c in parallel_cases.factorisations(world_size):
        tag = f"u{u}r{r}c{c}"
        for b in ("", "-math"):
            names += [f"{tag}{b}-{s}" for s in ("even", "uneven37", "causal", "causal-uneven", "joint-front", "joint-rear")]
        names += [f"{tag}-{s}" for s in ("uneven4097", "tiny5", "batch3", "bf16", "bf16-joint")]
        names += [f"{tag}-heads{h}" for h in range(1, 25)]
    return names


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_usp_matches_full_attention(world_size):
    results = usp_results(world_size)
    assert set(results) == set(_case_names(world_size))
    failures = []
    for name, per_rank in results.items():
        tol = BF16_TOL if "bf16" in name else FP32_TOL
        err = per_rank[0]["err"]
        if not err <= tol:
            failures.append(f"{name}: max abs error {err:.3e} > {tol}")
        for rank, result in enumerate(per_rank):
            if result["bytes"] != result["expected_bytes"]:
                failures.append(f"{name} rank {rank}: sent {result['bytes']} bytes, formula says {result['expected_bytes']}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_split_gather_roundtrip(world_size):
    for results in run_on_ranks(parallel_cases.split_gather_roundtrip, world_size):
        bad = [name for name, ok in results.items() if not ok]
        assert not bad, f"split/gather lost data: {bad}"


def test_rank_layout_puts_ulysses_innermost_and_cfg_outermost():
    layouts = run_on_ranks(parallel_cases.layout_of_ranks, 4)
    # cfg 2 × ring 1 × ulysses 2: ulysses pairs are neighbours, cfg pairs are two apart.
    assert [lay["ulysses"][2] for lay in layouts] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [lay["cfg"][2] for lay in layouts] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [lay["sequence"][2] for lay in layouts] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [lay["cfg"][0] for lay in layouts] == [0, 0, 1, 1]
    assert all(lay["data"][1] == 1 and lay["pipefusion"][1] == 1 for lay in layouts)


def test_rank_groups_for_the_documented_world_of_eight():
    config = pc.ParallelConfig(ulysses_degree=2, ring_degree=2, cfg_degree=2)
    assert pc.rank_groups(config, ("ulysses",)) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert pc.rank_groups(config, ("ring",)) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert pc.rank_groups(config, ("cfg",)) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert pc.rank_groups(config, ("ring", "ulysses")) == [(0, 1, 2, 3), (4, 5, 6, 7)]


# --- local kernels and the log-sum-exp a ring depends on -------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch_cpu_flash", "math"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_lse_is_the_true_logsumexp(backend, causal, dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 29, 3, 16, generator=gen).to(dtype) for _ in range(3))
    out, lse = pc.attention_with_lse(q, k, v, causal=causal, backend=backend)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / 4.0
    if causal:
        scores = scores.masked_fill(~torch.ones(29, 29, dtype=torch.bool).tril(), float("-inf"))
    expected_lse = torch.logsumexp(scores, -1)
    expected_out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v.float())
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 29)
    assert (lse - expected_lse).abs().max() < tol
    assert (out.float() - expected_out).abs().max() < tol
    # The LSE must not be trivially zero: a zero LSE silently breaks ring merging.
    assert lse.abs().min() > 0


@pytest.mark.parametrize("cuts", ((10,), (5, 13, 20), (1, 2, 23)))
def test_merging_blocks_needs_the_real_lse(cuts):
    """Blocks of any size, merged in order by folding one block at a time (ring ranks hand theirs in that way)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 24, 2, 8, generator=gen) for _ in range(3))
    bounds = (0, *cuts, 24)
    parts = [pc.attention_with_lse(q, k[:, a:b], v[:, a:b]) for a, b in zip(bounds, bounds[1:])]
    full = parallel_cases.reference(q, k, v)
    assert (pc.merge_partials(parts, torch.float32) - full).abs().max() < 1e-5
    assert pc.merge_partials([(o.bfloat16(), lse) for o, lse in parts], torch.bfloat16).dtype == torch.bfloat16
    zero_lse = [(o, torch.zeros_like(lse)) for o, lse in parts]
    assert (pc.merge_partials(zero_lse, torch.float32) - full).abs().max() > 1e-2


def test_ulysses_exchange_hands_back_views_of_one_buffer():
    """sequence_to_heads' result is views of the one buffer the exchange filled (its layout is what arrives), heads
    past the real ones zero; heads_to_sequence undoes it. One rank, no group: the layout and the round trip only
    (the multi-rank exchange is checked by the segments and USP tests)."""
    from parallel_core.comm import CommStats, DimensionGroup, heads_to_sequence, sequence_to_heads

    one = DimensionGroup("ulysses", 0, 1, (0,))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=gen) for _ in range(3))
    qkv = sequence_to_heads([q, k, v], 4, one, CommStats())
    assert qkv.shape == (3, 2, 5, 4, 4)
    assert len({t.untyped_storage().data_ptr() for t in qkv.unbind(0)}) == 1
    for got, sent in zip(qkv.unbind(0), (q, k, v)):
        assert torch.equal(got[:, :, :3], sent) and not got[:, :, 3:].any()
    assert torch.equal(heads_to_sequence(qkv[0], 3, one, CommStats()), q)


# --- errors that say what to change ------------------------------------------------------------------------------

def test_validate_reports_the_degree_product():
    with pytest.raises(ValueError, match=r"ulysses_degree 3 × ring_degree 2 × cfg_degree 2 = 12, but 8 ranks are running"):
        pc.ParallelConfig(ulysses_degree=3, ring_degree=2, cfg_degree=2).validate(8)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_validate_rejects_non_positive_or_non_integer_degrees(bad):
    with pytest.raises(ValueError, match="ring_degree must be a whole number >= 1"):
        pc.ParallelConfig(ring_degree=bad).validate(1)


def test_validate_rejects_bad_world_and_heads():
    with pytest.raises(ValueError, match="world size must be >= 1"):
        pc.ParallelConfig().validate(0)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        pc.ParallelConfig().validate(1, num_heads=0)
    pc.ParallelConfig(ulysses_degree=4).validate(4, num_heads=6)  # non-dividing heads are padded, not refused


def test_init_parallel_refuses_a_config_for_another_world_size():
    with pytest.raises(ValueError, match="= 2, but 1 ranks are running"):
        pc.init_parallel(pc.ParallelConfig(ulysses_degree=2))
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        pc.init_parallel(pc.ParallelConfig(), attention_backend="fast")


def test_usp_attention_input_errors():
    state = pc.init_parallel(pc.ParallelConfig())
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="share one"):
        pc.usp_attention(q, q[:, :4], q, state)
    with pytest.raises(ValueError, match="all of joint_q, joint_k, joint_v or none"):
        pc.usp_attention(q, q, q, state, joint_q=q)
    with pytest.raises(ValueError, match="joint_strategy must be one of"):
        pc.usp_attention(q, q, q, state, joint_q=q, joint_k=q, joint_v=q, joint_strategy="middle")
    with pytest.raises(ValueError, match="causal attention with joint tokens"):
        pc.usp_attention(q, q, q, state, joint_q=q, joint_k=q, joint_v=q, causal=True)
    with pytest.raises(ValueError, match="must match q"):
        j = torch.randn(1, 3, 3, 4)
        pc.usp_attention(q, q, q, state, joint_q=j, joint_k=j, joint_v=j)
    with pytest.raises(ValueError, match="sequence length 20 over 1 sequence-parallel ranks gives shards of 20, but q holds 8"):
        pc.usp_attention(q, q, q, state, seq_len=20)


def test_split_and_gather_errors():
    state = pc.init_parallel(pc.ParallelConfig())
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="split_batch over 'ring'"):
        pc.split_batch(x, state, 0, over="ring")
    with pytest.raises(ValueError, match="no data length recorded"):
        pc.gather_batch(x, state, 0, over="data")
    with pytest.raises(ValueError, match="length 9 exceeds the 4 elements gathered"):
        pc.gather_sequence(x, state, 0, length=9)


def test_a_failing_rank_fails_the_run_with_its_traceback():
    with pytest.raises(RankFailed, match=r"rank 1 of 2 failed:(.|\n)*ValueError: = 2"):
        run_on_ranks(parallel_cases.fail_on_rank_one, 2)


def test_parallel_core_imports_with_torch_only():
    code = (
        "import sys, parallel_core; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'ray', 'comfyui_xdit', 'ray_backend')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nccl_launch_needs_a_device_per_rank():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the devices; test_gpu_parallel.py runs NCCL ranks")
    with pytest.raises(ValueError, match=r"backend nccl needs one CUDA device per rank: 2 ranks, \d devices visible; use gloo"):
        run_on_ranks(parallel_cases.fail_on_rank_one, 2, backend="nccl")


@pytest.mark.parametrize("world_size", (2, 4))
def test_segments_attention_equals_full_attention_over_the_joined_sequence(world_size):
    """[text, image] rows both in Ulysses' all-to-all and Ring's blocks (usp_segments_attention, Flux's attention):
    full attention's result on every rank for every (ulysses, ring), with the bytes of that method."""
    per_rank = run_on_ranks(parallel_cases.segments_cases, world_size, timeout_s=600)
    assert len(per_rank[0]) == 3 * len([f for f in parallel_cases.factorisations(world_size) if f[2] == 1])
    for results in per_rank:
        for name, result in results.items():
            assert result["err"] <= FP32_TOL, f"{name}: {result['err']:.2e}"
            assert result["bytes"] == result["expected_bytes"], f"{name}: {result['bytes']} bytes, expected {result['expected_bytes']}"
