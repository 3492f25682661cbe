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


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is the 'bench' extra: pip install '.[bench]'")
def test_diffusers_flux_forward_is_labelled_like_comfyuis():
    """A real diffusers Flux forward under profile_labels: its modulation linears, conditioning embedder, RoPE table
    and RoPE application (q and k of every attention call) open the labelled ranges, every op is inside the model's
    range, and nothing stays patched afterwards."""
    import torch
    from diffusers.models.transformers import transformer_flux

    from comfyui_xdit.bench import diffusers_flux
    from comfyui_xdit.bench.profile_categories import MODEL, MODULATION, ROPE, breakdown, label

    apply_rotary_emb = transformer_flux.apply_rotary_emb
    model = diffusers_flux.flux_transformer(128, 2, 1, seed=0)
    inputs = diffusers_flux.flux_inputs((8, 8), 4, seed=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with diffusers_flux.profile_labels(model):
            diffusers_flux.forward(model, inputs)
    names = [event.name for event in profiler.events()]
    # time_text_embed, 2 adaptive-norm linears per double block, 1 per single block, norm_out's
    assert names.count(label(MODULATION)) == 1 + 2 * 2 + 1 + 1
    assert names.count(label(ROPE)) == 1 + 2 * (2 + 1)  # the table, then q and k per attention call
    assert names.count(label(MODEL)) == 1
    totals = breakdown(profiler.events())
    assert all(totals[c] > 0 for c in ("attention", "linear", "rope", "modulation", "model_other")), totals
    assert totals["sampler"] == 0, totals  # no diffusers op falls outside the model's range
    assert transformer_flux.apply_rotary_emb is apply_rotary_emb
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
