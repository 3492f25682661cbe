"""LoRA files read and mapped by ComfyUI's own code (comfy.lora_convert, comfy.lora), checked before any work.

Both sides use it: XDiTLoraLoader checks a file against the shell MODEL (meta weights, so keys and shapes
are the real ones and nothing is computed), and each worker maps the same file onto its resident model with the
same `map_lora`. The MODEL carries its LoRA stack as plain data (LoraRef tuples) in an attachment, which stock
nodes copy along when they clone the model.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_patcher
import comfy.weight_adapter

from .errors import UnsupportedByXDiT
from .families import adapter_for
from .job_spec import LoraRef
from .safetensors_files import open_safetensors

LORA_ATTACHMENT = "comfyui_xdit.loras"
# ComfyUI's loader needs the values of a few tiny tensors (alpha, reshape_weight); every other tensor is only
# its shape in the ComfyUI process.
_READ_VALUES_UP_TO = 16
_FORMATS = ("ComfyUI maps kohya (lora_unet_*), diffusers/PEFT (transformer.*), ComfyUI (diffusion_model.*), "
            "XLabs (processor.*) and LyCORIS LoHa/LoKr keys onto the diffusion model")


# LoraLoaderModelOnly's widget range: ComfyUI refuses values outside it when they are typed in a workflow.
STRENGTH_RANGE = (-100.0, 100.0)


def strength_problem(strength: float) -> str | None:
    """Why `strength` cannot be merged (None if it can). NaN and inf pass ComfyUI's own range check (every
    comparison with NaN is false) and would turn every weight they touch into NaN on every worker."""
    low, high = STRENGTH_RANGE
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        return f"strength_model must be a finite number from {low:g} to {high:g}, got {strength!r}"
    if not low <= strength <= high:
        return f"strength_model {strength:g} is outside {low:g} to {high:g}; use a strength in that range"
    return None


def lora_stack(model_patcher) -> tuple[LoraRef, ...]:
    return model_patcher.attachments.get(LORA_ATTACHMENT, ())


def with_lora(model_patcher, ref: LoraRef):
    """A clone whose stack ends with `ref`; the MODEL passed in keeps its own stack (other branches use it)."""
    model = model_patcher.clone()
    model.set_attachments(LORA_ATTACHMENT, lora_stack(model_patcher) + (ref,))
    return model


def read_shapes(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors of their shapes (tiny ones are read): its header, not its weights."""
    tensors = {}
    with open_safetensors(path, "LoRA") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            tensors[key] = f.get_tensor(key) if math.prod(shape) <= _READ_VALUES_UP_TO else torch.empty(shape, device="meta")
    return tensors


class _ReadRecorder(dict):
    """A state dict that remembers the keys ComfyUI's loader read: the ones it placed on a model weight."""

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default


@dataclass(frozen=True)
class MappedLora:
    patches: dict  # comfy.lora.load_lora's output: target key (or (key, offset[, function])) -> patch
    keys: int  # tensors in the file, after ComfyUI's format conversion
    unmatched: tuple[str, ...]  # the ones no weight of the model takes, sorted


def _this_model(model_patcher) -> str:
    """'this SD15 model' style: the family's name, as the registry knows it, for messages."""
    model = model_patcher.model
    return f"this {adapter_for(model).family_name(model)} model"


def map_lora(model_patcher, state_dict: dict, name: str, require_match: bool = True) -> MappedLora:
    """What LoraLoaderModelOnly builds for this model (same conversion, key map and loader), or a clear refusal
    when no key matches (unless `require_match` is False: a PipeFusion stage may hold none of a LoRA's blocks)."""
    converted = _ReadRecorder(comfy.lora_convert.convert_lora(state_dict))
    patches = comfy.lora.load_lora(converted, comfy.lora.model_lora_keys_unet(model_patcher.model, {}), log_missing=False)
    unmatched = tuple(sorted(set(converted) - converted.read))
    if not patches and require_match:
        example = f"; e.g. {unmatched[0]!r}" if unmatched else ""
        raise UnsupportedByXDiT(f"LoRA {name}: none of its {len(converted)} keys match {_this_model(model_patcher)} (0 of {len(converted)} matched{example}). {_FORMATS}: is it a LoRA for another model?")
    return MappedLora(patches, len(converted), unmatched)


