"""Seeded Qwen-Image LoRA files in every key format ComfyUI 0.30.0 maps for it (comfy/lora.py, model_lora_keys_unet).

ComfyUI's Qwen-Image module names are diffusers' (`transformer_blocks.0.attn.to_q`), so one module list serves every
format: kohya (`lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`), ComfyUI's own
(`diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight`), diffusers/PEFT with and without the `transformer.`
prefix (`lora_A`/`lora_B`), LyCORIS LoHa on kohya names and LoKr on SimpleTuner's `lycoris_` names. Only the attention
projections are trained: at Qwen-Image's fixed width they are ~75 M of its ~380 M parameters, enough to test the
mapping and the merge without holding several copies of the whole model.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_loras import Shapes, _low_rank, flux_shapes as checkpoint_shapes, lokr_for_modules

Modules = dict[str, tuple[int, int]]


def attention_modules(shapes: Shapes) -> Modules:
    """(out, in) of every attention projection of the model's blocks, by ComfyUI (= diffusers) module name."""
    return {k[:-len(".weight")]: tuple(v) for k, v in shapes.items()
            if k.startswith("transformer_blocks.") and ".attn." in k and k.endswith(".weight") and len(v) == 2}


def _up_down(prefix: str, up_name: str, down_name: str, alpha: bool) -> Callable[[Modules, int, float, torch.Generator], dict]:
    def write(modules: Modules, rank: int, amplitude: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
        tensors = {}
        for module, (out_dim, in_dim) in modules.items():
            up, down = _low_rank(out_dim, in_dim, rank, amplitude, gen)
            name = prefix + (module.replace(".", "_") if prefix == "lora_unet_" else module)
            tensors.update({f"{name}.{up_name}": up, f"{name}.{down_name}": down})
            if alpha:  # alpha = rank / 2 halves the product: scaling by alpha / rank is part of what is tested
                tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
        return tensors

    return write


def _loha(modules: Modules, rank: int, amplitude: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, (out_dim, in_dim) in modules.items():
        w1a, w1b = _low_rank(out_dim, in_dim, rank, 1.0, gen)
        w2a, w2b = _low_rank(out_dim, in_dim, rank, amplitude, gen)
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b * math.sqrt(in_dim), f"{name}.hada_w2_a": w2a,
                        f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(float(rank))})
    return tensors


FORMATS: dict[str, Callable[[Modules, int, float, torch.Generator], dict[str, torch.Tensor]]] = {
    "kohya": _up_down("lora_unet_", "lora_up.weight", "lora_down.weight", alpha=True),
    "comfy": _up_down("diffusion_model.", "lora_up.weight", "lora_down.weight", alpha=True),
    "diffusers": _up_down("transformer.", "lora_B.weight", "lora_A.weight", alpha=False),
    "diffusers_bare": _up_down("", "lora_B.weight", "lora_A.weight", alpha=False),
    "loha": _loha,
    "lokr": lokr_for_modules,
}


def write_qwen_image_lora(path: str | Path, model_path: str | Path, fmt: str, rank: int = 4, seed: int = 0,
                          amplitude: float = 0.3) -> Path:
    """A seeded LoRA in format `fmt` for the Qwen-Image checkpoint at `model_path` (shapes from its header)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose from {sorted(FORMATS)}")
    tensors = FORMATS[fmt](attention_modules(checkpoint_shapes(model_path)), rank, amplitude, torch.Generator().manual_seed(seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"comfyui_xdit.tiny_lora": f"qwen_image {fmt} rank {rank} seed {seed}"})
    return path
