"""The exactness suite of test_flux_parallel.py on CUDA ranks over NCCL: every family, every config that fits the
visible devices, against stock ComfyUI on the same GPU type.

It needs at least 2 CUDA devices and is skipped otherwise. It has NOT run on this project's machines (CPU-only, or
one GPU at most); the CPU/gloo suite is what has been run here.
"""
from __future__ import annotations

import pytest
import torch

import flux_cases
from parallel_core.local_launch import run_on_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices for NCCL ranks"),
]
RUNS = [(family, world) for family, by_world in flux_cases.CONFIGS.items() for world in by_world]


@pytest.mark.parametrize(("family", "world_size"), RUNS)
def test_parallel_model_matches_stock_sampling_on_cuda(family, world_size, tiny_flux_paths, tiny_model_path):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"{world_size} ranks need {world_size} CUDA devices; {torch.cuda.device_count()} visible")
    path = flux_cases.model_spec(family, tiny_flux_paths, tiny_model_path)
    per_rank = run_on_ranks(flux_cases.family_rank, world_size, path, flux_cases.CONFIGS[family][world_size],
                            flux_cases.case_dicts(family), "cuda", flux_cases.WEIGHT_DTYPE.get(family, "default"), timeout_s=900, backend="nccl")
    failures = flux_cases.differences_from_stock(per_rank, family, world_size)
    assert not failures, "\n".join(failures)
