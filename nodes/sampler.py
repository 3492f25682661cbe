"""XDiTSamplerCustomAdvanced: SamplerCustomAdvanced's inputs and outputs, the loop run by the worker pool."""
from __future__ import annotations

import comfy.model_management
import comfy.sample

from comfyui_xdit.pool_sampling import sample_on_pool
from comfyui_xdit.stale_steps import DEFAULT_WARMUP_STEPS


class XDiTSamplerCustomAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "noise": ("NOISE",),
                "guider": ("GUIDER",),
                "sampler": ("SAMPLER",),
                "sigmas": ("SIGMAS",),
                "latent_image": ("LATENT",),
            },
            "optional": {
                "num_pipeline_patch": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "PipeFusion: bands of image rows in flight through the stages; 0 = auto (2 per stage, or the most that cut the latent evenly)"}),
                "warmup_steps": ("INT", {"default": DEFAULT_WARMUP_STEPS, "min": 1, "max": 10000, "tooltip": "PipeFusion / patch parallel: exact synchronous steps before stale activations are reused; as many as the steps = exact"}),
            },
        }

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling/xdit"
    DESCRIPTION = "Runs the sampling loop on the XDiT worker pool (drop-in for SamplerCustomAdvanced; needs a MODEL from XDiTUNetLoader)."

    def sample(self, noise, guider, sampler, sigmas, latent_image, num_pipeline_patch=0, warmup_steps=DEFAULT_WARMUP_STEPS):
        latent = latent_image.copy()
        latent["samples"] = comfy.sample.fix_empty_latent_channels(
            guider.model_patcher, latent["samples"], latent.get("downscale_ratio_spacial", None), latent.get("downscale_ratio_temporal", None)
        )
        output = sample_on_pool("XDiTSamplerCustomAdvanced", guider, sampler, sigmas, noise.generate_noise(latent), latent["samples"],
                                latent.get("noise_mask"), noise.seed, num_pipeline_patch, warmup_steps)
        out = latent.copy()
        out.pop("downscale_ratio_spacial", None)
        out.pop("downscale_ratio_temporal", None)
        out["samples"] = output["samples"].to(comfy.model_management.intermediate_device())
        if output["x0"] is None:
            return (out, out)
        denoised = latent.copy()
        denoised.pop("downscale_ratio_spacial", None)
        denoised.pop("downscale_ratio_temporal", None)
        denoised["samples"] = guider.model_patcher.model.process_latent_out(output["x0"].cpu())
        return (out, denoised)
