"""Seeded LoRA files for the DiT families beside Flux (tiny_loras.py), in every key format ComfyUI 0.30.0 maps for each
(comfy/lora.py, model_lora_keys_unet), under the names the trainers write.

A family's LoRA modules have two namings: ComfyUI's own (what kohya `lora_unet_...`, ComfyUI `diffusion_model....` and
LyCORIS LoHa keys name) and diffusers' (what diffusers/PEFT `transformer....`, OneTrainer and SimpleTuner LoKr
`lycoris_...` keys name).
- Qwen-Image: both namings are diffusers' (`transformer_blocks.0.attn.to_q`). Only the attention projections are
  trained: at Qwen-Image's fixed width they are ~75 M of its ~380 M parameters, enough to test the mapping and the
  merge without holding several copies of the whole model.
- SD3 / SD3.5 (MMDiT): ComfyUI's `joint_blocks.0.x_block.attn.qkv` is diffusers' `transformer_blocks.0.attn.to_q`,
  `to_k`, `to_v` (slices of the fused weight); the last block's text stream stops after attention and its
  modulation's halves are swapped between the namings. Every 2-D weight of the joint blocks is trained.
- Flux.2: Flux.1's naming and key map (comfy/utils.py flux_to_diffusers) less the per-block modulations (Flux.2
  modulates globally); a single block's fused `linear1` and `linear2` are diffusers' `attn.to_qkv_mlp_proj` and
  `attn.to_out`. Every 2-D weight of the double and single blocks is trained.
  ComfyUI also maps `single_blocks.N.linear1_qkv` onto the first 3 x hidden rows of the fused `linear1` (the q/k/v
  part; its MLP rows stay as they are): a format of its own, which trains only those weights.
- Wan 2.1 and Wan 2.2: ComfyUI maps only its own naming for Wan (kohya, `diffusion_model.` with lora_up/down or, as
  diffusion-pipe writes them, lora_A/B, LoHa and LoKr on kohya names) plus Wan Fun's `lora_unet__` keys
  (comfy/lora_convert.py). Every 2-D weight of the blocks (self- and cross-attention, feed-forward) is trained.
- HiDream: ComfyUI's own naming (kohya, `diffusion_model.`, LoHa) and SimpleTuner's, on the same names
  (`transformer.` with lora_A/B, LoKr as `lycoris_`). Every 2-D weight of the double and single stream blocks is
  trained, the mixture-of-experts' experts and gate included.
- Lumina 2 / Z-Image (one class, NextDiT): ComfyUI's own naming, and diffusers' (comfy/utils.py z_image_to_diffusers:
  `attention.to_q/to_k/to_v` are slices of the fused `attention.qkv`, `attention.to_out.0` is `attention.out`) under
  `diffusion_model.`, `transformer.`, `lycoris_` and no prefix. Every 2-D weight of the joint layers and both
  refiners is trained. ComfyUI slices to_k/to_v as if there were as many key/value heads as query heads, which holds
  for Z-Image but not Lumina 2 (24 heads, 8 key/value heads): Lumina 2's diffusers-named files here leave to_k/to_v
  out, and tests check that such a LoRA is refused before any work.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_loras import Shapes, _low_rank, flux_shapes as checkpoint_shapes, linear1_qkv_modules, lokr_for_modules, native_modules as flux_comfy

Modules = dict[str, tuple[int, int]]
Writer = Callable[[Modules, int, float, torch.Generator], dict[str, torch.Tensor]]


def _up_down(prefix: str, up_name: str, down_name: str, alpha: bool, underscores: bool = False) -> Writer:
    def write(modules: Modules, rank: int, amplitude: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
        tensors = {}
        for module, (out_dim, in_dim) in modules.items():
            up, down = _low_rank(out_dim, in_dim, rank, amplitude, gen)
            name = prefix + (module.replace(".", "_") if underscores else module)
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


@dataclass(frozen=True)
class KeyFormat:
    naming: str  # "comfy", "diffusers" or "linear1_qkv": which module names its keys are built on
    write: Writer
    trains: Callable[[Shapes], Modules] | None = None  # the ComfyUI modules it changes, where fewer than the family's


KOHYA = KeyFormat("comfy", _up_down("lora_unet_", "lora_up.weight", "lora_down.weight", alpha=True, underscores=True))
COMFY = KeyFormat("comfy", _up_down("diffusion_model.", "lora_up.weight", "lora_down.weight", alpha=True))
LOHA = KeyFormat("comfy", _loha)
DIFFUSERS = KeyFormat("diffusers", _up_down("transformer.", "lora_B.weight", "lora_A.weight", alpha=False))
LOKR = KeyFormat("diffusers", lokr_for_modules)


def qwen_image_attention(shapes: Shapes) -> Modules:
    """(out, in) of every attention projection of Qwen-Image's blocks, by ComfyUI (= diffusers) module name."""
    return {k[:-len(".weight")]: tuple(v) for k, v in shapes.items()
            if k.startswith("transformer_blocks.") and ".attn." in k and k.endswith(".weight") and len(v) == 2}


