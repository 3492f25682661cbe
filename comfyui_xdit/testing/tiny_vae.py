"""Seeded TAEF1 weights (TAESD for Flux's 16-channel latents) that ComfyUI's stock VAELoader loads as "taef1".

TAESD's architecture is fixed (64 channels wide, about 1.2 M parameters per half), so only the weights are synthetic:
the files go through ComfyUI's own loader and decoder, and decoding a latent gives a real (if abstract) picture.
VAELoader looks in models/vae_approx for ``taef1_encoder.*`` and ``taef1_decoder.*`` and adds Flux's scale/shift
itself; safetensors only (nothing is ever unpickled).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from comfyui_xdit.comfy_runtime import import_comfy

TAEF1_NAME = "taef1"  # the vae_name that VAELoader offers once both files exist
TAEF1_LATENT_CHANNELS = 16
TAEF1_VARIANTS = ("default",)
TAEF1_SIZES = ("tiny",)
_BIAS_STD = 0.02
# Decoded pixels are the decoder's output clamped to [0, 1]: its last layer is calibrated to this mean and spread so
# a picture shows structure instead of saturating to black and white.
_PIXEL_MEAN = 0.5
_PIXEL_STD = 0.2


def taef1_files(folder: str | Path) -> dict[str, Path]:
    """The encoder and decoder paths VAELoader expects inside a vae_approx folder."""
    folder = Path(folder)
    return {part: folder / f"{TAEF1_NAME}_{part}.safetensors" for part in ("encoder", "decoder")}


def build_taef1(seed: int) -> dict[str, torch.nn.Module]:
    """ComfyUI's TAESD encoder and decoder for 16 latent channels with seeded weights."""
    import_comfy()
    import comfy.taesd.taesd

    halves = {
        "encoder": comfy.taesd.taesd.Encoder(latent_channels=TAEF1_LATENT_CHANNELS),
        "decoder": comfy.taesd.taesd.Decoder(latent_channels=TAEF1_LATENT_CHANNELS),
    }
    generator = torch.Generator().manual_seed(seed)
    for module in halves.values():
        _init_convs_(module, generator)
    _calibrate_output_(halves["decoder"], generator)
    return halves


def write_tiny_taef1(folder: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0,
                     **overrides: Any) -> Path:
    """Write ``taef1_encoder.safetensors`` and ``taef1_decoder.safetensors`` into ``folder`` (a vae_approx folder).

    Matches tiny_models.TinyFamily's writer signature; returns the folder.
    """
    if overrides:
        raise ValueError(f"taef1 has a fixed architecture; it takes no config overrides (got {sorted(overrides)})")
    if variant not in TAEF1_VARIANTS:
        raise ValueError(f"unknown taef1 variant {variant!r}; choose from {list(TAEF1_VARIANTS)}")
    if size not in TAEF1_SIZES:
        raise ValueError(f"unknown taef1 size {size!r}; TAESD's architecture is fixed: choose from {list(TAEF1_SIZES)}")
    folder = Path(folder)
    if folder.suffix in (".safetensors", ".sft"):
        raise ValueError(f"{folder}: taef1 is two files; give the vae_approx folder to write them into")
    folder.mkdir(parents=True, exist_ok=True)
    halves = build_taef1(seed)
    for part, path in taef1_files(folder).items():
        tensors = {key: tensor.contiguous() for key, tensor in halves[part].state_dict().items()}
        description = {"family": TAEF1_NAME, "part": part, "seed": seed}
        save_file(tensors, str(path), metadata={"comfyui_xdit.tiny_model": json.dumps(description, sort_keys=True)})
    return folder


def _init_convs_(module: torch.nn.Module, generator: torch.Generator) -> None:
    # He-scaled, as for any ReLU network; disable_weight_init leaves the memory uninitialised otherwise.
    with torch.no_grad():
        for layer in module.modules():
            if not isinstance(layer, torch.nn.Conv2d):
                continue
            fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            weight = torch.randn(layer.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
            layer.weight.copy_(weight)
            if layer.bias is not None:
                layer.bias.copy_(_BIAS_STD * torch.randn(layer.bias.shape, generator=generator))


def _calibrate_output_(decoder: torch.nn.Sequential, generator: torch.Generator) -> None:
    """Rescale the decoder's last convolution so a unit-normal latent decodes to _PIXEL_MEAN +- _PIXEL_STD per channel.

    The residual blocks grow the activations' spread, so He scaling alone leaves almost every pixel clamped.
    """
    last = decoder[-1]
    latent = torch.randn((1, TAEF1_LATENT_CHANNELS, 16, 16), generator=generator)
    with torch.no_grad():
        out = decoder(latent)
        mean = out.mean(dim=(0, 2, 3))
        gain = _PIXEL_STD / out.std(dim=(0, 2, 3))
        last.weight.mul_(gain.view(-1, 1, 1, 1))
        last.bias.copy_(_PIXEL_MEAN + (last.bias - mean) * gain)
