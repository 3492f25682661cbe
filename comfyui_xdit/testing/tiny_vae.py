"""Tiny seeded VAEs that ComfyUI's stock VAELoader loads: TAEF1 and the AutoencoderKL image VAEs.

Seeded TAEF1 weights (TAESD for Flux's 16-channel latents) that ComfyUI's stock VAELoader loads as "taef1".

TAESD's architecture is fixed (64 channels wide, about 1.2 M parameters per half), so only the weights are synthetic:
the files go through ComfyUI's own loader and decoder, and decoding a latent gives a real (if abstract) picture.
VAELoader looks in models/vae_approx for ``taef1_encoder.*`` and ``taef1_decoder.*`` and adds Flux's scale/shift
itself; safetensors only (nothing is ever unpickled).
"""

from __future__ import annotations

import contextlib
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


# The AutoencoderKL image VAEs: "flux" is the 16-channel Flux/SD3 layout (no quant convolutions), "sdxl" the 4-channel
# SD1.x/SDXL one (with them), "flux2" Flux.2's (32 channels packed 2x2 into 128, with a batch-norm latent scale). Stock detection fixes the encoder (128 wide, ~34 M parameters) and reads the decoder's
# width from its first convolution, so only the decoder is narrow.
KL_VAE_VARIANTS = ("flux", "sdxl", "flux2")
_KL_LATENT_CHANNELS = {"flux": 16, "sdxl": 4, "flux2": 32}
_KL_DECODER_CH = 32  # the narrowest width with 32 group-norm groups


def build_kl_vae(variant: str, seed: int) -> torch.nn.Module:
    """ComfyUI's AutoencodingEngine ("flux") or AutoencoderKL ("sdxl", "flux2") as stock detection builds it, seeded."""
    if variant not in KL_VAE_VARIANTS:
        raise ValueError(f"unknown AutoencoderKL variant {variant!r}; choose from {list(KL_VAE_VARIANTS)}")
    import_comfy()
    import comfy.ldm.models.autoencoder as autoencoder

    ddconfig = {"double_z": True, "z_channels": _KL_LATENT_CHANNELS[variant], "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    if variant == "flux2":
        ddconfig["batch_norm_latent"] = True
    decoder_config = {**ddconfig, "ch": _KL_DECODER_CH}
    if variant in ("sdxl", "flux2"):
        model = autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=ddconfig["z_channels"],
                                          decoder_ddconfig=decoder_config)
    else:
        module = "comfy.ldm.modules.diffusionmodules.model"
        model = autoencoder.AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": f"{module}.Encoder", "params": ddconfig},
            decoder_config={"target": f"{module}.Decoder", "params": decoder_config})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Conv2d):
                fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                layer.bias.copy_(_BIAS_STD * torch.randn(layer.bias.shape, generator=generator))
            elif isinstance(layer, torch.nn.GroupNorm):
                layer.weight.copy_(1.0 + 0.1 * torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
            elif isinstance(layer, torch.nn.BatchNorm2d):  # Flux.2's latent statistics
                layer.running_mean.copy_(0.1 * torch.randn(layer.running_mean.shape, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=generator))
        # Decoded pixels are (out + 1) / 2 clamped to [0, 1]: scale the last convolution so few of them clamp.
        packed = 4 if variant == "flux2" else 1
        out = model.decode(torch.randn((1, ddconfig["z_channels"] * packed, 4, 4), generator=generator))
        model.decoder.conv_out.weight.mul_(2 * _PIXEL_STD / out.std())
        model.decoder.conv_out.bias.zero_()
    return model


def _vae_file(path: str | Path) -> Path:
    """`path` as a Path, refused (before anything is built) unless it names a safetensors file."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".sft"):
        raise ValueError(f"{path}: a tiny VAE file must end in .safetensors")
    return path


def _save_vae(path: Path, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> Path:
    """Write one VAE file, its description in the metadata as the tiny models carry theirs; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.contiguous() for key, tensor in tensors.items()}
    save_file(tensors, str(path), metadata={"comfyui_xdit.tiny_model": json.dumps(description, sort_keys=True)})
    return path