def _applies(patch: tuple, weight: torch.Tensor, key: str) -> bool:
    """Whether ComfyUI's calculate_weight merges `patch` into `weight` (it logs a misfit and skips it, so the
    patch's function is wrapped to see whether the merge got that far)."""
    strength, value, strength_model, offset, function = patch
    merged = []

    def probe(delta):
        merged.append(True)
        return delta if function is None else function(delta)

    try:
        comfy.lora.calculate_weight([(strength, value, strength_model, offset, probe)], weight, key)
    except RuntimeError:  # a 'set' patch of another shape raises instead
        return False
    return bool(merged) or (isinstance(value, tuple) and value[0] == "set")


def _zeros(value):
    """The same patch with real zeros for every tensor (the node holds only their shapes)."""
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=torch.float32) if value.is_meta else value
    if isinstance(value, tuple):
        return tuple(_zeros(v) for v in value)
    if isinstance(value, comfy.weight_adapter.WeightAdapterBase):
        return type(value)(value.loaded_keys, _zeros(value.weights))
    return value


def _fits(patch: tuple, shape: torch.Size, key: str) -> bool:
    # Meta tensors check shapes without computing; a patch whose math reads values (OFT's norm test) fails there
    # and is tried once more on zeros.
    return (_applies(patch, torch.empty(shape, device="meta"), key)
            or _applies((patch[0], _zeros(patch[1]), *patch[2:]), torch.zeros(shape), key))


def _describe(patch: tuple) -> str:
    value = patch[1]
    if isinstance(value, tuple):  # ("diff" | "set", (tensor, ...))
        kind, tensors = value if len(value) == 2 else ("diff", value)
    else:
        kind, tensors = value.name, value.weights
    shapes = [tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor) and t.ndim > 0]
    return f"{kind} tensors of shapes {shapes}"


def check_fits(model_patcher, mapped: MappedLora, name: str) -> None:
    """Raise unless every patch fits the weight it targets."""
    scratch = model_patcher.clone()
    scratch.add_patches(mapped.patches, 1.0)  # strength 1: ComfyUI skips 'diff' patches at strength 0
    checked, misfits = 0, []
    for key, patches in scratch.patches.items():
        shape = comfy.model_patcher.get_key_weight(scratch.model, key)[0].shape
        for patch in patches:
            checked += 1
            if not _fits(patch, shape, key):
                misfits.append(f"{key} of shape {tuple(shape)} cannot take {_describe(patch)}")
    if misfits:
        raise UnsupportedByXDiT(f"LoRA {name}: {len(misfits)} of its {checked} weight patches do not fit {_this_model(model_patcher)}, e.g. {misfits[0]}; is it a LoRA for another variant or size of it?")


def checked_lora(model_patcher, path: str, strength: float) -> LoraRef:
    """The LoraRef of `path` for this MODEL, after checking that its keys match and its shapes fit."""
    name = Path(path).name
    stat = os.stat(path)
    mapped = map_lora(model_patcher, read_shapes(path), name)
    if mapped.unmatched:  # stock LoraLoader merges what matches and logs the rest: so does the pool
        logging.warning("XDiTLoraLoader: LoRA %s: %d of %d keys match %s; not applied, e.g. %r",
                        name, mapped.keys - len(mapped.unmatched), mapped.keys, _this_model(model_patcher), mapped.unmatched[0])
    check_fits(model_patcher, mapped, name)
    return LoraRef(path=path, strength=float(strength), stamp=(stat.st_size, stat.st_mtime_ns))
