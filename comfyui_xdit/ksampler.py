"""What stock KSampler / KSamplerAdvanced sample, as SamplerCustomAdvanced-style inputs for the pool.

ComfyUI 0.30.0's path is nodes.common_ksampler -> comfy.sample.sample -> comfy.samplers.KSampler.sample ->
comfy.samplers.sample (a CFGGuider). `ksampler_inputs` takes the same steps up to the point where the guider
samples, using ComfyUI's own pieces (fix_empty_latent_channels, prepare_noise, KSampler's sigma schedule,
sampler_object, CFGGuider), and hands back what the guider would sample with, or the latent stock returns
without sampling. `advanced_inputs` is KSamplerAdvanced's reading of its switches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import comfy.sample
import comfy.samplers


@dataclass
class GuiderInputs:
    """guider.sample(noise, latent, sampler, sigmas, denoise_mask=noise_mask, seed=seed), not yet run."""

    guider: Any
    sampler: Any
    sigmas: torch.Tensor
    noise: torch.Tensor
    latent: torch.Tensor
    noise_mask: torch.Tensor | None
    seed: int


def ksampler_inputs(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                    latent: dict, denoise: float = 1.0, disable_noise: bool = False, start_step: int | None = None,
                    last_step: int | None = None, force_full_denoise: bool = False) -> GuiderInputs | torch.Tensor:
    """common_ksampler's arguments -> the guider's inputs, or the latent tensor stock returns unsampled."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"], latent.get("downscale_ratio_spacial", None), latent.get("downscale_ratio_temporal", None))
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    else:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    schedule = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name, scheduler=scheduler,
                                       denoise=denoise, model_options=model.model_options)
    # KSampler.sample's cut of the schedule (its own code samples right after it, so it cannot be called here).
    sigmas = schedule.sigmas
    if last_step is not None and last_step < (len(sigmas) - 1):
        sigmas = sigmas[:last_step + 1]
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= (len(sigmas) - 1):
            return latent_image
        sigmas = sigmas[start_step:]
    if sigmas.shape[-1] == 0:  # denoise 0: CFGGuider.sample returns the latent as it is
        return latent_image
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return GuiderInputs(guider, comfy.samplers.sampler_object(schedule.sampler), sigmas, noise, latent_image,
                        latent.get("noise_mask"), seed)


def advanced_inputs(model, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive, negative, latent: dict, start_at_step: int, end_at_step: int, return_with_leftover_noise: str,
                    denoise: float = 1.0) -> GuiderInputs | torch.Tensor:
    """KSamplerAdvanced's inputs -> ksampler_inputs: leftover noise off means the last step kept denoises fully."""
    return ksampler_inputs(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=denoise,
                           disable_noise=add_noise == "disable", start_step=start_at_step, last_step=end_at_step,
                           force_full_denoise=return_with_leftover_noise != "enable")
