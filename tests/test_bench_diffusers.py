"""The Flux bench's diffusers baseline (flux_step --diffusers) runs diffusers' context parallelism on gloo CPU
ranks and gets its own 1-rank result: the baseline it reports is a working, exact parallel run. Without diffusers
the bench says how to install it."""
from __future__ import annotations

import importlib.util

import pytest

import bench_cases
from parallel_core.local_launch import run_on_ranks


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is the 'bench' extra: pip install '.[bench]'")
def test_diffusers_ulysses_and_ring_match_its_one_rank_forward():
    spec = {"hidden": 256, "latent": (16, 16), "text_tokens": 8}
    for errors in run_on_ranks(bench_cases.diffusers_parallel_vs_single, 2, spec, timeout_s=300):
        assert set(errors) == {"diffusers-ulysses", "diffusers-ring"}
        assert max(errors.values()) <= 1e-5, errors


@pytest.mark.fast
def test_bench_names_the_install_line_when_diffusers_is_missing(monkeypatch):
    from comfyui_xdit.bench import diffusers_flux

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(SystemExit, match=r"--diffusers needs the diffusers package \(0\.42\.1\): pip install 'diffusers==0\.42\.1'"):
        diffusers_flux.require_diffusers()