def write_tiny_kl_vae(path: str | Path, variant: str = "flux", size: str = "tiny", seed: int = 0,
                      **overrides: Any) -> Path:
    """Write a seeded AutoencoderKL VAE file (see KL_VAE_VARIANTS) that stock VAELoader detects.

    Matches tiny_models.TinyFamily's writer signature; returns the path.
    """
    if overrides:
        raise ValueError(f"the AutoencoderKL layout is fixed by detection; it takes no config overrides (got {sorted(overrides)})")
    if size != "tiny":
        raise ValueError(f"unknown AutoencoderKL size {size!r}; choose from ['tiny']")
    path = _vae_file(path)
    return _save_vae(path, build_kl_vae(variant, seed).state_dict(), {"family": "kl_vae", "variant": variant, "seed": seed})


def write_server_vaes(models: str | Path) -> None:
    """The tiny VAEs a test server or the demo offers, under a ComfyUI models/ folder: taef1 (vae_approx) and the
    Flux 16-channel KL VAE under the name offline workflows load (workflow_tools.OFFLINE_VAE_NAME), which the XDiT
    VAE nodes split over the pool."""
    from ..workflow_tools import OFFLINE_VAE_NAME

    models = Path(models)
    write_tiny_taef1(models / "vae_approx")
    if not (models / "vae" / OFFLINE_VAE_NAME).exists():
        write_tiny_kl_vae(models / "vae" / OFFLINE_VAE_NAME, "flux")


# Wan 2.1's causal video VAE: stock detection reads the width from the decoder's last norm (the real file is 96 wide)
# and fixes the rest (16 latent channels, [1, 2, 4, 4] stages, 8x spatial and 4x temporal compression), so the
# whole model can be narrow.
WAN_VAE_VARIANTS = ("wan21",)
_WAN_VAE_DIM = 8


def build_wan_vae(seed: int, dim: int = _WAN_VAE_DIM) -> torch.nn.Module:
    """ComfyUI's Wan 2.1 WanVAE as stock detection builds it for a `dim`-wide file, seeded."""
    import_comfy()
    import comfy.ldm.wan.vae as wan_vae

    model = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    return _seed_wan_vae_(model, seed)


@contextlib.contextmanager
def _narrow_wan22_detection(dim: int):
    """Stock detection builds the Wan 2.2 VAE 160 wide (decoder 256): while this is open it builds it `dim` wide,
    every other choice (48 channels, 16x compression, chunking, memory estimates) left to the stock code."""
    import comfy.ldm.wan.vae2_2 as wan22

    stock = wan22.WanVAE

    class NarrowWanVAE(stock):
        def __init__(self, **config: Any) -> None:
            super().__init__(**{**config, "dim": dim, "dec_dim": dim})

    wan22.WanVAE = NarrowWanVAE
    try:
        yield
    finally:
        wan22.WanVAE = stock


def tiny_wan22_vae(seed: int = 0, dim: int = _WAN_VAE_DIM) -> Any:
    """A comfy.sd.VAE of the Wan 2.2 VAE built in this process, `dim` wide and seeded.

    The real file's width is fixed by detection (about 700 M parameters), so no tiny file can be detected as Wan 2.2:
    the stock VAE class builds it from a seeded state dict while detection's width is narrowed (as tiny_models'
    IN_PROCESS models are built)."""
    import_comfy()
    import comfy.sd

    with _narrow_wan22_detection(dim):
        import comfy.ldm.wan.vae2_2 as wan22

        model = wan22.WanVAE(dim=dim, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True], dropout=0.0)
        sd = {key: tensor.contiguous() for key, tensor in _seed_wan_vae_(model, seed, latent_channels=48).state_dict().items()}
        vae = comfy.sd.VAE(sd=sd)
    vae.throw_exception_if_invalid()
    return vae


def _seed_wan_vae_(model: torch.nn.Module, seed: int, latent_channels: int = 16) -> torch.nn.Module:
    import comfy.ldm.wan.vae as wan_vae

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                layer.bias.copy_(_BIAS_STD * torch.randn(layer.bias.shape, generator=generator))
            elif isinstance(layer, wan_vae.RMS_norm):
                layer.gamma.copy_(1.0 + 0.1 * torch.randn(layer.gamma.shape, generator=generator))
        # Decoded pixels are (out + 1) / 2 clamped to [0, 1]: scale the last convolution so few of them clamp.
        out = model.decode(torch.randn((1, latent_channels, 2, 4, 4), generator=generator))
        head = model.decoder.head[-1]
        head.weight.mul_(2 * _PIXEL_STD / out.std())
        head.bias.zero_()
    return model


