"""XDiTKSampler / XDiTKSamplerAdvanced in one process (no pool): their job reproduces stock KSampler bit for bit.

The job is built from the shell MODEL (as XDiTUNetLoader returns it) by the code the nodes use
(comfyui_xdit.ksampler -> job.build_job) and run by the worker's run_job on a stock-loaded model; the reference is
ComfyUI's own KSampler / KSamplerAdvanced node on that stock model with the same inputs.
"""
from __future__ import annotations

import pytest
import torch

import flux_cases
from comfyui_xdit.errors import UnsupportedByXDiT

STEPS = 2


@pytest.fixture(scope="module")
def models(comfy_root, tiny_flux_paths):
    import comfy.sd

    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.shell_model import build_shell

    path = str(tiny_flux_paths["dev"])
    ref = PoolModelRef(path, "default", (("ulysses_degree", 1),), 1, "", 2)
    return {"shell": build_shell(path, "default", ref), "stock": comfy.sd.load_diffusion_model(path)}


def _flux(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    return ModelSamplingFlux().patch(model, 1.15, 0.5, 64, 64)[0]


def _latent(kind: str) -> dict:
    if kind == "empty":
        return {"samples": torch.zeros(1, 16, 8, 8)}
    return {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))}  # an img2img latent


def _carried(models, prepare, **inputs) -> torch.Tensor:
    """The node's path: inputs from the shell model -> job -> the worker's run_job on the stock model."""
    from comfyui_xdit.job import build_job, run_job
    from comfyui_xdit.ksampler import GuiderInputs

    prepared = prepare(_flux(models["shell"]), positive=flux_cases._conditioning(100), negative=flux_cases._conditioning(200), **inputs)
    if not isinstance(prepared, GuiderInputs):
        return prepared
    job = build_job(prepared.guider, prepared.sampler, prepared.sigmas, prepared.noise, prepared.latent, prepared.noise_mask, prepared.seed)
    return run_job(models["stock"], job, lambda *args: None)


def _ksampler(models, latent="empty", **overrides):
    import nodes

    from comfyui_xdit.ksampler import ksampler_inputs

    inputs = {"seed": 7, "steps": STEPS, "cfg": 2.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0, **overrides}
    stock = nodes.KSampler().sample(_flux(models["stock"]), positive=flux_cases._conditioning(100), negative=flux_cases._conditioning(200),
                                    latent_image=_latent(latent), **inputs)[0]["samples"]
    return _carried(models, ksampler_inputs, latent=_latent(latent), **inputs), stock