def mmdit_comfy(shapes: Shapes) -> Modules:
    """(out, in) of every 2-D weight of MMDiT's joint blocks, by ComfyUI module name."""
    return {k[:-len(".weight")]: tuple(v) for k, v in shapes.items()
            if k.startswith("joint_blocks.") and k.endswith(".weight") and len(v) == 2}


# ComfyUI's MMDiT module (after "joint_blocks.N.") -> diffusers' (after "transformer_blocks.N."); fused q/k/v split.
_MMDIT_DIFFUSERS: dict[str, tuple[str, ...]] = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}


def mmdit_diffusers(shapes: Shapes) -> Modules:
    """The same weights under diffusers' SD3Transformer2DModel names."""
    modules = {}
    for name, (out_dim, in_dim) in mmdit_comfy(shapes).items():
        _, block, inner = name.split(".", 2)
        parts = _MMDIT_DIFFUSERS[inner]
        for part in parts:
            modules[f"transformer_blocks.{block}.{part}"] = (out_dim // len(parts), in_dim)
    return modules


def flux2_diffusers(shapes: Shapes) -> Modules:
    """Flux.2's block weights under diffusers' Flux2Transformer2DModel names (double-block q, k, v split)."""
    h = shapes["img_in.weight"][0]
    modules: Modules = {}
    for name, (out_dim, in_dim) in flux_comfy(shapes).items():
        kind, block, inner = name.split(".", 2)
        if kind == "single_blocks":
            part = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}[inner]
            modules[f"single_transformer_blocks.{block}.{part}"] = (out_dim, in_dim)
            continue
        prefix = f"transformer_blocks.{block}."
        if inner in ("img_attn.qkv", "txt_attn.qkv"):
            names = ("to_q", "to_k", "to_v") if inner == "img_attn.qkv" else ("add_q_proj", "add_k_proj", "add_v_proj")
            modules.update({f"{prefix}attn.{part}": (h, in_dim) for part in names})
            continue
        part = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
                "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}[inner]
        modules[prefix + part] = (out_dim, in_dim)
    return modules


def _block_weights(*prefixes: str) -> Callable[[Shapes], Modules]:
    """(out, in) of every 2-D weight under `prefixes` (the block containers), by ComfyUI module name."""
    def modules(shapes: Shapes) -> Modules:
        return {k[:-len(".weight")]: tuple(v) for k, v in shapes.items()
                if k.startswith(prefixes) and k.endswith(".weight") and len(v) == 2}

    return modules


wan_comfy = _block_weights("blocks.")
hidream_comfy = _block_weights("double_stream_blocks.", "single_stream_blocks.")
nextdit_comfy = _block_weights("layers.", "context_refiner.", "noise_refiner.")


