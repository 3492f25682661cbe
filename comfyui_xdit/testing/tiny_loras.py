"""Seeded Flux LoRA files in the key formats found in the wild, for tests and benchmarks.

Key names follow the trainers that write them (not ComfyUI's key map, which the files are meant to test):
kohya sd-scripts / ai-toolkit (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`), ComfyUI's own
(`diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight`), diffusers/PEFT
(`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), XLabs (`double_blocks.0.processor.qkv_lora1.down.weight`)
and LyCORIS LoHa (kohya names, `hada_w1_a`...) and LoKr (SimpleTuner's `lycoris_` + diffusers names, `lokr_w1`...).
Shapes come from the model file's header, so a LoRA fits whatever Flux size it is written for; Chroma (Flux's blocks
without their modulation layers) takes every format but XLabs'.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Shapes = Mapping[str, tuple[int, ...]]
# ComfyUI recognises XLabs processor keys only in the full Flux layout (it looks for block 18 and single block 37).
XLABS_MIN_BLOCKS = (19, 38)


def flux_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes of a Flux checkpoint by ComfyUI-native name (no `model.diffusion_model.` prefix)."""
    with safe_open(str(model_path), framework="pt", device="cpu") as f:
        shapes = {re.sub(r"^(model\.)?diffusion_model\.", "", k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return shapes


def _blocks(shapes: Shapes, prefix: str) -> int:
    return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})


