"""Seeded tiny (and bench-sized) diffusion-transformer checkpoints that ComfyUI detects as the real family.

Only the weights are synthetic: the files load through ComfyUI's own loader and model detection and run ComfyUI's
own model code, so tests and benchmarks exercise the genuine forward pass. Families are registered in FAMILIES.
Files are safetensors only (nothing is ever unpickled).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from comfyui_xdit.comfy_runtime import import_comfy
from comfyui_xdit.testing.tiny_vae import KL_VAE_VARIANTS, TAEF1_SIZES, TAEF1_VARIANTS, WAN_VAE_VARIANTS, write_tiny_kl_vae, write_tiny_taef1, write_tiny_wan_vae, write_wan22_vae

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

# Flux.2 (comfy.model_base.Flux2) is the same model class; detection tells it by its global modulation weights and
# hard-codes these (model_detection.py, "flux2"): patch 1 on 128 latent channels, head dim 128, no pooled vector.
FLUX2_DETECTION_FIXED: dict[str, Any] = {
    "image_model": "flux2",
    "out_channels": 128,
    "mlp_ratio": 3.0,
    "axes_dim": [32, 32, 32, 32],
    "theta": 2000,
    "patch_size": 1,
    "qkv_bias": False,
    "global_modulation": True,
    "mlp_silu_act": True,
    "ops_bias": False,
    "default_ref_method": "index",
    "ref_index_scale": 10.0,
    "txt_ids_dims": [3],
    "vec_in_dim": None,
}
FLUX2_BASE: dict[str, Any] = {**FLUX2_DETECTION_FIXED, "in_channels": 128, "context_in_dim": 64}
FLUX2_SIZES: dict[str, dict[str, Any]] = {"tiny": {"hidden_size": 256, "depth": 1, "depth_single_blocks": 1}}
FLUX2_VARIANTS: dict[str, dict[str, Any]] = {"dev": {"guidance_embed": True}}

# A one-level SD1.5 U-Net: SD15 detection fixes the width (320), the text width (768, CLIP-L) and 8 heads; depth,
# levels and attention placement are read back from the weights, so one res block with one cross-attention
# transformer (and no middle block) is the smallest model that still conditions on text. ~13.6 M parameters.
SD15_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [0, 0],
    "transformer_depth_middle": -2, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "use_linear_in_transformer": False, "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
}
# SDXL's U-Net as detection names it: width 320, linear transformer projections, 2048-wide text, a 2816-wide adm
# vector (1280 pooled + six 256-wide size embeddings) and 2, 2 and 10, 10 transformer blocks on the second and third
# levels' res blocks are all fixed there. The rest is read back from the weights, so channels stay 320 on every
# level, the output side has no transformers and there is no middle block: ~132 M parameters, 0.5 GB in fp32.
SDXL_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0] * 9, "use_linear_in_transformer": True, "context_dim": 2048, "adm_in_channels": 2816,
    "num_classes": "sequential",
}

# SD3 / SD3.5 (comfy.model_base.SD3, ComfyUI's MMDiT). Detection reads every size back from weight shapes with one
# fixed rule: heads of 64 channels, so hidden = 64 * depth, heads = depth and there are `depth` joint blocks (the last
# one's text stream stops after attention). Depth 2: 2 heads at hidden 128, ~1 M parameters. The position table is
# a fixed 16 x 16 grid that forward crops around its centre for smaller latents, as SD3's 192 x 192 one is.
SD3_DEPTH = 2
SD3_CONFIG: dict[str, Any] = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": SD3_DEPTH, "input_size": None, "adm_in_channels": 32,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 64 * SD3_DEPTH}},
    "num_patches": 16 * 16, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}
# SD3.5 Medium's layout: RMS-normalised q/k and, in its first blocks, a second image-only self-attention (dual attention).
# ComfyUI's detection fixes Qwen-Image, Lumina 2 and Chroma at their real widths (0.4-0.5 B parameters even with one
# block), so their files are stored in bf16, as the real releases are: half the disk of a test run. Stock and the pool
# both load them into fp32 on the CPU, so every comparison still runs in fp32.
WIDTH_FIXED_STORAGE = torch.bfloat16
SD3_VARIANTS: dict[str, dict[str, Any]] = {
    "sd3": {},
    "sd35": {"qk_norm": "rms", "x_block_self_attn_layers": [0]},
}
# Qwen-Image detection reads only the input width (16 latent channels x 2x2 patches) and the block count from the
# weights; width 3072 (24 heads of 128) and the 3584-wide text input are ComfyUI's defaults for the class. One
# block is the smallest model that loads as it: ~380 M parameters, 0.76 GB in bf16 (WIDTH_FIXED_STORAGE).
QWEN_IMAGE_UNET_CONFIG: dict[str, Any] = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1}
# Wan 2.1/2.2 (comfy.ldm.wan.model.WanModel). Detection reads width, FFN width, depth and channels from the weights and
# fixes heads of 128 channels (heads = dim / 128), patch (1, 2, 2), the 256 timestep frequencies and the umT5 text
# width 4096 (the class default). Width 512 gives 4 heads; two blocks, FFN as wide as the model: ~10 M parameters.
# The variants are what detection tells apart: T2V, I2V (36 input channels = 16 latent + 4 mask + 16 image, and CLIP
# image tokens through img_emb) and Wan 2.2's TI2V 5B (48 latent channels in and out).
WAN_BASE: dict[str, Any] = {"image_model": "wan2.1", "dim": 512, "ffn_dim": 512, "num_heads": 4, "num_layers": 2,
                            "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
                            "cross_attn_norm": True, "eps": 1e-6}
WAN_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {  # variant -> (config, the supported_models class detecting it)
    "t2v": ({"model_type": "t2v", "in_dim": 16, "out_dim": 16}, "WAN21_T2V"),
    "i2v": ({"model_type": "i2v", "in_dim": 36, "out_dim": 16}, "WAN21_I2V"),
    "ti2v_5b": ({"model_type": "t2v", "in_dim": 48, "out_dim": 48}, "WAN22_T2V"),
    # Wan 2.2 A14B I2V's experts: I2V's 36 input channels but no img_emb (no CLIP-vision tokens), so detection names
    # them T2V and ComfyUI runs them as Wan 2.1's class, concatenating mask and start-image latent to the noise.
    "a14b_i2v": ({"model_type": "t2v", "in_dim": 36, "out_dim": 16}, "WAN21_T2V"),
}
# HunyuanVideo (comfy.ldm.hunyuan_video.model.HunyuanVideo). Detection reads width, channels, patch, text width and
# block counts from the weights and fixes heads of 128 channels on RoPE axes 16/56/56, theta 256, MLP x4, CLIP-L's 768
# pooled width (1.0), ByT5's 1472 input and 1.5's SigLIP width 1152 (which tells 1.5 apart). Width 256: 2 heads.
# 1.0 T2V: 16 latent channels, patches 1x2x2, guidance embedding, two double blocks and one single block (~5 M
# parameters). 1.5: 32 latent channels (+ 32 image + 1 mask in), patches 1x1x1, ByT5 glyph and vision inputs, the
# cond-type embedding, and only double blocks as the real one (~14 M parameters, mostly the ByT5 mapper).
HUNYUAN_VIDEO_BASE: dict[str, Any] = {
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 64,
    "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
    "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
    "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False,
}
HUNYUAN_VIDEO_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {  # variant -> (config, the supported_models class)
    "v1": ({}, "HunyuanVideo"),
    "v15": ({"in_channels": 65, "out_channels": 32, "vec_in_dim": None, "patch_size": [1, 1, 1], "depth_single_blocks": 0,
             "guidance_embed": False, "byt5": True, "use_cond_type_embedding": True, "vision_in_dim": 1152,
             "meanflow_sum": True}, "HunyuanVideo15"),
}
# LTX-Video (comfy.ldm.lightricks.model.LTXVModel). Detection reads the block count and the cross-attention width from
# the weights and fixes 32 heads (head width = attention width / 32); 128 latent channels in 1x1x1 patches and T5's
# 4096-wide text are class defaults. Heads of 8 channels (width 256), two blocks: ~3 M parameters.
LTXV_UNET_CONFIG: dict[str, Any] = {"image_model": "ltxv", "num_layers": 2, "attention_head_dim": 8, "cross_attention_dim": 256}
# CogVideoX (comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel). Detection reads width (heads of 64 fixed), time
# width, depth, channels, patches (a Conv2d: 1.0; a Linear over 2 frames: 1.5), text width and the position kind from
# the weights. 1.0 with RoPE (as the 5B): 2 heads (width 128), two blocks, a 64-wide T5 stand-in: ~1 M parameters.
COGVIDEOX_UNET_CONFIG: dict[str, Any] = {
    "image_model": "cogvideox", "num_attention_heads": 2, "attention_head_dim": 64, "time_embed_dim": 64, "num_layers": 2,
    "in_channels": 16, "patch_size": 2, "text_embed_dim": 64, "use_learned_positional_embeddings": False,
    "use_rotary_positional_embeddings": True,
}
# Lumina 2 (comfy.model_base.Lumina2, ComfyUI's NextDiT): detection takes it for Lumina 2 only at width 2304 (24 query
# heads, 8 key/value heads, FFN x4) and reads the caption width (Gemma 2's 2304) and the main layer count from the
# weights; the two refiners of each kind are the class default. One main layer: ~435 M parameters, 1.7 GB in fp32.
LUMINA2_UNET_CONFIG: dict[str, Any] = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": 2304, "n_layers": 1,
    "qk_norm": True, "n_heads": 24, "n_kv_heads": 8, "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512],
    "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
}
# Z-Image is NextDiT at width 3840 (detection fixes it, ~6 B parameters), so its tiny model is built in-process,
# bypassing detection: Z-Image's layout (head dim 128 on RoPE axes 32/48/48, theta 256, its modulation and time
# scale, caption and image padded to multiples of 32 tokens, Qwen3-4B's 2560-wide caption) at 4 heads, one block each.
ZIMAGE_UNET_CONFIG: dict[str, Any] = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 512, "cap_feat_dim": 2560, "n_layers": 1,
    "n_refiner_layers": 1, "qk_norm": True, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
    "time_scale": 1000.0, "pad_tokens_multiple": 32,
}

# Chroma detection (model_detection.py, "chroma") reads the text width and the block counts from the weights and fixes
# the rest: width 3072 (the modulation approximator's output, 5 layers of 5120), 24 heads of 128, 64 patch features
# in and out. One double block and no single block is the smallest file that loads as it: ~505 M parameters, 2 GB fp32.
CHROMA_UNET_CONFIG: dict[str, Any] = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
    "n_layers": 5, "context_in_dim": 64, "hidden_size": 3072, "num_heads": 24, "mlp_ratio": 4.0, "axes_dim": [16, 56, 56],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "txt_ids_dims": [], "vec_in_dim": None, "depth": 1,
    "depth_single_blocks": 0,
}
# In-process (detection bypassed): ComfyUI's Chroma class at Flux-tiny width, the approximator as wide as the blocks
# (its output is their modulation) and two layers deep; the approximator's input is fixed at 64 by the forward.
CHROMA_TINY_CONFIG: dict[str, Any] = {
    **CHROMA_UNET_CONFIG, "out_dim": 256, "hidden_dim": 128, "n_layers": 2, "hidden_size": 256, "num_heads": 2,
    "depth_single_blocks": 1,
}
# Chroma Radiance, in-process only: detection also fixes its NeRF head, whose four parameter generators (3072 x 49152
# each) make the smallest detected file 1.1 B parameters (4.4 GB). Here pixels in (3 channels) are patchified by a
# 2 x 2 conv so a small image has an uneven token grid; a small NeRF head with the conv output layer and sequential
# text positions (the newer checkpoints').
CHROMA_RADIANCE_TINY_CONFIG: dict[str, Any] = {
    **CHROMA_TINY_CONFIG, "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3, "nerf_hidden_size": 16,
    "nerf_mlp_ratio": 2, "nerf_depth": 2, "nerf_max_freqs": 4, "nerf_tile_size": 16, "nerf_final_head_type": "conv",
    "nerf_embedder_dtype": torch.float32, "use_x0": False, "use_sequential_txt_ids": True,
}

# Normalisation scales are drawn around 1 rather than set to exactly 1 so that a wrong mapping of them (e.g. in a
# sharded model) changes the output; biases are small but non-zero for the same reason.
_NORM_SCALE_STD = 0.1
_BIAS_STD = 0.02
# The output projection is scaled down so predicted velocities are O(1), like a trained flow model's; at plain
# fan-in scale they reach ~10 and sampled latents ~25, where fp32 rounding alone is ~2e-6 per value.
_OUTPUT_LAYER = "final_layer.linear"
_OUTPUT_SCALE = 0.15
_MODULATION_STD = 0.1


def flux_config(variant: str = "dev", size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``comfy.ldm.flux.model.Flux``; num_heads follows hidden_size unless overridden."""
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"unknown flux variant {variant!r}; choose from {sorted(FLUX_VARIANTS)}")
    if size not in FLUX_SIZES:
        raise ValueError(f"unknown flux size {size!r}; choose from {sorted(FLUX_SIZES)}")
    config = copy.deepcopy({**FLUX_BASE, **FLUX_SIZES[size], **FLUX_VARIANTS[variant], **overrides})
    config.setdefault("num_heads", config["hidden_size"] // sum(config["axes_dim"]))
    return config


def flux2_config(variant: str = "dev", size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``comfy.ldm.flux.model.Flux`` that detection reads back as Flux.2."""
    if variant not in FLUX2_VARIANTS or size not in FLUX2_SIZES:
        raise ValueError(f"unknown flux2 variant/size {variant!r}/{size!r}; choose from {sorted(FLUX2_VARIANTS)} / {sorted(FLUX2_SIZES)}")
    config = copy.deepcopy({**FLUX2_BASE, **FLUX2_SIZES[size], **FLUX2_VARIANTS[variant], **overrides})
    config.setdefault("num_heads", config["hidden_size"] // sum(config["axes_dim"]))
    for key, value in FLUX2_DETECTION_FIXED.items():
        if config[key] != value:
            raise ValueError(f"this Flux.2 config would not load back from a file as itself: {key}={config[key]!r} (ComfyUI assumes {value!r})")
    if config["num_heads"] * sum(config["axes_dim"]) != config["hidden_size"]:
        raise ValueError(f"Flux.2 needs num_heads = hidden_size / {sum(config['axes_dim'])}")
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
    smooth_in_time_(model.time_in.in_layer)
    return model


# Flux embeds sigma as cos/sin at 128 frequencies up to 1000 rad per unit sigma. A trained model's timestep MLP
# varies smoothly over the schedule; with random weights it would weigh every frequency alike, and the highest ones
# turn over completely between adjacent steps, so a random model's activations would decorrelate from step to step
# in a way no trained model's do (which would make every stale-activation method look arbitrarily bad).
_TIME_FACTOR, _MAX_PERIOD = 1000.0, 10000.0
_SMOOTH_RAD_PER_SIGMA = 5.0


def smooth_in_time_(layer: torch.nn.Linear) -> None:
    """Damp the timestep MLP's input weights (`layer`, on cos/sin of 128 frequencies of 1000 * sigma) on frequencies
    above ~5 rad per unit sigma, keeping its scale."""
    half = layer.in_features // 2
    rad_per_sigma = _TIME_FACTOR * torch.exp(-math.log(_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
    damping = 1.0 / (1.0 + (rad_per_sigma / _SMOOTH_RAD_PER_SIGMA) ** 2)
    damping = torch.cat([damping, damping])
    with torch.no_grad():
        layer.weight.mul_(damping * math.sqrt(len(damping) / float((damping**2).sum())))


def init_weights_(model: torch.nn.Module, seed: int, output_layer: str = _OUTPUT_LAYER) -> None:
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
                    if module_name == output_layer:
                        value = value * _OUTPUT_SCALE
                elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                    value = noise / math.sqrt(parameter[0].numel())
                    if module_name == output_layer:  # U-Nets end in a convolution
                        value = value * _OUTPUT_SCALE
                # ComfyUI's own RMSNorm classes (MMDiT's q/k norms) are not torch's.
                elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)) or type(module).__name__ == "RMSNorm":
                    value = 1.0 + _NORM_SCALE_STD * noise
                elif type(module).__name__ == "MoEGate":  # HiDream's expert router: a bare (experts, width) matrix
                    value = noise / math.sqrt(parameter.shape[1])
                elif name in ("modulation", "scale_shift_table"):  # adaLN tables held as bare parameters (Wan, LTXV), added to the timestep's
                    value = _MODULATION_STD * noise
                elif isinstance(module, torch.nn.Embedding):  # HunyuanVideo 1.5's cond-type embedding, added to text rows
                    value = _MODULATION_STD * noise
                elif name == "pos_frequencies":  # Mochi's learned RoPE frequencies (3 axes x heads x head_dim / 2)
                    value = noise
                elif name.endswith("pad_token"):  # Z-Image's learned padding tokens, embeddings in the model's width
                    value = noise
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


def write_tiny_flux2(path: str | Path, variant: str = "dev", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as Flux.2."""
    path = _checked_path(path)
    config = flux2_config(variant, size, **overrides)
    return _save(build_flux(config, seed), path,
                 {"family": "flux2", "variant": variant, "size": size, "seed": seed, "config": config})


def _detected_model(config: dict[str, Any], expected: str) -> torch.nn.Module:
    """ComfyUI's diffusion model for `config`, built through stock detection, which must name it `expected`."""
    import_comfy()
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if type(model_config).__name__ != expected:
        raise ValueError(f"this config is detected as {type(model_config).__name__}, not {expected}")
    return model_config.get_model({}).diffusion_model


def _write_tiny_unet(family: str, detected_as: str, base_config: dict[str, Any], path: str | Path, variant: str, size: str,
                     seed: int, overrides: dict[str, Any], output_layer: str = _OUTPUT_LAYER) -> Path:
    path = _checked_path(path)
    config = {**base_config, **overrides}
    model = _detected_model(config, detected_as)
    init_weights_(model, seed, output_layer)
    return _save(model, path, {"family": family, "variant": variant, "size": size, "seed": seed, "config": config})


def write_tiny_sd15(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded U-Net checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as SD1.5."""
    return _write_tiny_unet("sd15", "SD15", SD15_UNET_CONFIG, path, variant, size, seed, overrides)


def write_tiny_sdxl(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded U-Net checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as SDXL."""
    # Its output convolution is scaled down like the DiTs' output layers: at fan-in scale, 40 layers of fp32 rounding
    # amplified by CFG 5 and the latent format's 1/0.13 reach 2.3e-6 of the latent's max (~700 after 3 steps).
    return _write_tiny_unet("sdxl", "SDXL", SDXL_UNET_CONFIG, path, variant, size, seed, overrides, output_layer="out.2")


def fill_sd3_pos_embed_(model: torch.nn.Module, side: int) -> None:
    """Set MMDiT's position table, a buffer (not a parameter, so init_weights_ leaves it uninitialised), to SD3's fixed
    sin/cos table: absolute positions must matter, and every rank must hold the same values."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    with torch.no_grad():
        model.pos_embed.copy_(mmdit.get_2d_sincos_pos_embed_torch(model.hidden_size, side, side).unsqueeze(0))


def write_tiny_sd3(path: str | Path, variant: str = "sd3", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded MMDiT checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as SD3 (variant "sd3")
    or with SD3.5 Medium's blocks ("sd35")."""
    path = _checked_path(path)
    if variant not in SD3_VARIANTS or size != "tiny":
        raise ValueError(f"unknown sd3 variant/size {variant!r}/{size!r}; choose from {sorted(SD3_VARIANTS)} / ['tiny']")
    config = copy.deepcopy({**SD3_CONFIG, **SD3_VARIANTS[variant], **overrides})
    model = _detected_model(config, "SD3")
    init_weights_(model, seed)
    smooth_in_time_(model.t_embedder.mlp[0])
    fill_sd3_pos_embed_(model, config["pos_embed_max_size"])
    return _save(model, path, {"family": "sd3", "variant": variant, "size": size, "seed": seed, "config": config})


def write_tiny_qwen_image(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0,
                          **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as Qwen-Image."""
    path = _checked_path(path)
    config = {**QWEN_IMAGE_UNET_CONFIG, **overrides}
    model = _detected_model(config, "QwenImage")
    init_weights_(model, seed, output_layer="proj_out")
    return _save(model, path, {"family": "qwen_image", "variant": variant, "size": size, "seed": seed, "config": config},
                 stored_as=WIDTH_FIXED_STORAGE)


def write_tiny_wan(path: str | Path, variant: str = "t2v", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as Wan 2.1 T2V or I2V, or as
    Wan 2.2's TI2V 5B (variants in WAN_VARIANTS)."""
    path = _checked_path(path)
    if variant not in WAN_VARIANTS or size != "tiny":
        raise ValueError(f"unknown wan variant/size {variant!r}/{size!r}; choose from {sorted(WAN_VARIANTS)} / ['tiny']")
    variant_config, config_class = WAN_VARIANTS[variant]
    config = copy.deepcopy({**WAN_BASE, **variant_config, **overrides})
    model = _detected_model(config, config_class)
    init_weights_(model, seed, output_layer="head.head")
    smooth_in_time_(model.time_embedding[0])
    return _save(model, path, {"family": "wan", "variant": variant, "size": size, "seed": seed, "config": config})


def write_tiny_hunyuan_video(path: str | Path, variant: str = "v1", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as HunyuanVideo 1.0 (T2V) or
    1.5 (variants in HUNYUAN_VIDEO_VARIANTS)."""
    path = _checked_path(path)
    if variant not in HUNYUAN_VIDEO_VARIANTS or size != "tiny":
        raise ValueError(f"unknown hunyuan_video variant/size {variant!r}/{size!r}; choose from {sorted(HUNYUAN_VIDEO_VARIANTS)} / ['tiny']")
    variant_config, config_class = HUNYUAN_VIDEO_VARIANTS[variant]
    config = copy.deepcopy({**HUNYUAN_VIDEO_BASE, **variant_config, **overrides})
    model = _detected_model(config, config_class)
    init_weights_(model, seed)
    smooth_in_time_(model.time_in.in_layer)
    return _save(model, path, {"family": "hunyuan_video", "variant": variant, "size": size, "seed": seed, "config": config})


def write_tiny_ltxv(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as LTX-Video."""
    path = _checked_path(path)
    if variant != "default" or size != "tiny":
        raise ValueError(f"unknown ltxv variant/size {variant!r}/{size!r}; choose from ['default'] / ['tiny']")
    config = {**LTXV_UNET_CONFIG, **overrides}
    model = _detected_model(config, "LTXV")
    init_weights_(model, seed, output_layer="proj_out")
    smooth_in_time_(model.adaln_single.emb.timestep_embedder.linear_1)
    return _save(model, path, {"family": "ltxv", "variant": variant, "size": size, "seed": seed, "config": config})


def write_tiny_cogvideox(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as CogVideoX (T2V)."""
    path = _checked_path(path)
    if variant != "default" or size != "tiny":
        raise ValueError(f"unknown cogvideox variant/size {variant!r}/{size!r}; choose from ['default'] / ['tiny']")
    config = {**COGVIDEOX_UNET_CONFIG, **overrides}
    model = _detected_model(config, "CogVideoX_T2V")
    init_weights_(model, seed, output_layer="proj_out")
    smooth_in_time_(model.time_embedding_linear_1)
    return _save(model, path, {"family": "cogvideox", "variant": variant, "size": size, "seed": seed, "config": config})


def write_tiny_lumina2(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as Lumina 2."""
    path = _checked_path(path)
    config = {**LUMINA2_UNET_CONFIG, **overrides}
    model = _detected_model(config, "Lumina2")
    init_weights_(model, seed)
    return _save(model, path, {"family": "lumina2", "variant": variant, "size": size, "seed": seed, "config": config},
                 stored_as=WIDTH_FIXED_STORAGE)


def write_tiny_chroma(path: str | Path, variant: str = "default", size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded checkpoint that ``comfy.sd.load_diffusion_model`` loads and detects as Chroma."""
    path = _checked_path(path)
    if variant != "default" or size != "tiny":
        raise ValueError(f"unknown chroma variant/size {variant!r}/{size!r}; choose from ['default'] / ['tiny']")
    config = {**CHROMA_UNET_CONFIG, **overrides}
    model = _detected_model(config, "Chroma")
    init_weights_(model, seed)
    return _save(model, path, {"family": "chroma", "variant": variant, "size": size, "seed": seed, "config": config},
                 stored_as=WIDTH_FIXED_STORAGE)


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


def conditioning_widths(base_model: Any) -> tuple[int, int]:
    """(text width, pooled width) a ComfyUI model's conditioning needs (for stand_in_conditioning)."""
    unet_config = base_model.model_config.unet_config
    diffusion_model = base_model.diffusion_model
    # Flux names the text width context_in_dim and U-Nets context_dim; MMDiT records the input of its context embedder;
    # HiDream lists T5's width first (then Llama's), NextDiT (Lumina 2, Z-Image) names it cap_feat_dim; Qwen-Image's
    # and Wan's are class defaults (not in the detected config): read them off the text input layer.
    if "context_embedder_config" in unet_config:
        text = unet_config["context_embedder_config"]["params"]["in_features"]
    elif "caption_channels" in unet_config:
        text = unet_config["caption_channels"][0]
    elif "cap_feat_dim" in unet_config:
        text = unet_config["cap_feat_dim"]
    elif hasattr(diffusion_model, "caption_channels"):  # LTXV: T5's width, a class default
        text = diffusion_model.caption_channels
    elif "t5_feat_dim" in unet_config:  # Mochi
        text = unet_config["t5_feat_dim"]
    elif "text_embed_dim" in unet_config:  # CogVideoX
        text = unet_config["text_embed_dim"]
    else:
        text_in = diffusion_model.text_embedding[0] if hasattr(diffusion_model, "text_embedding") else getattr(diffusion_model, "txt_in", None)
        text = unet_config.get("context_in_dim", unet_config.get("context_dim")) or text_in.in_features
    # U-Nets and MMDiT take the pooled text vector inside their adm input, beside what ComfyUI's encode_adm adds itself
    # (SDXL's six size embeddings): the width left for it is the adm width less encode_adm's output for an empty one.
    # Flux names it vec_in_dim; models without a pooled input ignore it.
    if unet_config.get("adm_in_channels"):
        own = base_model.encode_adm(pooled_output=torch.zeros(1, 0), width=8, height=8, device="cpu")
        return text, unet_config["adm_in_channels"] - own.shape[1]
    return text, unet_config.get("vec_in_dim") or FLUX_BASE["vec_in_dim"]


@dataclass(frozen=True)
class TinyFamily:
    variants: tuple[str, ...]  # the first is the default
    sizes: tuple[str, ...]
    write: Callable[..., Path]  # (path, variant, size, seed, **overrides) -> Path


FAMILIES: dict[str, TinyFamily] = {
    "flux": TinyFamily(tuple(FLUX_VARIANTS), tuple(FLUX_SIZES), write_tiny_flux),
    "flux2": TinyFamily(tuple(FLUX2_VARIANTS), tuple(FLUX2_SIZES), write_tiny_flux2),
    "sd15": TinyFamily(("default",), ("tiny",), write_tiny_sd15),
    "sdxl": TinyFamily(("default",), ("tiny",), write_tiny_sdxl),
    "sd3": TinyFamily(tuple(SD3_VARIANTS), ("tiny",), write_tiny_sd3),
    # SD3.5 Medium's layout under its own name, so tests and the CLI ask for it as a family.
    "sd35": TinyFamily(("sd35",), ("tiny",), write_tiny_sd3),
    "qwen_image": TinyFamily(("default",), ("tiny",), write_tiny_qwen_image),
    # Wan 2.1 T2V (and I2V as a variant); the I2V and Wan 2.2 5B layouts under their own names too, for tests and the CLI.
    "wan21": TinyFamily(tuple(WAN_VARIANTS), ("tiny",), write_tiny_wan),
    "wan21_i2v": TinyFamily(("i2v",), ("tiny",), write_tiny_wan),
    "wan22_5b": TinyFamily(("ti2v_5b",), ("tiny",), write_tiny_wan),
    "wan22_a14b_i2v": TinyFamily(("a14b_i2v",), ("tiny",), write_tiny_wan),
    "lumina2": TinyFamily(("default",), ("tiny",), write_tiny_lumina2),
    # HunyuanVideo 1.0 T2V (and 1.5 as a variant); 1.5 under its own name too, for tests and the CLI.
    "hunyuan_video": TinyFamily(tuple(HUNYUAN_VIDEO_VARIANTS), ("tiny",), write_tiny_hunyuan_video),
    "hunyuan_video15": TinyFamily(("v15",), ("tiny",), write_tiny_hunyuan_video),
    "ltxv": TinyFamily(("default",), ("tiny",), write_tiny_ltxv),
    "cogvideox": TinyFamily(("default",), ("tiny",), write_tiny_cogvideox),
    "chroma": TinyFamily(("default",), ("tiny",), write_tiny_chroma),
    # Two files (encoder, decoder) written into the given vae_approx folder; VAELoader offers them as "taef1".
    "taef1": TinyFamily(TAEF1_VARIANTS, TAEF1_SIZES, write_tiny_taef1),
    # One .safetensors for the "vae" folder: the Flux/SD3 16-channel or the SD1.x/SDXL 4-channel image VAE.
    "kl_vae": TinyFamily(KL_VAE_VARIANTS, ("tiny",), write_tiny_kl_vae),
    # One .safetensors for the "vae" folder: Wan 2.1's causal video VAE, 8 wide.
    "wan_vae": TinyFamily(WAN_VAE_VARIANTS, ("tiny",), write_tiny_wan_vae),
    # One .safetensors for the "vae" folder: Wan 2.2's video VAE (48 channels) at the width detection fixes, 1.4 GB in bf16.
    "wan22_vae": TinyFamily(("default",), ("tiny",), write_wan22_vae),
}


# Families whose stock detection fixes billions of parameters (HiDream, Z-Image) cannot be tiny files: tests build
# ComfyUI's own model class for them in-process from a tiny config instead. Name -> builder(seed) -> ModelPatcher.
IN_PROCESS_PREFIX = "in-process:"
IN_PROCESS: dict[str, Callable[[int], Any]] = {}


def in_process_patcher(config_class: str, unet_config: dict[str, Any], seed: int, output_layer: str = _OUTPUT_LAYER,
                       inference_dtype: torch.dtype = torch.float32) -> Any:
    """A ModelPatcher around the model ComfyUI builds for comfy.supported_models.<config_class> given `unet_config`
    (tiny), seeded like the tiny files: the stock model class and forward, with only detection bypassed. It holds
    and computes in `inference_dtype` (no manual cast), as ComfyUI's loader sets up a model on a device that
    computes in that dtype."""
    import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, config_class)(copy.deepcopy(unet_config))
    model_config.set_inference_dtype(inference_dtype, None)
    model = model_config.get_model({})
    init_weights_(model.diffusion_model, seed, output_layer)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# HiDream I1 (comfy.model_base.HiDream): detection fixes 20 heads of 128, 16 + 32 blocks and 4096-wide T5 and Llama
# inputs. Tiny: 2 heads of 16 (RoPE on all 16 channels, as the real model), one block of each kind, MoE
# feed-forwards with 3 experts (2 active), a 64-wide T5 and a 24-wide 3-layer Llama stand-in (the layers each block
# reads, as llama_layers picks them), pooled width as Flux's tiny files.
HIDREAM_UNET_CONFIG: dict[str, Any] = {
    "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1, "num_single_layers": 1,
    "attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [8, 4, 4], "caption_channels": [64, 24],
    "text_emb_dim": FLUX_BASE["vec_in_dim"], "num_routed_experts": 3, "num_activated_experts": 2, "max_resolution": [128, 128],
    "llama_layers": [2, 0],
}
IN_PROCESS["hidream"] = lambda seed: in_process_patcher("HiDream", HIDREAM_UNET_CONFIG, seed, "final_layer.linear")
# Z-Image bypasses detection: ComfyUI's ZImage config and NextDiT built from ZIMAGE_UNET_CONFIG.
IN_PROCESS["zimage"] = lambda seed: in_process_patcher("ZImage", ZIMAGE_UNET_CONFIG, seed)
# Chroma's file is 2 GB (its width is fixed): the exactness suite runs its class in-process at Flux-tiny width.
IN_PROCESS["chroma"] = functools.partial(in_process_patcher, "Chroma", CHROMA_TINY_CONFIG)
# Qwen-Image's file is 1.5 GB with one block (its width is fixed): PipeFusion needs a block per stage, so the stale
# methods run its class in-process: two blocks, 2 heads of 32 (RoPE axes 8 + 12 + 12), a 64-wide text input.
QWEN_IMAGE_TINY_CONFIG: dict[str, Any] = {
    **QWEN_IMAGE_UNET_CONFIG, "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
    "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12),
}
IN_PROCESS["qwen_image_stages"] = functools.partial(in_process_patcher, "QwenImage", QWEN_IMAGE_TINY_CONFIG, output_layer="proj_out")
IN_PROCESS["chroma_radiance"] = functools.partial(in_process_patcher, "ChromaRadiance", CHROMA_RADIANCE_TINY_CONFIG,
                                                  output_layer="nerf_final_layer_conv.conv")

# Mochi (comfy.model_base.GenmoMochi): detection fixes ~10 B parameters (48 blocks at width 3072), so it is built
# in-process. Its blocks assert a visual FFN 12288 wide (1536 x 8): width 256 (4 heads of 64) takes mlp_ratio_x 48 to
# keep it (SwiGLU, 8192 hidden). A 128-wide text stream, a 64-wide T5 stand-in, two blocks (the last does not update
# the text, as in the real model): ~15 M parameters.
MOCHI_UNET_CONFIG: dict[str, Any] = {
    "image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 4, "hidden_size_x": 256, "hidden_size_y": 128,
    "mlp_ratio_x": 48.0, "mlp_ratio_y": 4.0, "learn_sigma": False, "in_channels": 12, "qk_norm": True, "qkv_bias": False,
    "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True, "posenc_preserve_area": True, "timestep_mlp_bias": True,
    "attend_to_padding": False, "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 64, "t5_token_length": 256,
    "rope_theta": 10000.0,
}
IN_PROCESS["mochi"] = functools.partial(in_process_patcher, "GenmoMochi", MOCHI_UNET_CONFIG, output_layer="final_layer.linear")


def load_tiny_model(spec: str, weight_dtype: str = "default", in_process_dtype: torch.dtype | None = None) -> Any:
    """The ModelPatcher of a tiny model: a file path (loaded as UNETLoader does, with its `weight_dtype`; ComfyUI
    chooses the dtype it computes in) or IN_PROCESS_PREFIX + a name in IN_PROCESS (computing in `in_process_dtype`
    where given, for the entries built by in_process_patcher; else float32)."""
    if spec.startswith(IN_PROCESS_PREFIX):
        name = spec[len(IN_PROCESS_PREFIX):]
        if name not in IN_PROCESS:
            raise ValueError(f"no in-process tiny model {name!r}; choose from {sorted(IN_PROCESS)}")
        return IN_PROCESS[name](0) if in_process_dtype is None else IN_PROCESS[name](0, inference_dtype=in_process_dtype)
    import_comfy()
    import comfy.sd

    from comfyui_xdit.shell_model import model_options_for

    return comfy.sd.load_diffusion_model(spec, model_options=model_options_for(weight_dtype))


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


def _save(model: torch.nn.Module, path: Path, description: dict[str, Any], stored_as: torch.dtype = torch.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: (tensor.to(stored_as) if tensor.is_floating_point() else tensor).contiguous()
               for key, tensor in model.state_dict().items()}
    if stored_as != torch.float32:
        description = {**description, "stored_as": str(stored_as).removeprefix("torch.")}
    # A namespaced key: ComfyUI's detection reads a bare "config" metadata entry for some families.
    save_file(tensors, str(path), metadata={"comfyui_xdit.tiny_model": json.dumps(description, sort_keys=True)})
    return path