def flux_single_linear1(shapes: Shapes) -> Modules:
    """The fused first linear of Flux's single blocks, whose q/k/v rows a `linear1_qkv` LoRA trains."""
    return {k: v for k, v in flux_comfy(shapes).items() if k.startswith("single_blocks.") and k.endswith(".linear1")}


def nextdit_diffusers_trained(shapes: Shapes) -> Modules:
    """The NextDiT block weights ComfyUI's diffusers map reaches: all but Lumina 2's modulation, which sits at index 1
    of its adaLN Sequential where the map names index 0 (Z-Image's place)."""
    return {k: v for k, v in nextdit_comfy(shapes).items() if not k.endswith(".adaLN_modulation.1")}


def nextdit_diffusers(shapes: Shapes) -> Modules:
    """NextDiT's block weights under the diffusers names ComfyUI maps (fused q/k/v split in three equal slices);
    to_k/to_v only where they fit, i.e. as many key/value heads as query heads (Z-Image; not Lumina 2)."""
    modules: Modules = {}
    for name, (out_dim, in_dim) in nextdit_diffusers_trained(shapes).items():
        block, inner = name.rsplit(".", 2)[0], ".".join(name.rsplit(".", 2)[1:])
        if inner == "attention.qkv":
            hidden = shapes[f"{block}.attention.out.weight"][0]
            parts = ("to_q", "to_k", "to_v") if out_dim == 3 * hidden else ("to_q",)
            modules.update({f"{block}.attention.{part}": (hidden, in_dim) for part in parts})
        else:
            modules[f"{block}.attention.to_out.0" if inner == "attention.out" else name] = (out_dim, in_dim)
    return modules


