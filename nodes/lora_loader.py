"""XDiTLoraLoader: LoraLoaderModelOnly's inputs and output, with the LoRA merged on the pool's workers (any family
whose LoRA keys ComfyUI maps). XDiTFluxLoraLoader is its old name, kept so saved workflows keep loading."""
from __future__ import annotations

import os

import folder_paths

from comfyui_xdit.errors import UnsupportedByXDiT
from comfyui_xdit.lora import STRENGTH_RANGE, checked_lora, strength_problem, with_lora
from comfyui_xdit.shell_model import POOL_ATTACHMENT


class XDiTLoraLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A MODEL from XDiTUNetLoader (or another XDiTLoraLoader)."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The name of the LoRA."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": STRENGTH_RANGE[0], "max": STRENGTH_RANGE[1], "step": 0.01,
                                             "tooltip": "How strongly to modify the diffusion model. This value can be negative."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"
    CATEGORY = "advanced/loaders/xdit"
    DESCRIPTION = ("Applies a LoRA to a MODEL from XDiTUNetLoader (drop-in for LoraLoaderModelOnly; chain several). "
                   "The workers merge it into their resident model; switching LoRAs loads no base weights.")

    @classmethod
    def VALIDATE_INPUTS(cls, strength_model=1.0):
        # Refuses NaN/inf when the prompt is queued (ComfyUI's own min/max check lets NaN through); naming the input
        # here replaces that check, so strength_problem checks the range too. A linked strength is checked when run.
        return strength_problem(strength_model) or True

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        # A LoRA rewritten under the same name (a trainer's new checkpoint) is checked and merged again.
        path = folder_paths.get_full_path("loras", lora_name)
        return os.stat(path).st_mtime_ns if path else ""

    def load_lora_model_only(self, model, lora_name, strength_model):
        if (problem := strength_problem(strength_model)) is not None:
            raise ValueError(f"XDiTFluxLoraLoader: {problem}")
        if strength_model == 0:  # as stock: strength 0 is the model itself, the file is not even opened
            return (model,)
        if model.attachments.get(POOL_ATTACHMENT) is None:
            raise UnsupportedByXDiT(f"{type(self).__name__} needs a MODEL from XDiTUNetLoader; for a model from UNETLoader use LoraLoaderModelOnly")
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return (with_lora(model, checked_lora(model, path, strength_model)),)


class XDiTFluxLoraLoader(XDiTLoraLoader):
    """The node's name before it served every family: saved workflows use it; new ones get XDiTLoraLoader."""

    DEPRECATED = True  # hidden from the node search, still loads and runs