def _advanced(models, latent="empty", **overrides):
    import nodes

    from comfyui_xdit.ksampler import advanced_inputs

    inputs = {"add_noise": "enable", "noise_seed": 9, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable", **overrides}
    stock = nodes.KSamplerAdvanced().sample(_flux(models["stock"]), positive=flux_cases._conditioning(100), negative=flux_cases._conditioning(200),
                                            latent_image=_latent(latent), **inputs)[0]["samples"]
    return _carried(models, advanced_inputs, latent=_latent(latent), **inputs), stock


def _stock_choices(attribute: str) -> list[str]:
    """The stock KSampler's sampler or scheduler names (read at collection, so new ones are tested as they come)."""
    from comfyui_xdit.comfy_runtime import import_comfy

    import_comfy()
    import comfy.samplers

    return list(getattr(comfy.samplers.KSampler, attribute))


# Every sampler the stock node offers, ancestral and SDE ones included (their noise comes from the same seed).
@pytest.mark.parametrize("sampler_name", _stock_choices("SAMPLERS"))
def test_every_sampler_matches_stock_ksampler(models, sampler_name):
    carried, stock = _ksampler(models, sampler_name=sampler_name)
    assert stock.abs().max() > 0.1
    assert torch.equal(carried, stock)


@pytest.mark.parametrize("scheduler", _stock_choices("SCHEDULERS"))
def test_every_scheduler_matches_stock_ksampler(models, scheduler):
    carried, stock = _ksampler(models, scheduler=scheduler, cfg=1.0)
    assert torch.equal(carried, stock)


@pytest.mark.parametrize("overrides", [
    {"cfg": 1.0},  # what Flux workflows use: the negative is skipped, as in stock
    {"denoise": 0.6, "latent": "image"},
    {"denoise": 0.0, "latent": "image"},  # no step at all: stock returns the latent
    {"seed": 123, "sampler_name": "dpmpp_2m_sde", "scheduler": "karras"},
], ids=["cfg1", "denoise0.6", "denoise0", "sde-karras-seed123"])
def test_ksampler_options_match_stock(models, overrides):
    carried, stock = _ksampler(models, **overrides)
    assert torch.equal(carried, stock)


@pytest.mark.parametrize("overrides", [
    {"start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"},  # the first half of a split
    {"start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "disable"},  # stopped early, fully denoised
    {"add_noise": "disable", "start_at_step": 2, "end_at_step": 10000, "latent": "image"},  # the second half
    {"add_noise": "disable", "start_at_step": 1, "end_at_step": 3, "cfg": 3.0, "sampler_name": "euler_ancestral", "latent": "image"},
    {"start_at_step": 4, "end_at_step": 10000, "latent": "image"},  # past the last step: stock returns the latent
], ids=["end2-leftover", "end2-full", "no-noise-start2", "no-noise-1to3-cfg3-ancestral", "start-past-end"])
def test_ksampler_advanced_matches_stock(models, overrides):
    carried, stock = _advanced(models, **overrides)
    assert torch.equal(carried, stock)


def test_a_two_stage_split_matches_one_stock_run(models):
    """KSamplerAdvanced's common use: steps 0-2 with leftover noise, then 2-end without adding noise."""
    from comfyui_xdit.job import build_job, run_job
    from comfyui_xdit.ksampler import advanced_inputs

    def stage(model, latent, add_noise, start, end, leftover):
        return advanced_inputs(_flux(model), add_noise, 9, 4, 1.0, "euler", "simple", flux_cases._conditioning(100),
                               flux_cases._conditioning(200), latent, start, end, leftover)

    first = stage(models["shell"], _latent("empty"), "enable", 0, 2, "enable")
    half = run_job(models["stock"], build_job(first.guider, first.sampler, first.sigmas, first.noise, first.latent, None, first.seed), lambda *a: None)
    second = stage(models["shell"], {"samples": half}, "disable", 2, 10000, "disable")
    carried = run_job(models["stock"], build_job(second.guider, second.sampler, second.sigmas, second.noise, second.latent, None, second.seed), lambda *a: None)
    _, stock_half = _advanced(models, end_at_step=2, return_with_leftover_noise="enable")
    assert torch.equal(half, stock_half)
    import nodes

    stock = nodes.KSamplerAdvanced().sample(_flux(models["stock"]), "disable", 9, 4, 1.0, "euler", "simple", flux_cases._conditioning(100),
                                            flux_cases._conditioning(200), {"samples": stock_half}, 2, 10000, "disable")[0]["samples"]
    assert torch.equal(carried, stock)


def test_a_model_from_the_stock_loader_is_refused_naming_the_node(models):
    from comfyui_xdit.ksampler import ksampler_inputs
    from comfyui_xdit.pool_sampling import sample_on_pool

    prepared = ksampler_inputs(_flux(models["stock"]), 1, STEPS, 1.0, "euler", "simple", flux_cases._conditioning(100),
                               flux_cases._conditioning(200), _latent("empty"))
    with pytest.raises(UnsupportedByXDiT, match=r"XDiTKSampler needs a MODEL from XDiTUNetLoader; replace UNETLoader with XDiTUNetLoader \(or use the stock KSampler\)"):
        sample_on_pool("XDiTKSampler", prepared.guider, prepared.sampler, prepared.sigmas, prepared.noise, prepared.latent, None, prepared.seed)


def test_stock_ksampler_on_the_shell_model_points_at_the_xdit_ksamplers(models):
    import nodes

    with pytest.raises(UnsupportedByXDiT, match="XDiTKSampler or XDiTKSamplerAdvanced"):
        nodes.KSampler().sample(_flux(models["shell"]), 1, STEPS, 1.0, "euler", "simple", flux_cases._conditioning(100),
                                flux_cases._conditioning(200), _latent("empty"))
