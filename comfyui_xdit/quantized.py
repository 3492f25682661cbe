"""Quantized checkpoints as ComfyUI reads them: the same conversion, and a refusal of formats it does not know.

ComfyUI 0.30.0 turns a file's older scaled-fp8 layout (a `scaled_fp8` marker, a `.scale_weight` per weight) or its
`_quantization_metadata` header entry into per-layer `comfy_quant` configs when it loads the file
(comfy.utils.convert_old_quants); a model config that sees them builds its layers with comfy.ops.mixed_precision_ops.
`as_loaded` applies that conversion in the order comfy.sd.load_diffusion_model does, so the shell model and a
PipeFusion stage are detected and built exactly as a stock load of the same file.
"""
from __future__ import annotations

import json
import logging
import torch

import comfy.model_detection
import comfy.utils

from .errors import UnsupportedByXDiT

CONFIG_SUFFIX = ".comfy_quant"
# ComfyUI's int8 layers quantize a layer's input to int8 only when it comes as one contiguous matrix (otherwise they
# dequantize the weight and multiply in the compute dtype): a result depends on the batch and memory layout of each
# layer's input, which sharing the work out over ranks changes (measured on the tiny Flux: up to 5.6e-2 off stock for
# int8_tensorwise, 0.94 for convrot_w4a4, on latents of ~13).
ACTIVATION_LAYOUT_DEPENDENT = ("int8_tensorwise", "convrot_w4a4")


def as_loaded(state: dict[str, torch.Tensor], metadata: dict | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The diffusion model's state dict under its own names (prefix stripped), quant layouts converted to ComfyUI's
    per-layer configs, as comfy.sd.load_diffusion_model_state_dict leaves it. `state` is consumed."""
    state, metadata = comfy.utils.convert_old_quants(state, "", metadata=metadata)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
    stripped = comfy.utils.state_dict_prefix_replace(state, {prefix: ""}, filter_keys=True)
    if stripped:
        state, metadata = comfy.utils.convert_old_quants(stripped, "", metadata=metadata)
    return state, metadata


def layer_formats(state: dict[str, torch.Tensor], name: str) -> dict[str, str]:
    """{layer: quant format} of a converted state dict (as_loaded); refuses a layer whose config this ComfyUI cannot
    use, naming the file, the layer and the format, before anything is loaded."""
    from comfy.quant_ops import QUANT_ALGOS

    formats = {}
    for key, value in state.items():
        if not key.endswith(CONFIG_SUFFIX):
            continue
        layer = key[: -len(CONFIG_SUFFIX)]
        try:
            fmt = json.loads(bytes(value.tolist())).get("format")
        except (ValueError, AttributeError, TypeError):
            raise UnsupportedByXDiT(f"{name}: the quantization config of layer {layer} is not valid JSON; the file is damaged or was "
                                    "written by another tool: export it again") from None
        if fmt not in QUANT_ALGOS:
            raise UnsupportedByXDiT(f"{name}: layer {layer} is quantized as {fmt!r}, a format this ComfyUI does not know (it "
                                    f"knows {', '.join(QUANT_ALGOS)}); use a checkpoint in one of those formats or a ComfyUI that reads {fmt!r}")
        formats[layer] = fmt
    return formats


def warn_if_inexact(formats: dict[str, str], name: str) -> None:
    """Log that the pool's results will not equal stock's to rounding for the formats where no split can."""
    inexact = sorted(set(formats.values()) & set(ACTIVATION_LAYOUT_DEPENDENT))
    if inexact:
        logging.warning("XDiT: %s has layers quantized as %s: ComfyUI computes those layers differently for different batch "
                        "sizes and memory layouts, so parallel results are close to a single process's but not equal; use "
                        "an fp8, mxfp8 or nvfp4 checkpoint for exact results", name, " and ".join(inexact))


def wants_values(key: str, shape: list[int]) -> bool:
    """Which tensors a header-only read must still read: the layers' quant configs and scalar scales
    (convert_old_quants reads `.scale_input` values)."""
    return key.endswith(CONFIG_SUFFIX) or len(shape) == 0 or shape == [1]