def native_modules(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """(out, in) of the linear layers a Flux LoRA trains: every 2-D weight of the double and single blocks."""
    return {k[:-len(".weight")]: tuple(v) for k, v in shapes.items()
            if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and len(v) == 2}


def diffusers_modules(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """(out, in) of the same layers under diffusers' FluxTransformer2DModel names (q, k, v split); for Chroma (no
    per-block modulation layers: its approximator makes the modulations) ChromaTransformer2DModel's, the same less those."""
    h = shapes["img_in.weight"][0]
    mlp = shapes["double_blocks.0.img_mlp.0.weight"][0]
    modulated = "final_layer.adaLN_modulation.1.weight" in shapes
    modules = {"x_embedder": shapes["img_in.weight"], "proj_out": shapes["final_layer.linear.weight"]}
    if modulated:
        modules["norm_out.linear"] = shapes["final_layer.adaLN_modulation.1.weight"]
    for i in range(_blocks(shapes, "double_blocks.")):
        block = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            modules[f"{block}.attn.{name}"] = (h, h)
        for ff in ("ff", "ff_context"):
            modules[f"{block}.{ff}.net.0.proj"] = (mlp, h)
            modules[f"{block}.{ff}.net.2"] = (h, mlp)
        if modulated:
            modules[f"{block}.norm1.linear"] = (6 * h, h)
            modules[f"{block}.norm1_context.linear"] = (6 * h, h)
    for i in range(_blocks(shapes, "single_blocks.")):
        block = f"single_transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v"):
            modules[f"{block}.attn.{name}"] = (h, h)
        modules[f"{block}.proj_mlp"] = (mlp, h)
        modules[f"{block}.proj_out"] = (h, h + mlp)
        if modulated:
            modules[f"{block}.norm.linear"] = (3 * h, h)
    return {k: tuple(v) for k, v in modules.items()}


def linear1_qkv_modules(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """`single_blocks.N.linear1_qkv`: the first 3 x hidden rows (q, k, v) of each single block's fused linear1, which
    comfy/lora.py maps for Flux and the families built on its class (Flux.2, Chroma)."""
    h = shapes["img_in.weight"][0]
    return {f"single_blocks.{i}.linear1_qkv": (3 * h, shapes[f"single_blocks.{i}.linear1.weight"][1])
            for i in range(_blocks(shapes, "single_blocks."))}


def xlabs_modules(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """(out, in) of XLabs' processor LoRAs: fused q/k/v and the output projections of every block."""
    double, single = _blocks(shapes, "double_blocks."), _blocks(shapes, "single_blocks.")
    if double < XLABS_MIN_BLOCKS[0] or single < XLABS_MIN_BLOCKS[1]:
        raise ValueError(f"XLabs LoRA keys are recognised by ComfyUI only for Flux's full layout ({XLABS_MIN_BLOCKS[0]} double, "
                         f"{XLABS_MIN_BLOCKS[1]} single blocks); this model has {double} and {single}")
    h = shapes["img_in.weight"][0]
    modules = {}
    for i in range(double):
        for stream, suffix in (("img", "1"), ("txt", "2")):
            modules[f"double_blocks.{i}.processor.qkv_lora{suffix}"] = (3 * h, h)
            modules[f"double_blocks.{i}.processor.proj_lora{suffix}"] = shapes[f"double_blocks.{i}.{stream}_attn.proj.weight"]
    for i in range(single):
        modules[f"single_blocks.{i}.processor.qkv_lora"] = (3 * h, h)
        modules[f"single_blocks.{i}.processor.proj_lora"] = shapes[f"single_blocks.{i}.linear2.weight"]
    return modules


def _low_rank(out_dim: int, in_dim: int, rank: int, amplitude: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down about `amplitude` times a fan-in-scaled weight: a visible but sane change."""
    down = torch.randn(rank, in_dim, generator=gen) / math.sqrt(in_dim)
    up = torch.randn(out_dim, rank, generator=gen) * (amplitude / math.sqrt(rank))
    return up, down


def _factor(n: int) -> int:
    return next(f for f in (4, 2, 1) if n % f == 0)


def _kohya(shapes, rank, amplitude, gen):
    tensors = {}
    for module, (out_dim, in_dim) in native_modules(shapes).items():
        up, down = _low_rank(out_dim, in_dim, rank, 2 * amplitude, gen)
        name = "lora_unet_" + module.replace(".", "_")
        # alpha = rank / 2 halves the product again: scaling by alpha / rank is part of what is tested
        tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(rank / 2)})
    return tensors


def _comfy(shapes, rank, amplitude, gen, modules=native_modules):
    tensors = {}
    for module, (out_dim, in_dim) in modules(shapes).items():
        up, down = _low_rank(out_dim, in_dim, rank, amplitude, gen)
        tensors.update({f"diffusion_model.{module}.lora_up.weight": up, f"diffusion_model.{module}.lora_down.weight": down,
                        f"diffusion_model.{module}.alpha": torch.tensor(float(rank))})
    return tensors


def _diffusers(shapes, rank, amplitude, gen):
    tensors = {}
    for module, (out_dim, in_dim) in diffusers_modules(shapes).items():
        up, down = _low_rank(out_dim, in_dim, rank, amplitude, gen)  # PEFT files carry no alpha: scale 1
        tensors.update({f"transformer.{module}.lora_B.weight": up, f"transformer.{module}.lora_A.weight": down})
    return tensors


def _xlabs(shapes, rank, amplitude, gen):
    tensors = {}
    for module, (out_dim, in_dim) in xlabs_modules(shapes).items():
        up, down = _low_rank(out_dim, in_dim, rank, amplitude, gen)
        tensors.update({f"{module}.up.weight": up, f"{module}.down.weight": down})
    return tensors


def _loha(shapes, rank, amplitude, gen):
    tensors = {}
    for module, (out_dim, in_dim) in native_modules(shapes).items():
        w1a, w1b = _low_rank(out_dim, in_dim, rank, 1.0, gen)
        w1b = w1b * math.sqrt(in_dim)  # first factor O(1), the second carries the amplitude
        w2a, w2b = _low_rank(out_dim, in_dim, rank, amplitude, gen)
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                        f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(float(rank))})
    return tensors


def _lokr(shapes, rank, amplitude, gen):
    return lokr_for_modules(diffusers_modules(shapes), rank, amplitude, gen)


def lokr_for_modules(modules: dict[str, tuple[int, int]], rank: int, amplitude: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr tensors for {module name: (out, in)}, in the diffusers naming LyCORIS uses."""
    tensors = {}
    for module, (out_dim, in_dim) in modules.items():
        f_out, f_in = _factor(out_dim), _factor(in_dim)
        w2a, w2b = _low_rank(out_dim // f_out, in_dim // f_in, rank, amplitude, gen)
        name = "lycoris_" + module.replace(".", "_")
        tensors.update({f"{name}.lokr_w1": torch.randn(f_out, f_in, generator=gen) / math.sqrt(f_in),
                        f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(float(rank))})
    return tensors


FORMATS: dict[str, Callable[[Shapes, int, float, torch.Generator], dict[str, torch.Tensor]]] = {
    "kohya": _kohya, "comfy": _comfy, "diffusers": _diffusers, "xlabs": _xlabs, "loha": _loha, "lokr": _lokr,
    "linear1_qkv": functools.partial(_comfy, modules=linear1_qkv_modules),
}


def flux_lora(shapes: Shapes, fmt: str = "kohya", rank: int = 4, seed: int = 0, amplitude: float = 0.3) -> dict[str, torch.Tensor]:
    """A seeded LoRA state dict in format `fmt` for a Flux of these weight shapes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose from {sorted(FORMATS)}")
    return FORMATS[fmt](shapes, rank, amplitude, torch.Generator().manual_seed(seed))


def write_flux_lora(path: str | Path, shapes: Shapes, fmt: str = "kohya", rank: int = 4, seed: int = 0,
                    amplitude: float = 0.3, dtype: torch.dtype = torch.float32) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in flux_lora(shapes, fmt, rank, seed, amplitude).items()}
    save_file(tensors, str(path), metadata={"comfyui_xdit.tiny_lora": f"{fmt} rank {rank} seed {seed}"})
    return path