def write_tiny_wan_vae(path: str | Path, variant: str = "wan21", size: str = "tiny", seed: int = 0,
                       **overrides: Any) -> Path:
    """Write a seeded Wan 2.1 video VAE file that stock VAELoader detects (see build_wan_vae).

    Matches tiny_models.TinyFamily's writer signature; returns the path.
    """
    if overrides:
        raise ValueError(f"the Wan VAE layout is fixed by detection; it takes no config overrides (got {sorted(overrides)})")
    if variant not in WAN_VAE_VARIANTS:
        raise ValueError(f"unknown Wan VAE variant {variant!r}; choose from {list(WAN_VAE_VARIANTS)}")
    if size != "tiny":
        raise ValueError(f"unknown Wan VAE size {size!r}; choose from ['tiny']")
    path = _vae_file(path)
    return _save_vae(path, build_wan_vae(seed).state_dict(), {"family": "wan_vae", "variant": variant, "seed": seed})


# Wan 2.2's video VAE as stock detection builds it: 160 wide (the decoder 256), 48 latent channels, ~705 M parameters.
# The width is fixed there, so the smallest detectable file is full width: stored in bf16 (as tiny_models'
# width-fixed files), 1.4 GB, loaded into fp32 by stock and the pool alike. Its tensors are drawn one by one from a
# seeded generator (no 2.8 GB module is built to write it).
WAN22_VAE_CONFIG: dict[str, Any] = {"dim": 160, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                                    "temperal_downsample": [False, True, True], "dropout": 0.0}
_WAN22_VAE_STORAGE = torch.bfloat16
_WAN22_DECODER_HEAD = "decoder.head.2"  # the last convolution
# E[silu(z)^2] for z ~ N(0, 1): the head convolution's input is SiLU of an RMS norm (unit scale per position), so
# this sets the head's output spread without running the model.
_SILU_SECOND_MOMENT = 0.3557


def wan22_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The seeded full-width Wan 2.2 VAE weights, in bf16, keyed as ComfyUI's WanVAE names them.

    Convolutions He-scaled (the residual stream stays O(1-10) through every block), RMS-norm scales around 1, small
    biases; the decoder's last convolution is scaled so a unit-normal latent decodes to pixels around
    _PIXEL_MEAN +- _PIXEL_STD."""
    import_comfy()
    import comfy.ldm.wan.vae2_2 as wan22

    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in wan22.WanVAE(**WAN22_VAE_CONFIG).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith(".gamma"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith(".bias"):
            tensor = torch.zeros(shape) if key == f"{_WAN22_DECODER_HEAD}.bias" else _BIAS_STD * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            std = (2 * _PIXEL_STD / math.sqrt(fan_in * _SILU_SECOND_MOMENT) if key == f"{_WAN22_DECODER_HEAD}.weight"
                   else math.sqrt(2.0 / fan_in))
            tensor = torch.randn(shape, generator=generator) * std
        tensors[key] = tensor.to(_WAN22_VAE_STORAGE)
    return tensors


def write_wan22_vae(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write the seeded Wan 2.2 video VAE file (see wan22_vae_state_dict) that stock VAELoader detects. "tiny" is the
    smallest file detection takes, which is full width (1.4 GB).

    Matches tiny_models.TinyFamily's writer signature; returns the path.
    """
    if overrides:
        raise ValueError(f"the Wan 2.2 VAE layout is fixed by detection; it takes no config overrides (got {sorted(overrides)})")
    if variant != "default" or size != "tiny":
        raise ValueError(f"unknown Wan 2.2 VAE variant/size {variant!r}/{size!r}; detection fixes its width: choose from ['default'] / ['tiny']")
    path = _vae_file(path)
    return _save_vae(path, wan22_vae_state_dict(seed),
                     {"family": "wan22_vae", "seed": seed, "stored_as": str(_WAN22_VAE_STORAGE).removeprefix("torch.")})
