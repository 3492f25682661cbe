"""The redundancy analysis and cache schedules (block_cache.py) on gloo ranks, carried as jobs like the pool runs them.

- The per-step, per-block sums at ulysses 2 (uneven grid, padded text and image pieces), cfg 2 (two conds shared
  out; a lone cond that both ranks compute, counted once) and data 2 (three batch rows, one of them padding on rank 1)
  equal the one-process sums to float rounding, so the relative changes describe the whole image.
- Blocks frozen over a range of steps show exactly zero output change there (and their successors zero input change).
- An empty schedule is the uncached model bit for bit; a schedule skipping steps and single blocks gives, at ulysses 2,
  ring 2 and cfg 2, the one-process scheduled latent to fp32 rounding, and skips what it says on every rank.
- Under PipeFusion 2 (each rank holding one block) and patch 2, alone and at world 4 with ulysses 2 / cfg 2: at full
  warmup the schedule gives the one-process scheduled latent and skips what it says; at the default warmup it skips
  per patch and its error against stock is finite (printed); an empty schedule is the uncached pool (world 2, stale
  keys and values in use). A block's key/value tables are named by the block, not by the order of attention calls.
"""
from __future__ import annotations

import pytest
import torch

import block_cache_cases as cases
import flux_cases
from parallel_core.local_launch import run_on_ranks

DEGREES = {"ulysses_degree": 2}
SCHEDULE_CONFIGS = [{"ring_degree": 2}, {"cfg_degree": 2}]
ANALYSIS_CONFIGS = [{"cfg_degree": 2}, {"data_degree": 2}]
STALE_CONFIGS = [{"pipefusion_degree": 2}, {"patch_degree": 2}]
STALE_CONFIGS_WORLD4 = [{"pipefusion_degree": 2, "ulysses_degree": 2}, {"patch_degree": 2, "cfg_degree": 2}]


@pytest.fixture(scope="module")
def per_rank(tiny_flux_paths):
    return run_on_ranks(cases.blocks_rank, 2, str(tiny_flux_paths["dev"]), DEGREES, SCHEDULE_CONFIGS, ANALYSIS_CONFIGS,
                        STALE_CONFIGS, timeout_s=1200)