def _lokr_kohya(modules: Modules, rank: int, amplitude: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LoKr on kohya names (`lora_unet_...`), as LyCORIS writes it for a model without a diffusers naming in ComfyUI."""
    return {"lora_unet_" + k[len("lycoris_"):]: v for k, v in lokr_for_modules(modules, rank, amplitude, gen).items()}


@dataclass(frozen=True)
class FamilyLoras:
    modules: dict[str, Callable[[Shapes], Modules]]  # by naming
    formats: dict[str, KeyFormat]


_QWEN_IMAGE = FamilyLoras({"comfy": qwen_image_attention, "diffusers": qwen_image_attention}, {
    "kohya": KOHYA, "comfy": COMFY, "diffusers": DIFFUSERS, "loha": LOHA, "lokr": LOKR,
    "diffusers_bare": KeyFormat("diffusers", _up_down("", "lora_B.weight", "lora_A.weight", alpha=False)),
})
_MMDIT = FamilyLoras({"comfy": mmdit_comfy, "diffusers": mmdit_diffusers}, {
    "kohya": KOHYA, "comfy": COMFY, "diffusers": DIFFUSERS, "loha": LOHA, "lokr": LOKR,
    "peft": KeyFormat("diffusers", _up_down("base_model.model.", "lora_B.weight", "lora_A.weight", alpha=False)),
    "onetrainer": KeyFormat("diffusers", _up_down("lora_transformer_", "lora_up.weight", "lora_down.weight", alpha=True, underscores=True)),
})
_FLUX2 = FamilyLoras({"comfy": flux_comfy, "diffusers": flux2_diffusers, "linear1_qkv": linear1_qkv_modules}, {
    "kohya": KOHYA, "comfy": COMFY, "diffusers": DIFFUSERS, "loha": LOHA, "lokr": LOKR,
    "linear1_qkv": KeyFormat("linear1_qkv", COMFY.write, trains=flux_single_linear1),
    "onetrainer": KeyFormat("diffusers", _up_down("lora_transformer_", "lora_up.weight", "lora_down.weight", alpha=True, underscores=True)),
    "diffsynth": KeyFormat("diffusers", _up_down("", "lora_B.weight", "lora_A.weight", alpha=False)),
})
_WAN = FamilyLoras({"comfy": wan_comfy}, {
    "kohya": KOHYA, "comfy": COMFY, "loha": LOHA, "lokr": KeyFormat("comfy", _lokr_kohya),
    "diffusion_pipe": KeyFormat("comfy", _up_down("diffusion_model.", "lora_B.weight", "lora_A.weight", alpha=False)),
    "wan_fun": KeyFormat("comfy", _up_down("lora_unet__", "lora_up.weight", "lora_down.weight", alpha=True, underscores=True)),
})
_HIDREAM = FamilyLoras({"comfy": hidream_comfy}, {
    "kohya": KOHYA, "comfy": COMFY, "loha": LOHA, "lokr": KeyFormat("comfy", lokr_for_modules),
    "simpletuner": KeyFormat("comfy", _up_down("transformer.", "lora_B.weight", "lora_A.weight", alpha=False)),
})
_NEXTDIT = FamilyLoras({"comfy": nextdit_comfy, "diffusers": nextdit_diffusers}, {
    "kohya": KOHYA, "comfy": COMFY, "loha": LOHA,
    **{name: KeyFormat("diffusers", writer, trains=nextdit_diffusers_trained) for name, writer in (
        ("diffusers", DIFFUSERS.write), ("lokr", LOKR.write),
        ("diffusers_comfy_prefix", _up_down("diffusion_model.", "lora_B.weight", "lora_A.weight", alpha=False)),
        ("diffusers_bare", _up_down("", "lora_B.weight", "lora_A.weight", alpha=False)))},
})
# Lumina 2 shares Z-Image's class and key map: Z-Image's tiny model (in-process, small) takes every format; Lumina 2's
# (a 1.7 GB file, its width fixed by detection) takes one format per naming, where its layout differs (grouped
# key/value heads, modulation at index 1).
_LUMINA2 = FamilyLoras(_NEXTDIT.modules, {name: _NEXTDIT.formats[name] for name in ("comfy", "diffusers")})
# By tiny_models family name (FAMILIES there, or IN_PROCESS for the models built in-process).
FAMILIES: dict[str, FamilyLoras] = {"qwen_image": _QWEN_IMAGE, "sd3": _MMDIT, "sd35": _MMDIT, "flux2": _FLUX2, "wan21": _WAN,
                                    "wan22_5b": _WAN, "hidream": _HIDREAM, "zimage": _NEXTDIT, "lumina2": _LUMINA2}


def trained_modules(family: str, shapes: Shapes, fmt: str) -> Modules:
    """The ComfyUI modules the `fmt` file for `family` trains (what a merge must change)."""
    trains = FAMILIES[family].formats[fmt].trains or FAMILIES[family].modules["comfy"]
    return trains(shapes)


def write_dit_lora(path: str | Path, family: str, model: str | Path | Shapes, fmt: str, rank: int = 4, seed: int = 0,
                   amplitude: float = 0.3) -> Path:
    """A seeded LoRA in format `fmt` for the `family` model: its checkpoint's path (shapes from its header), or
    its weight shapes by ComfyUI name (a model built in-process)."""
    if family not in FAMILIES:
        raise ValueError(f"no tiny LoRAs for family {family!r}; choose from {sorted(FAMILIES)}")
    formats = FAMILIES[family].formats
    if fmt not in formats:
        raise ValueError(f"unknown {family} LoRA format {fmt!r}; choose from {sorted(formats)}")
    key_format = formats[fmt]
    shapes = model if isinstance(model, dict) else checkpoint_shapes(model)
    modules = FAMILIES[family].modules[key_format.naming](shapes)
    tensors = key_format.write(modules, rank, amplitude, torch.Generator().manual_seed(seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"comfyui_xdit.tiny_lora": f"{family} {fmt} rank {rank} seed {seed}"})
    return path
