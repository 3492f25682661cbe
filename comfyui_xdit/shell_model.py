"""The MODEL that XDiTUNetLoader hands to ComfyUI: the real model class, with weights on the meta device.

Stock nodes between loader and sampler (ModelSamplingFlux, BasicGuider, CFGGuider, BasicScheduler) only touch the
config, model_sampling and latent format, so they work on it unchanged while the weights live in the worker pool.
The file is read for its header only (safetensors), so the ComfyUI process never holds the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils

from .errors import UnsupportedByXDiT
from .job_spec import PoolModelRef
from .quantized import as_loaded, layer_formats, wants_values, warn_if_inexact
from .safetensors_files import open_safetensors

POOL_ATTACHMENT = "comfyui_xdit.pool_model"
SHELL_GUARD_KEY = "comfyui_xdit.shell_guard"

# The same choices, with the same meaning, as stock UNETLoader's weight_dtype.
WEIGHT_DTYPES: dict[str, dict] = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def model_options_for(weight_dtype: str) -> dict:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    return dict(WEIGHT_DTYPES[weight_dtype])


def meta_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Keys, shapes and dtypes of a safetensors file as meta tensors (no weight is read; quantized layers' configs
    and scalar scales are, see quantized.wants_values)."""
    with open_safetensors(path, "diffusion model") as f:
        metadata = f.metadata()
        state = {}
        for key in f.keys():
            piece = f.get_slice(key)
            if wants_values(key, piece.get_shape()):
                state[key] = f.get_tensor(key)
                continue
            dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32)
            state[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    return state, metadata


def unet_prefix(state: dict[str, torch.Tensor]) -> str:
    """The prefix of the diffusion model's keys ('' for a bare diffusion-model file), as ComfyUI strips it."""
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
    return prefix if any(k.startswith(prefix) for k in state) else ""


def detect(path: str | Path, weight_dtype: str, load_device: torch.device = torch.device("cpu")):
    """ComfyUI's model config for the file, as comfy.sd.load_diffusion_model would detect it, with the (meta)
    state dict under the names the model uses, the parameter count and each quantized layer's format."""
    state, metadata = as_loaded(*meta_state_dict(path))
    formats = layer_formats(state, Path(path).name)  # a quant format this ComfyUI does not know is refused here, before any work
    config = comfy.model_detection.model_config_from_unet(state, "", metadata=metadata)
    if config is None:
        raise UnsupportedByXDiT(f"{Path(path).name}: ComfyUI does not recognise this file as a diffusion model; check it loads with UNETLoader")
    options = model_options_for(weight_dtype)
    dtype = options.get("dtype")
    parameters = comfy.utils.calculate_parameters(state)
    quantized = config.quant_config is not None  # stock then ignores the file's dtypes and casts in the compute dtype
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(model_params=parameters, supported_dtypes=list(config.supported_inference_dtypes),
                                                  weight_dtype=None if quantized else comfy.utils.weight_dtype(state))
    manual_cast = comfy.model_management.unet_manual_cast(None if quantized else dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast, device=load_device)
    if options.get("fp8_optimizations"):
        config.optimizations["fp8"] = True
    return config, state, parameters, formats


def _refuse_local_sampling(executor, *args, **kwargs):
    raise UnsupportedByXDiT("this MODEL comes from XDiTUNetLoader and its weights live in the XDiT pool: sample it with XDiTSamplerCustomAdvanced, XDiTKSampler or XDiTKSamplerAdvanced, or load it with UNETLoader for stock samplers")


def build_shell(path: str | Path, weight_dtype: str, ref: PoolModelRef | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher of the file's model class with meta weights, carrying `ref` for the sampler node (the loader
    attaches it later, once the model's family has decided the degrees)."""
    config, state, parameters, formats = detect(path, weight_dtype)
    warn_if_inexact(formats, Path(path).name)
    model = config.get_model(state, "", device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"), size=parameters * model.get_dtype().itemsize)
    if ref is not None:
        patcher.set_attachments(POOL_ATTACHMENT, ref)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SHELL_GUARD_KEY, _refuse_local_sampling)
    return patcher
