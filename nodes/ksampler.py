"""XDiTKSampler / XDiTKSamplerAdvanced: stock KSampler / KSamplerAdvanced's inputs and output, sampled on the pool."""
from __future__ import annotations

import copy

import torch

import comfy.model_management
import nodes as comfy_nodes  # ComfyUI's nodes.py: the stock classes whose inputs these nodes take

from comfyui_xdit.ksampler import GuiderInputs, advanced_inputs, ksampler_inputs
from comfyui_xdit.pool_sampling import sample_on_pool


def _finish(node: str, latent: dict, inputs: GuiderInputs | torch.Tensor) -> tuple[dict]:
    """Sample `inputs` on the pool (or keep the latent stock returns unsampled); the LATENT as common_ksampler makes it."""
    if isinstance(inputs, GuiderInputs):
        samples = sample_on_pool(node, inputs.guider, inputs.sampler, inputs.sigmas, inputs.noise, inputs.latent,
                                 inputs.noise_mask, inputs.seed)["samples"]
    else:
        samples = inputs
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out.pop("downscale_ratio_temporal", None)
    out["samples"] = samples.to(device=comfy.model_management.intermediate_device(), dtype=comfy.model_management.intermediate_dtype())
    return (out,)


class XDiTKSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return copy.deepcopy(comfy_nodes.KSampler.INPUT_TYPES())  # the stock inputs themselves: they cannot drift

    RETURN_TYPES = comfy_nodes.KSampler.RETURN_TYPES
    OUTPUT_TOOLTIPS = comfy_nodes.KSampler.OUTPUT_TOOLTIPS
    FUNCTION = "sample"
    CATEGORY = "sampling/xdit"
    DESCRIPTION = "KSampler with the denoising loop run on the XDiT worker pool (drop-in for KSampler; needs a MODEL from XDiTUNetLoader)."

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
        inputs = ksampler_inputs(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise)
        return _finish("XDiTKSampler", latent_image, inputs)


class XDiTKSamplerAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return copy.deepcopy(comfy_nodes.KSamplerAdvanced.INPUT_TYPES())

    RETURN_TYPES = comfy_nodes.KSamplerAdvanced.RETURN_TYPES
    FUNCTION = "sample"
    CATEGORY = "sampling/xdit"
    DESCRIPTION = "KSamplerAdvanced with the denoising loop run on the XDiT worker pool (drop-in for KSamplerAdvanced; needs a MODEL from XDiTUNetLoader)."

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               start_at_step, end_at_step, return_with_leftover_noise, denoise=1.0):
        inputs = advanced_inputs(model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                                 start_at_step, end_at_step, return_with_leftover_noise, denoise)
        return _finish("XDiTKSamplerAdvanced", latent_image, inputs)
