"""XDiTRedundancyAnalysis: sample on the pool and measure how much each block's output changes from step to step;
XDiTCacheSchedule: a MODEL that reuses block residuals where that analysis says they change least."""
from __future__ import annotations

import comfy.model_management
import comfy.sample

from comfyui_xdit import redundancy
from comfyui_xdit.block_cache import refuse_analysis_degrees
from comfyui_xdit.families import adapter_for
from comfyui_xdit.job import pool_model_of
from comfyui_xdit.pool_client import degrees_of
from comfyui_xdit.pool_sampling import sample_on_pool

ANALYSIS_TYPE = "XDIT_REDUNDANCY"
CONNECTED = "(connected analysis)"


class XDiTRedundancyAnalysis:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",), "sigmas": ("SIGMAS",),
                             "latent_image": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE", ANALYSIS_TYPE, "LATENT")
    RETURN_NAMES = ("figure", "analysis", "output")
    OUTPUT_NODE = True  # the numbers are saved as a JSON file in the output folder even when nothing reads them
    FUNCTION = "analyse"
    CATEGORY = "sampling/custom_sampling/xdit"
    DESCRIPTION = ("Samples on the XDiT pool like SamplerCustomAdvanced and measures, per step and per transformer block, the relative "
                   "L1 change of the block's output and input from the step before, over the whole image. Saves the numbers as "
                   "output/xdit_analysis_<model>_<n>.json (for XDiTCacheSchedule) and draws them: a steps x blocks heatmap and a per-step curve.")

    def analyse(self, noise, guider, sampler, sigmas, latent_image):
        model = guider.model_patcher
        ref = pool_model_of(model, "XDiTRedundancyAnalysis")
        refuse_analysis_degrees(degrees_of(ref))
        latent = latent_image.copy()
        latent["samples"] = comfy.sample.fix_empty_latent_channels(model, latent["samples"], latent.get("downscale_ratio_spacial", None),
                                                                   latent.get("downscale_ratio_temporal", None))
        output = sample_on_pool("XDiTRedundancyAnalysis", guider, sampler, sigmas, noise.generate_noise(latent), latent["samples"],
                                latent.get("noise_mask"), noise.seed, analyse=True)
        analysis = {"format": redundancy.FORMAT, "version": 1, "model": redundancy.model_identity(ref.path),
                    "family": adapter_for(model.model).family_name(model.model), "degrees": degrees_of(ref),
                    "sigmas": [float(s) for s in sigmas.flatten()], "latent_shape": list(latent["samples"].shape),
                    **output["block_changes"]}
        analysis["file"] = redundancy.save_analysis(analysis)
        out = {k: v for k, v in latent.items() if k not in ("downscale_ratio_spacial", "downscale_ratio_temporal")}
        out["samples"] = output["samples"].to(comfy.model_management.intermediate_device())
        return (redundancy.render(analysis), analysis, out)


class XDiTCacheSchedule:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "analysis_file": ([CONNECTED] + redundancy.analysis_files(), {"tooltip": "A saved XDiTRedundancyAnalysis of this model (output or input folder), or the connected analysis"}),
                "skip_steps": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 1000.0, "step": 0.25, "tooltip": "How many steps' worth of block evaluations reuse their residual instead of running"}),
                "granularity": (["blocks", "steps"], {"tooltip": "blocks: pick single (step, block) evaluations; steps: whole steps (every block)"}),
                "max_estimated_error": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip": "Stop picking once the estimated error (summed relative residual drift) would pass this; 0 = no limit"}),
            },
            "optional": {"analysis": (ANALYSIS_TYPE, {"tooltip": "An analysis computed in this workflow (used when analysis_file is the connected one)"})},
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "schedule"
    CATEGORY = "sampling/custom_sampling/xdit"
    DESCRIPTION = ("Makes the MODEL reuse, at the steps and blocks where the redundancy analysis measured the least change, each "
                   "block's residual (output - input) from the step it last ran, on every XDiT pool rank alike.")

    def schedule(self, model, analysis_file, skip_steps, granularity, max_estimated_error, analysis=None):
        ref = pool_model_of(model, "XDiTCacheSchedule")
        if analysis_file == CONNECTED:
            if analysis is None:
                raise ValueError("XDiTCacheSchedule: analysis_file is the connected analysis, but no analysis is connected; connect XDiTRedundancyAnalysis or choose a file")
        else:
            analysis = redundancy.load_analysis(analysis_file)
        return (redundancy.scheduled_model(model, ref.path, analysis, skip_steps, granularity, max_estimated_error),)
