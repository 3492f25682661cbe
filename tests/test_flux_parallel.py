"""Every family inside real ComfyUI on gloo ranks: the parallel model's latents equal stock sampling to fp32 rounding.

One suite, parametrised over families: Flux.1 (every exact method), Flux.2 (same adapter code, its own token grid)
and an SD1.5 U-Net, which has no sequence-parallel adapter and runs on the generic CFG and data parallel wrappers.
"""
from __future__ import annotations

import functools

import pytest
import torch

import flux_cases
from parallel_core.local_launch import run_on_ranks

FP32_TOL = 1e-5
# CFG multiplies the difference of two predictions by the guidance scale, and EPS models' latents reach ~15: there
# the bound is relative to the latent's size.
RELATIVE_TOL = 2e-6

CONFIGS: dict[str, dict[int, list[dict]]] = {
    "flux": {
        2: [
            {"ulysses_degree": 2},
            {"ring_degree": 2},
            {"cfg_degree": 2},
            {"data_degree": 2},
        ],
        4: [
            {"ulysses_degree": 4},
            {"ulysses_degree": 2, "ring_degree": 2},
            {"ring_degree": 4},
            {"ulysses_degree": 2, "cfg_degree": 2},
            {"ring_degree": 2, "cfg_degree": 2},
            {"cfg_degree": 4},
            {"ulysses_degree": 2, "data_degree": 2},
            {"cfg_degree": 2, "data_degree": 2},
        ],
    },
    "flux2": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}],
    },
    "sd15": {2: [{"cfg_degree": 2}, {"data_degree": 2}]},
}
RUNS = [(family, world) for family, by_world in CONFIGS.items() for world in by_world]
# (config tag/case, counter) that must have moved bytes on every rank: guards against a silently unpatched model.
TRAFFIC: dict[str, list[tuple[str, str]]] = {
    "flux": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/basic-euler", "ring_send/ring"),
             ("cfg2/cfg-euler", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "flux2": [("ulysses2/cfg-dpmpp2m-18x22", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
              ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg")],
    "sd15": [("cfg2/cfg-euler-10x12-batch2", "broadcast/cfg"), ("data2/cfg-euler-10x12-batch2", "all_gather/data")],
}


@pytest.fixture(scope="module")
def model_path(tiny_flux_paths, tiny_model_path):
    return lambda family: str(tiny_flux_paths["dev"] if family == "flux" else tiny_model_path(family))


@functools.lru_cache(maxsize=None)
def _run(family: str, world_size: int, path: str) -> list[dict]:
    return run_on_ranks(flux_cases.family_rank, world_size, path, CONFIGS[family][world_size], flux_cases.case_dicts(family),
                        timeout_s=900)


def _tag(degrees: dict) -> str:
    return "-".join(f"{k.split('_')[0]}{v}" for k, v in degrees.items())


@pytest.mark.parametrize(("family", "world_size"), RUNS)
def test_parallel_model_matches_stock_sampling(family, world_size, model_path):
    per_rank = _run(family, world_size, model_path(family))
    stock = per_rank[0]["stock"]
    failures = []
    for degrees in CONFIGS[family][world_size]:
        for name in flux_cases.FAMILY_CASES[family]:
            key = f"{_tag(degrees)}/{name}"
            reference = stock[name]
            assert reference.abs().max() > 0.1, "stock latent is trivial; the comparison would prove nothing"
            tolerance = max(FP32_TOL, RELATIVE_TOL * reference.abs().max().item())
            for rank, result in enumerate(per_rank):
                latent = result["parallel"][key]
                if latent.shape != reference.shape:
                    failures.append(f"{key} rank {rank}: shape {tuple(latent.shape)} != {tuple(reference.shape)}")
                    continue
                err = (latent - reference).abs().max().item()
                if not err <= tolerance:
                    failures.append(f"{key} rank {rank}: max abs error {err:.3e} vs stock (tolerance {tolerance:.1e})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("family", "world_size"), RUNS)
def test_unpatched_model_is_stock_again_after_parallel_runs(family, world_size, model_path):
    rank0 = _run(family, world_size, model_path(family))[0]
    for name, latent in rank0["stock"].items():
        assert torch.equal(rank0["stock_again"][name], latent), f"{name}: the original ModelPatcher changed behaviour"


@pytest.mark.parametrize("family", list(TRAFFIC))
def test_parallel_runs_actually_communicate(family, model_path):
    """Each method moved data over its own dimension on every rank."""
    per_rank = _run(family, 2, model_path(family))
    for key, counter in TRAFFIC[family]:
        sent = [r["bytes"][key].get(counter, 0) for r in per_rank]
        assert all(b > 0 for b in sent), f"{key}: {counter} bytes per rank {sent}"