def _close(a, b, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _skipped(blocks: int) -> int:
    return sum(blocks if b == "all" else len(b) for b in cases.SKIP.values())


def _skips_of(block: int) -> int:
    return sum(1 for b in cases.SKIP.values() if b == "all" or block in b)


def _expected_reused(config: dict, blocks: int, patches: int = 1) -> list[int]:
    """The ranks' skipped block evaluations, sorted: PipeFusion 2 skips each block (one per stage here) on its stage's
    ranks, once per patch; patch parallel (and cfg parallel, each rank's calls holding its own cond) skips every
    block on every rank."""
    world = 1
    for degree in config.values():
        world *= degree
    if "pipefusion_degree" in config:
        return sorted(_skips_of(block) * patches for block in range(blocks) for _ in range(world // 2))
    return [_skipped(blocks)] * world


def test_sharded_sums_equal_the_one_process_sums(per_rank):
    one = per_rank[0]["one"]["analysis"]["block_changes"]
    assert one["blocks"] == per_rank[0]["names"] and one["steps"] == cases.STEPS
    assert one["output_change"][0] is None and all(row is not None for row in one["output_change"][1:])
    for rank, result in enumerate(per_rank):
        pool = result["pool"]["analysis"]["block_changes"]
        for name, values in one["sums"].items():
            for step in range(1, cases.STEPS):
                for block in range(len(one["blocks"])):
                    a, b = values[step][block], pool["sums"][name][step][block]
                    assert a > 0 and _close(a, b), f"rank {rank} {name} step {step} block {block}: {b} vs one process {a}"
        assert (result["pool"]["analysis"]["samples"] - per_rank[0]["one"]["uncached"]["samples"]).abs().max().item() <= flux_cases.FP32_TOL


@pytest.mark.parametrize("config", ANALYSIS_CONFIGS, ids=flux_cases.tag)
def test_sums_under_cfg_and_data_parallel_equal_the_one_process_sums(per_rank, config):
    for case, one in per_rank[0]["one_analysis"].items():
        for rank, result in enumerate(per_rank):
            pool = result[f"analysis-{flux_cases.tag(config)}"][case]
            for name, values in one["sums"].items():
                for step in range(1, cases.STEPS):
                    for block in range(len(one["blocks"])):
                        a, b = values[step][block], pool["sums"][name][step][block]
                        assert a > 0 and _close(a, b), f"{case} rank {rank} {name} step {step} block {block}: {b} vs one process {a}"


@pytest.mark.parametrize("where", ["one", "pool"])
def test_frozen_blocks_show_zero_change_exactly_there(per_rank, where):
    changes = per_rank[0][where]["frozen"]["block_changes"]
    for step in range(1, cases.STEPS):
        for block, name in enumerate(changes["blocks"]):
            out = changes["output_change"][step][block]
            if step in cases.FROZEN_STEPS and name in cases.FROZEN_BLOCKS:
                assert out == 0.0, f"{where}: {name} changed {out} at frozen step {step}"
            else:
                assert out > 1e-4, f"{where}: {name} changed only {out} at step {step}"
    # The figure shows it: the frozen cells in the ramp's zero colour, the others not.
    from comfyui_xdit import redundancy

    analysis = {**changes, "model": {"file": "tiny-flux-dev.safetensors"}}
    figure = redundancy.render(analysis)
    for step in range(1, cases.STEPS):
        for block in range(len(changes["blocks"])):
            x, y = redundancy.cell_centre(analysis, step, block)
            zero = tuple(round(float(v) * 255) for v in figure[0, y, x]) == redundancy.colour(0.0)
            assert zero == (step in cases.FROZEN_STEPS), (where, step, block)
    # single_blocks.0 takes double_blocks.0's (frozen) streams: its input does not change at the frozen steps either.
    assert all(changes["input_change"][s][1] == 0.0 for s in cases.FROZEN_STEPS)
    assert all(changes["input_change"][s][0] > 1e-4 for s in cases.FROZEN_STEPS)


def test_empty_schedule_is_the_uncached_model_bit_for_bit(per_rank):
    for where in ("one", "pool"):
        runs = per_rank[0][where]
        assert runs["no-skip"]["blocks_reused"] == 0
        assert (runs["no-skip"]["samples"] - runs["uncached"]["samples"]).abs().max().item() == 0


def test_schedule_skips_what_it_says_on_every_rank_alike(per_rank):
    one = per_rank[0]["one"]["schedule"]
    blocks = len(per_rank[0]["names"])
    calls = 1  # the tiny Flux's CFG conds run in one batched call per step
    skipped = _skipped(blocks) * calls
    assert one["blocks_reused"] == skipped and one["blocks_ran"] == cases.STEPS * blocks * calls - skipped
    uncached = per_rank[0]["one"]["uncached"]["samples"]
    assert (one["samples"] - uncached).abs().max().item() > 1e-4, "the schedule changed nothing: the comparison proves nothing"
    tolerance = max(flux_cases.FP32_TOL, flux_cases.RELATIVE_TOL * one["samples"].abs().max().item())
    for rank, result in enumerate(per_rank):
        for where in ["pool"] + [flux_cases.tag(c) for c in SCHEDULE_CONFIGS]:
            pool = result[where]["schedule"]
            # Under cfg 2 each rank's one call per step holds its own cond: the same evaluations skipped.
            assert pool["blocks_reused"] == skipped, f"{where} rank {rank}: {pool['blocks_reused']}"
            err = (pool["samples"] - one["samples"]).abs().max().item()
            assert err <= tolerance, f"{where} rank {rank}: {err:.3e}"
            assert result[where]["no-skip"]["blocks_reused"] == 0
            assert (result[where]["no-skip"]["samples"] - per_rank[0]["one"]["uncached"]["samples"]).abs().max().item() <= tolerance


@pytest.mark.fast
def test_key_value_tables_are_named_by_block_when_blocks_announce_themselves(comfy_root):
    from comfyui_xdit.stale_steps import TableNames, running_block

    names = TableNames()
    seen = [next(names)]
    with running_block(3):
        seen += [next(names), next(names)]
    seen.append(next(names))
    with running_block(5):  # a skipped block 4 between them names nothing and shifts nothing
        seen.append(next(names))
    assert seen == [0, ("block", 3, 0), ("block", 3, 1), 1, ("block", 5, 0)]


@pytest.mark.parametrize("config", STALE_CONFIGS, ids=flux_cases.tag)
def test_empty_schedule_is_the_uncached_pool_under_stale_methods(per_rank, config):
    for rank, result in enumerate(per_rank):
        runs = result[flux_cases.tag(config)]
        assert runs["no-skip-stale"]["blocks_reused"] == 0 and runs["no-skip-stale"]["blocks_ran"] > 0
        err = (runs["no-skip-stale"]["samples"] - runs["uncached-stale"]["samples"]).abs().max().item()
        assert err <= 1e-6, f"{flux_cases.tag(config)} rank {rank}: {err:.3e}"


def _reused(per_rank: list[dict], config: dict, run: str) -> list[int]:
    return sorted(result[flux_cases.tag(config)][run]["blocks_reused"] for result in per_rank)


@pytest.fixture(scope="module")
def per_rank_world4(tiny_flux_paths):
    return run_on_ranks(cases.stale_rank, 4, str(tiny_flux_paths["dev"]), STALE_CONFIGS_WORLD4, timeout_s=1200)


@pytest.fixture(params=[(2, c) for c in STALE_CONFIGS] + [(4, c) for c in STALE_CONFIGS_WORLD4],
                ids=lambda p: f"world{p[0]}-{flux_cases.tag(p[1])}")
def stale_runs(request) -> tuple[list[dict], dict]:
    """Every rank's results and the config, at world 2 (alone) and world 4 (combined)."""
    world, config = request.param
    return request.getfixturevalue("per_rank" if world == 2 else "per_rank_world4"), config


def test_schedule_at_full_warmup_is_the_one_process_schedule(stale_runs):
    per_rank, config = stale_runs
    one = per_rank[0]["one"]["schedule"]
    assert _reused(per_rank, config, "schedule-exact") == _expected_reused(config, len(cases.BLOCKS))
    tolerance = max(flux_cases.FP32_TOL, flux_cases.RELATIVE_TOL * one["samples"].abs().max().item())
    for rank, result in enumerate(per_rank):
        err = (result[flux_cases.tag(config)]["schedule-exact"]["samples"] - one["samples"]).abs().max().item()
        print(f"{flux_cases.tag(config)} full warmup, schedule vs one-process schedule, rank {rank}: {err:.3e}")
        assert err <= tolerance, f"{flux_cases.tag(config)} rank {rank}: {err:.3e}"


def test_schedule_at_default_warmup_runs_with_stale_keys_and_values(stale_runs):
    from comfyui_xdit.stale_steps import resolve_patches

    per_rank, config = stale_runs
    # PipeFusion's stale calls run every block once per patch (the default: as many as cut 9 token rows evenly).
    patches = resolve_patches(0, 2, cases.CASE.height // 2) if "pipefusion_degree" in config else 1
    assert _reused(per_rank, config, "schedule-stale") == _expected_reused(config, len(cases.BLOCKS), patches)
    stock = per_rank[0]["one"]["uncached"]["samples"]
    one = per_rank[0]["one"]["schedule"]["samples"]
    for rank, result in enumerate(per_rank):
        runs = result[flux_cases.tag(config)]
        samples = runs["schedule-stale"]["samples"]
        assert torch.isfinite(samples).all()
        # Approximate: recorded, not bounded (stale keys/values, and skipped blocks' tables older still).
        uncached = f"; no schedule vs stock {(runs['uncached-stale']['samples'] - stock).abs().max().item():.3e}" if "uncached-stale" in runs else ""
        print(f"{flux_cases.tag(config)} default warmup, rank {rank}: schedule vs stock {(samples - stock).abs().max().item():.3e}, "
              f"vs one-process schedule {(samples - one).abs().max().item():.3e}{uncached} (latent max {stock.abs().max().item():.3f})")
