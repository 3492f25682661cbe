"""Seeded tiny (and bench-sized) diffusion-transformer checkpoints that ComfyUI detects as the real family.

Only the weights are synthetic: the files load through ComfyUI's own loader and model detection and run ComfyUI's
own model code, so tests and benchmarks exercise the genuine forward pass. Families are registered in FAMILIES.
Files are safetensors only (nothing is ever unpickled).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from comfyui_xdit.comfy_runtime import import_comfy
from comfyui_xdit.tiny_vae import TAEF1_SIZES, TAEF1_VARIANTS, write_tiny_taef1

# What ComfyUI 0.30.0's model detection reads back from a Flux state dict (comfy/model_detection.py): these values
# are hard-coded there, so a file written with any other value would load as a different model.
FLUX_DETECTION_FIXED: dict[str, Any] = {
    "out_channels": 16,
    "mlp_ratio": 4.0,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "txt_ids_dims": [],
}
# ...and these it derives from tensor shapes or key presence, so any value round-trips (num_heads only as
# hidden_size // sum(axes_dim), i.e. a head dim of 128).
FLUX_DETECTION_FREE = frozenset(
    {"in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads", "depth", "depth_single_blocks",
     "guidance_embed"}
)
# in_channels counts latent channels (the img_in layer sees in_channels * patch_size**2 features).
FLUX_BASE: dict[str, Any] = {**FLUX_DETECTION_FIXED, "in_channels": 16, "vec_in_dim": 32, "context_in_dim": 64}
FLUX_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 256, "depth": 1, "depth_single_blocks": 1},
    # A Flux-like mix of double and single blocks at a width where a 128x128 latent (4096 image tokens) takes a
    # measurable step on CPU; attention is not unrealistically dominant at this width.
    "bench": {"hidden_size": 768, "depth": 2, "depth_single_blocks": 4},
    # Enough blocks for PipeFusion stages, double and single like Flux, in a mix (a double
    # block has 2.4x a single block's parameters) that splits into 2 or 4 stages within 5% of an equal share.
    "pipeline": {"hidden_size": 256, "depth": 4, "depth_single_blocks": 10},
}
FLUX_VARIANTS: dict[str, dict[str, Any]] = {
    "dev": {"guidance_embed": True},
    "schnell": {"guidance_embed": False},
}

# Normalisation scales are drawn around 1 rather than set to exactly 1 so that a wrong mapping of them (e.g. in a
# sharded model) changes the output; biases are small but non-zero for the same reason.
_NORM_SCALE_STD = 0.1
_BIAS_STD = 0.02
# The output projection is scaled down so predicted velocities are O(1), like a trained flow model's; at plain
# fan-in scale they reach ~10 and sampled latents ~25, where fp32 rounding alone is ~2e-6 per value.
_OUTPUT_LAYER = "final_layer.linear"
_OUTPUT_SCALE = 0.15


def flux_config(variant: str = "dev", size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``comfy.ldm.flux.model.Flux``; num_heads follows hidden_size unless overridden."""
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"unknown flux variant {variant!r}; choose from {sorted(FLUX_VARIANTS)}")
    if size not in FLUX_SIZES:
        raise ValueError(f"unknown flux size {size!r}; choose from {sorted(FLUX_SIZES)}")
    config = copy.deepcopy({**FLUX_BASE, **FLUX_SIZES[size], **FLUX_VARIANTS[variant], **overrides})
    config.setdefault("num_heads", config["hidden_size"] // sum(config["axes_dim"]))
    return config


def check_flux_detectable(config: dict[str, Any]) -> None:
    """Raise ValueError unless ComfyUI would detect a file of this config as exactly this config."""
    problems = [f"{key}={config[key]!r} (ComfyUI assumes {value!r})"
                for key, value in FLUX_DETECTION_FIXED.items() if config[key] != value]
    problems += [f"{key} (ComfyUI cannot read it back)"
                 for key in sorted(set(config) - FLUX_DETECTION_FREE - set(FLUX_DETECTION_FIXED))]
    head_dim = sum(FLUX_DETECTION_FIXED["axes_dim"])
    if config["hidden_size"] % head_dim or config["num_heads"] != config["hidden_size"] // head_dim:
        problems.append(f"hidden_size={config['hidden_size']}, num_heads={config['num_heads']} "
                        f"(ComfyUI needs num_heads = hidden_size / {head_dim})")
    if problems:
        raise ValueError("this Flux config would not load back from a file as itself: " + "; ".join(problems))


def build_flux(config: dict[str, Any], seed: int) -> torch.nn.Module:
    """ComfyUI's Flux module (fp32, CPU) with seeded weights; any config, detectable or not."""
    import_comfy()
    import comfy.ldm.flux.model
    import comfy.ops

    model = comfy.ldm.flux.model.Flux(
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init, **copy.deepcopy(config)
    )
    init_weights_(model, seed)
    smooth_in_time_(model)
    return model


# Flux embeds sigma as cos/sin at 128 frequencies up to 1000 rad per unit sigma. A trained model's timestep MLP
# varies smoothly over the schedule; with random weights it would weigh every frequency alike, and the highest ones
# turn over completely between adjacent steps, so a random model's activations would decorrelate from step to step
# in a way no trained model's do (which would make every stale-activation method look arbitrarily bad).
_TIME_FACTOR, _MAX_PERIOD = 1000.0, 10000.0
_SMOOTH_RAD_PER_SIGMA = 5.0


def smooth_in_time_(model: torch.nn.Module) -> None:
    """Damp the timestep MLP's input weights on frequencies above ~5 rad per unit sigma, keeping its scale."""
    layer = model.time_in.in_layer
    half = layer.in_features // 2
    rad_per_sigma = _TIME_FACTOR * torch.exp(-math.log(_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
    damping = 1.0 / (1.0 + (rad_per_sigma / _SMOOTH_RAD_PER_SIGMA) ** 2)
    damping = torch.cat([damping, damping])
    with torch.no_grad():
        layer.weight.mul_(damping * math.sqrt(len(damping) / float((damping**2).sum())))


def init_weights_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values (disable_weight_init leaves them as uninitialised memory).

    Linear weights are fan-in scaled so activations stay O(1) through the blocks; nothing is zero, so the output
    depends on every layer (adaLN-zero style zero gates would make whole blocks invisible to exactness tests).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, parameter in module.named_parameters(recurse=False):
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                if name == "bias":
                    value = _BIAS_STD * noise
                elif isinstance(module, torch.nn.Linear):
                    value = noise / math.sqrt(module.in_features)
                    if module_name == _OUTPUT_LAYER:
                        value = value * _OUTPUT_SCALE
                elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                    value = 1.0 + _NORM_SCALE_STD * noise
                else:
                    raise TypeError(f"no initialiser for parameter {name!r} of {type(module).__name__}")
                parameter.copy_(value)


def write_tiny_flux(path: str | Path, variant: str = "dev", size: str = "tiny", seed: int = 0,
                    **overrides: Any) -> Path:
    """Write a seeded Flux checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as Flux."""
    path = _checked_path(path)
    config = flux_config(variant, size, **overrides)
    check_flux_detectable(config)
    return _save(build_flux(config, seed), path,
                 {"family": "flux", "variant": variant, "size": size, "seed": seed, "config": config})


def stand_in_conditioning(seed: int, text_tokens: int = 7, guidance: float | None = 3.5,
                          context_dim: int = FLUX_BASE["context_in_dim"], pooled_dim: int = FLUX_BASE["vec_in_dim"]) -> list:
    """Seeded CONDITIONING shaped like Flux's text encoders' output for these models ([[context, {pooled, guidance}]]),
    for places with no text-encoder weights (tests, benches)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, text_tokens, context_dim, generator=generator)
    options: dict[str, Any] = {"pooled_output": torch.randn(1, pooled_dim, generator=generator)}
    if guidance is not None:
        options["guidance"] = guidance
    return [[context, options]]


@dataclass(frozen=True)
class TinyFamily:
    variants: tuple[str, ...]  # the first is the default
    sizes: tuple[str, ...]
    write: Callable[..., Path]  # (path, variant, size, seed, **overrides) -> Path


FAMILIES: dict[str, TinyFamily] = {
    "flux": TinyFamily(tuple(FLUX_VARIANTS), tuple(FLUX_SIZES), write_tiny_flux),
    # Two files (encoder, decoder) written into the given vae_approx folder; VAELoader offers them as "taef1".
    "taef1": TinyFamily(TAEF1_VARIANTS, TAEF1_SIZES, write_tiny_taef1),
}


def write_tiny_model(family: str, path: str | Path, variant: str | None = None, size: str = "tiny", seed: int = 0,
                     **overrides: Any) -> Path:
    """Write a tiny model of a registered family (see FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(FAMILIES)}")
    entry = FAMILIES[family]
    return entry.write(path, variant or entry.variants[0], size, seed, **overrides)


def _checked_path(path: str | Path) -> Path:
    # ComfyUI picks its loader by file extension; any other name would go through torch.load.
    path = Path(path)
    if path.suffix not in (".safetensors", ".sft"):
        raise ValueError(f"{path}: a tiny model file must end in .safetensors")
    return path


def _save(model: torch.nn.Module, path: Path, description: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    # A namespaced key: ComfyUI's detection reads a bare "config" metadata entry for some families.
    save_file(tensors, str(path), metadata={"comfyui_xdit.tiny_model": json.dumps(description, sort_keys=True)})
    return path
