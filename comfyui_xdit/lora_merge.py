"""A worker's LoRA state: the stack a job asks for, merged into the resident model key by key.

Exact merge-with-restore (README, "LoRA on the pool", has the measurement behind the choice): a stack becomes
ComfyUI's own patch lists (ModelPatcher.add_patches on a scratch clone, as LoraLoaderModelOnly builds them), and
each weight whose list changed is recomputed by ModelPatcher.patch_weight_to_device from the weight as loaded,
which is set aside the first time a LoRA touches it. A weight whose LoRAs and strengths did not change is left as
it is; one that no LoRA touches any more gets its loaded tensor back, bit for bit. The base model is never read
again nor reloaded, and the parallel clones built on it stay valid (they share its modules). With sharded block
weights (weight_sharding.py) a LoRA merges into each rank's own part of them.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path

import torch

import comfy.model_patcher
import comfy.utils

from .job_spec import LoraRef
from .lora import map_lora
from .weight_sharding import sharded_blocks

# Mapped LoRA files kept in memory (a large DiT's LoRA is 20-700 MB): enough to flip between a few without re-reading.
CACHED_FILES = 4


class MergedLoras:
    def __init__(self, model_patcher):
        self._model = model_patcher
        self._files: OrderedDict[tuple[str, tuple[int, int]], dict] = OrderedDict()
        self._applied: dict[str, tuple[LoraRef, ...]] = {}  # weight key -> the stack entries merged into it
        self._loaded: dict[str, torch.Tensor] = {}  # weight key -> the tensor as loaded, while a LoRA changes it
        self.stack: tuple[LoraRef, ...] | None = ()
        self.switches = 0
        self.last_keys_changed = 0

    def apply(self, stack: tuple[LoraRef, ...]) -> None:
        """Make the model's weights those of `stack` merged in order (stock LoraLoaderModelOnly chain)."""
        if stack == self.stack:
            return
        target = self._model.clone()
        requested: dict[str, tuple[LoraRef, ...]] = {}
        for ref in stack:
            for k in target.add_patches(self._patches(ref), ref.strength):
                key = k if isinstance(k, str) else k[0]
                requested[key] = requested.get(key, ()) + (ref,)
        # Sorted: sharded blocks are gathered by every rank together, so every rank must visit them in one order.
        changed = sorted(k for k in requested.keys() | self._applied.keys() if requested.get(k) != self._applied.get(k))
        self.stack = None  # until every key is done: a failure part-way leaves _applied exact per key
        sharded = sharded_blocks(self._model)
        in_blocks = [k for k in changed if sharded is not None and sharded.holds(k)]
        for key in changed:
            if key not in in_blocks:
                self._set(key, target if key in requested else None)
                self._record(key, requested)
        if in_blocks:
            for _, keys in itertools.groupby(sorted(in_blocks, key=sharded.block_of), key=sharded.block_of):
                self._set_in_block(sharded, list(keys), target, requested)
        self.stack = stack
        self.switches += 1
        self.last_keys_changed = len(changed)

    def _record(self, key: str, requested: dict) -> None:
        if key in requested:
            self._applied[key] = requested[key]
        else:
            del self._applied[key]

    def _set_in_block(self, sharded, keys: list[str], target, requested: dict) -> None:
        """Weights `keys` of one sharded block (weight_sharding.py) as loaded, then merged: this rank's bytes of each
        go back to loaded, the block is gathered whole (so ComfyUI merges into the loaded weight, as stock does), and
        this rank keeps its part of each merged weight. Only this rank's loaded bytes are set aside."""
        for key in keys:
            if key in self._loaded:
                sharded.restore(key, self._loaded[key])
            else:
                self._loaded[key] = sharded.read(key)
        with sharded.whole(sharded.block_of(keys[0])):
            for key in keys:
                if key in requested:
                    sharded.write(key, target.patch_weight_to_device(key, device_to=self._model.load_device, return_weight=True))
                else:
                    del self._loaded[key]
                self._record(key, requested)

    def _set(self, key: str, target) -> None:
        """Weight `key` as loaded, then merged with `target`'s patches (None: left as loaded)."""
        model = self._model.model
        weight = comfy.model_patcher.get_key_weight(model, key)[0]
        loaded = self._loaded.get(key)
        if loaded is None:  # kept where ComfyUI keeps its backups: on the offload device
            loaded = self._loaded[key] = weight.to(self._model.offload_device)
        comfy.utils.set_attr_param(model, key, loaded.to(weight.device))
        if target is None:
            del self._loaded[key]
            return
        merged = target.patch_weight_to_device(key, device_to=self._model.load_device, return_weight=True)
        comfy.utils.set_attr_param(model, key, merged)

    def _patches(self, ref: LoraRef) -> dict:
        file_key = (ref.path, ref.stamp)
        if file_key in self._files:
            self._files.move_to_end(file_key)
        else:
            state_dict = comfy.utils.load_torch_file(ref.path, safe_load=True)
            # Checked against the whole model at the node; here a PipeFusion stage keeps only its own blocks' patches.
            self._files[file_key] = map_lora(self._model, state_dict, Path(ref.path).name, require_match=False).patches
            while len(self._files) > CACHED_FILES:
                self._files.popitem(last=False)
        return self._files[file_key]

    def describe(self) -> list[str]:
        return [f"{Path(ref.path).name}@{ref.strength:g}" for ref in self.stack or ()]
