"""Tiny quantized checkpoints: a tiny model's file rewritten in a quantized layout ComfyUI 0.30.0 loads itself.

Formats (QUANT_FORMATS):
- "scaled_fp8": the older layout of ComfyUI's fp8 releases: fp8 e4m3 weights, a float32 `.scale_weight` per weight
  and a `scaled_fp8` marker tensor; ComfyUI converts it to float8_e4m3fn layers when it loads the file.
- each format of comfy.quant_ops.QUANT_ALGOS: per-layer `comfy_quant` config tensors beside the weight data and
  scales ComfyUI's own layout classes produce (what ComfyUI writes when it saves a quantized model);
- METADATA_PREFIX + one of those: the same tensors with the layer list in the file's `_quantization_metadata`
  header entry instead of `comfy_quant` tensors (the other layout ComfyUI reads).
The transformer blocks' linear weights are quantized (most of a DiT's weights, as in quantized releases); embedders,
norms, biases and the output layer stay as they were. Files are safetensors only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_xdit.comfy_runtime import import_comfy

# The mixed-precision formats ComfyUI 0.30.0 names in comfy.quant_ops.QUANT_ALGOS (mxfp8 when comfy_kitchen has it);
# test_quantized.py checks this list against the running ComfyUI.
MIXED_FORMATS: tuple[str, ...] = ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4")
METADATA_PREFIX = "metadata:"
QUANT_FORMATS: tuple[str, ...] = ("scaled_fp8", *MIXED_FORMATS, *(METADATA_PREFIX + f for f in MIXED_FORMATS))
# A block's linear weight: "<container>.<index>.<...>.weight" with a 2-D tensor (Flux double_blocks/single_blocks,
# SD3 joint_blocks, Wan blocks, ...).
_BLOCK_LINEAR = re.compile(r"(^|\.)[a-z_]*blocks\.\d+\..+\.weight$")
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantized_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Layer names (keys without '.weight') this module quantizes: the blocks' 2-D linear weights."""
    return [key[: -len(".weight")] for key, value in state.items() if _BLOCK_LINEAR.search(key) and value.ndim == 2]


def _scaled_fp8(state: dict[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for layer in layers:
        weight = state[f"{layer}.weight"].float()
        scale = weight.abs().amax() / _FP8_MAX
        out[f"{layer}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        out[f"{layer}.scale_weight"] = scale.reshape(())
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # 0 elements: fp8 matmul where the device has it
    return out


def _mixed(state: dict[str, torch.Tensor], layers: list[str], fmt: str, config_tensors: bool) -> dict[str, torch.Tensor]:
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor

    if fmt not in QUANT_ALGOS:
        raise ValueError(f"this ComfyUI does not know quant format {fmt!r}; it knows {sorted(QUANT_ALGOS)}")
    out = dict(state)
    for layer in layers:
        quantized = QuantizedTensor.from_float(state[f"{layer}.weight"].float(), QUANT_ALGOS[fmt]["comfy_tensor_layout"])
        out.update({key: tensor.contiguous() for key, tensor in quantized.state_dict(f"{layer}.weight").items()})
        if config_tensors:
            out[f"{layer}.comfy_quant"] = config_tensor({"format": fmt})
    return out


def config_tensor(config: dict) -> torch.Tensor:
    """A layer's `comfy_quant` entry: its JSON config as uint8 bytes, as ComfyUI stores it."""
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def quantize_file(source: str | Path, out: str | Path, fmt: str) -> Path:
    """Write `source` (a tiny model's safetensors file) to `out` with its blocks' linear weights quantized as `fmt`."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quant format {fmt!r}; choose from {', '.join(QUANT_FORMATS)}")
    import_comfy()
    with safe_open(str(source), framework="pt", device="cpu") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        metadata = dict(f.metadata() or {})
    layers = quantized_layers(state)
    if fmt == "scaled_fp8":
        tensors = _scaled_fp8(state, layers)
    else:
        in_header = fmt.startswith(METADATA_PREFIX)
        base_format = fmt.removeprefix(METADATA_PREFIX)
        tensors = _mixed(state, layers, base_format, config_tensors=not in_header)
        if in_header:
            metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": {layer: {"format": base_format} for layer in layers}})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={**metadata, "comfyui_xdit.quant_format": fmt})
    return out


def block_weights(diffusion_model: torch.nn.Module) -> dict[str, list[str]]:
    """How a loaded model holds its blocks' linear weights: the quant formats of its quantized layers (ComfyUI's
    mixed-precision layers carry one) and the dtypes the weights are stored in."""
    formats, dtypes = set(), set()
    for name, module in diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2 or not _BLOCK_LINEAR.search(f"{name}.weight"):
            continue
        if getattr(module, "quant_format", None):
            formats.add(module.quant_format)
        dtypes.add(str(getattr(weight, "storage_dtype", weight.dtype)))
    return {"formats": sorted(formats), "dtypes": sorted(dtypes)}
