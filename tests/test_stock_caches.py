"""ComfyUI's own EasyCache, LazyCache and TorchCompileModel on gloo ranks, carried as a job (job.py) like the pool does.

The pool skips the same steps as the stock graph in one process and ends on its latent to fp32 rounding, at world
2 and 4 with ulysses, ring, cfg and data parallel (cache_cases.CONFIGS) on an uneven token grid; compiled sampling
stays within fp32 tolerance of eager pool sampling and compiles nothing new on a second job. On Qwen-Image, whose
sequence parallelism is a DIFFUSION_MODEL wrapper like EasyCache's, the pool skips the same steps too.
"""
from __future__ import annotations

import functools

import pytest

import cache_cases
import flux_cases
from parallel_core.local_launch import run_on_ranks

COMPILE_CONFIG = {"ulysses_degree": 2}


@pytest.fixture(scope="module")
def flux_path(tiny_flux_paths):
    return str(tiny_flux_paths["dev"])


@functools.lru_cache(maxsize=None)
def _run(world_size: int, path: str) -> list[dict]:
    return run_on_ranks(cache_cases.cache_rank, world_size, path, cache_cases.CONFIGS[world_size], cache_cases.case_dicts(),
                        COMPILE_CONFIG if world_size == 2 else None, timeout_s=1500)


@pytest.mark.parametrize("world_size", sorted(cache_cases.CONFIGS))
def test_pool_skips_the_steps_stock_skips_and_matches_its_latent(world_size, flux_path):
    per_rank = _run(world_size, flux_path)
    stock, stock_steps = per_rank[0]["stock"], per_rank[0]["stock_steps"]
    failures = []
    for case in cache_cases.CASES:
        ran = stock_steps[case.name]
        assert 0 < ran.count(False) < len(ran), f"{case.name}: stock skipped {ran.count(False)} of {len(ran)} steps; the threshold proves nothing"
        tolerance = max(flux_cases.FP32_TOL, flux_cases.RELATIVE_TOL * stock[case.name].abs().max().item())
        for degrees in cache_cases.CONFIGS[world_size]:
            key = f"{flux_cases.tag(degrees)}/{case.name}"
            for rank, result in enumerate(per_rank):
                # Under cfg_degree 4 the regular cfg wrapper (LazyCache) leaves two ranks without a cond: they run
                # no model call at all, yet must end on the same latent.
                idle = degrees.get("cfg_degree", 1) > 2 and case.node == "LazyCache" and not any(result["steps"][key])
                if result["steps"][key] != ran and not idle:
                    failures.append(f"{key} rank {rank}: ran steps {result['steps'][key]}, stock {ran}")
                err = (result["parallel"][key] - stock[case.name]).abs().max().item()
                if not err <= tolerance:
                    failures.append(f"{key} rank {rank}: max abs error {err:.3e} vs stock (tolerance {tolerance:.1e})")
    assert not failures, "\n".join(failures)


def test_easycache_moves_cfg_parallel_inside_its_wrapper(flux_path):
    """Under EasyCache the cfg ranks gather the rows of each call (batch_rows_wrapper) instead of broadcasting conds."""
    per_rank = _run(2, flux_path)
    for result in per_rank:
        easy, lazy = result["bytes"]["cfg2/easycache-cfg"], result["bytes"]["cfg2/lazycache-cfg"]
        assert easy.get("all_gather/cfg", 0) > 0 and "broadcast/cfg" not in easy, easy
        assert lazy.get("broadcast/cfg", 0) > 0, lazy


def test_compiled_pool_matches_eager_and_compiles_once(flux_path):
    per_rank = _run(2, flux_path)
    tag = flux_cases.tag(COMPILE_CONFIG)
    for rank, result in enumerate(per_rank):
        eager, compiled = result["parallel"][f"{tag}/eager"], result["parallel"][f"{tag}/compiled"]
        assert (compiled - eager).abs().max().item() <= flux_cases.FP32_TOL * max(1.0, eager.abs().max().item())
        assert (result["parallel"][f"{tag}/compiled-again"] - compiled).abs().max().item() == 0
        frames = result["compiled_frames"]
        assert frames[f"{tag}/compiled"] > frames[f"{tag}/eager"], f"rank {rank}: nothing was compiled"
        assert frames[f"{tag}/compiled-again"] == frames[f"{tag}/compiled"], f"rank {rank}: the second job compiled again: {frames}"
    assert (per_rank[0]["parallel"][f"{tag}/eager"] - per_rank[0]["stock"]["eager"]).abs().max().item() <= flux_cases.FP32_TOL


def test_easycache_on_qwen_image_sits_outside_its_sequence_parallel_wrapper(tiny_model_path):
    per_rank = run_on_ranks(cache_cases.qwen_image_rank, 2, str(tiny_model_path("qwen_image")), cache_cases.QWEN_CONFIGS, timeout_s=900)
    stock, ran = per_rank[0]["stock"], per_rank[0]["stock_steps"]
    assert 0 < ran.count(False) < len(ran), f"stock skipped {ran.count(False)} of {len(ran)} steps; the threshold proves nothing"
    tolerance = max(flux_cases.FP32_TOL, flux_cases.RELATIVE_TOL * stock.abs().max().item())
    for degrees in cache_cases.QWEN_CONFIGS:
        for rank, result in enumerate(per_rank):
            key = flux_cases.tag(degrees)
            assert result["steps"][key] == ran, f"{key} rank {rank}: ran steps {result['steps'][key]}, stock {ran}"
            assert (result["parallel"][key] - stock).abs().max().item() <= tolerance, key
