"""PipeFusion's plan (stages, patches) and the stale-KV attentions, on gloo ranks, against their definitions."""
from __future__ import annotations

import functools

import pytest

import parallel_core as pc
import stale_cases
from parallel_core.local_launch import run_on_ranks
from parallel_core.sharding import shard_positions

pytestmark = pytest.mark.fast

FP32_TOL = 1e-5
CONFIGS = {
    2: [{"pipefusion_degree": 2}, {"ulysses_degree": 2}, {"ring_degree": 2}, {"patch_degree": 2}],
    4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 4}, {"pipefusion_degree": 2, "ring_degree": 2},
        {"patch_degree": 4}, {"patch_degree": 2, "cfg_degree": 2}],
}


@functools.lru_cache(maxsize=None)
def _run(world_size: int) -> list[dict]:
    return run_on_ranks(stale_cases.stale_rank, world_size, CONFIGS[world_size], timeout_s=300)


@pytest.mark.parametrize("world_size", [2, 4])
def test_stale_attention_matches_its_definition(world_size):
    failures = []
    for rank, results in enumerate(_run(world_size)):
        for config, result in results.items():
            failures += [f"rank {rank} {config} {case}: {err:.2e}" for case, err in result["errors"].items() if not err <= FP32_TOL]
    assert not failures, "\n".join(failures)


def test_displaced_exchange_overlaps_and_pipefusion_sends_nothing_for_attention():
    results = _run(4)[0]
    displaced = results[str(sorted({"patch_degree": 4}.items()))]["bytes"]
    rows = -(-stale_cases.TEXT // 4) + -(-stale_cases.IMAGE // 4)
    one_gather = 2 * rows * stale_cases.HEADS * stale_cases.HEAD_DIM * 4 * 3  # k and v of this rank's rows to 3 peers
    # Step 1 gathers synchronously, steps 2 and 3 start gathers that complete while later work runs.
    assert displaced == {"all_gather/patch": one_gather, "all_gather_async/patch": 2 * one_gather}
    sequence_only = results[str(sorted({"ulysses_degree": 4}.items()))]["bytes"]
    assert set(sequence_only) == {"all_to_all/ulysses"}, "Ulysses inside a stage moves only its all-to-alls"


def test_pipeline_neighbours_pass_tensors_along():
    results = run_on_ranks(stale_cases.pipeline_send_rank, 4, timeout_s=120)
    assert [r["value"] for r in results] == [0.0, 1.0, 2.0, 3.0]
    assert [r["bytes"] for r in results] == [24, 24, 24, 0]


def test_stages_balance_parameters_contiguously():
    double, single = 36, 15  # a Flux double block has 2.4x a single block's parameters
    weights = [double] * 19 + [single] * 38  # Flux.1's blocks
    for stages in (2, 3, 4, 8):
        plan = pc.partition_stages(weights, stages)
        assert [b for r in plan for b in r] == list(range(len(weights)))
        heaviest = max(sum(weights[i] for i in r) for r in plan)
        # Whole blocks: within 5% of an equal share up to 4 stages; at 8 the best cut is 180 (5 double blocks).
        assert heaviest <= (1.05 * sum(weights) / stages if stages <= 4 else 180), (stages, heaviest)
    assert pc.partition_stages([5, 5], 2) == [range(0, 1), range(1, 2)]


def test_stage_and_patch_errors_say_what_to_choose():
    with pytest.raises(ValueError, match="pipefusion_degree 5 is more stages than the model's 4 transformer blocks; use at most 4"):
        pc.partition_stages([1, 1, 1, 1], 5)
    with pytest.raises(ValueError, match="num_pipeline_patch 9 is more patches than the latent's 8 token rows; use at most 8"):
        pc.patch_bands(8, 9)
    with pytest.raises(ValueError, match=r"cuts 20 token rows into bands of 3 and 2 rows \(50% uneven, at most 25% allowed\); choose a number of patches that divides 20: 1, 2, 4, 5, 10, 20"):
        pc.patch_bands(20, 8)
    assert pc.patch_bands(9, 2) == [(0, 5), (5, 9)]  # one row uneven in 5: allowed
    with pytest.raises(ValueError, match="patch_degree 2 .* cannot be combined with ulysses_degree 2; set those to 1"):
        pc.ParallelConfig(patch_degree=2, ulysses_degree=2).validate(4)


def test_positions_mark_padding_and_dummy_rows():
    assert shard_positions([range(3), range(7, 12)], 2).tolist() == [[0, 1, 7, 8, 9], [2, -1, 10, 11, -1]]
    assert shard_positions([range(-1, 0), range(4, 6)], 2).tolist() == [[-1, 4], [-1, 5]]


def test_bubble_of_a_fill_and_drain():
    assert pc.pipeline_bubble(2, 4) == pytest.approx(1 / 5)
    assert pc.pipeline_bubble(1, 4) == 0


def test_table_writes_land_at_their_positions_by_slice_or_by_index():
    import torch

    from parallel_core.stale_kv import _write

    # A patch after the first (a dummy text row, then consecutive rows: written by slices), padding inside a shard,
    # an order that is not consecutive (by index), nothing valid.
    for positions in ([-1, 5, 6, 7], [0, 1, -1, 3], [2, 0, 1, 3], [-1, -1, -1, -1]):
        kv, where = torch.randn(2, 1, 4, 2, 3), torch.tensor(positions)
        expected = torch.zeros(2, 1, 8, 2, 3)
        expected[:, :, where[where >= 0]] = kv[:, :, where >= 0]
        for given in (kv, (kv[0], kv[1])):
            table = torch.zeros(2, 1, 8, 2, 3)
            _write(table, given, where)
            assert torch.equal(table, expected), positions
