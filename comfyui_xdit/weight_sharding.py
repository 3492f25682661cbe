"""The loader's weight_sharding "blocks": each rank keeps 1/P of every transformer block's weights (P = the world:
every rank of a ulysses/ring/cfg/data/patch pool runs every block in the same order) and gathers a block whole just
before it runs, one block ahead (parallel_core.weight_shards), dropping it after.

The blocks come from the family adapter (block_containers). Each block parameter stays the same nn.Parameter object,
holding an empty tensor at rest; forward pre/post hooks on the block modules point it at the gathered bytes and back.
An APPLY_MODEL wrapper on the parallel clone (`wrap`) counts the gathers in the job's CommStats and leaves no gather
in flight when a call ends or fails. A LoRA is merged block by block into each rank's own piece (lora_merge.py,
through `whole`, `read`, `restore` and `write`): the block is gathered whole, ComfyUI computes the merged weight as
stock does, and each rank keeps its part. Under CFG parallel a rank that owns no cond runs one anyway
(cfg_parallel.py), so every rank gathers the same blocks in the same order.

`load_sharded` reads only this rank's part of each block tensor from the safetensors file (whole rows around it);
the layers outside the blocks are read whole.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from parallel_core import CommStats, DimensionGroup, ParallelState
from parallel_core.weight_shards import BlockGatherer, BlockLayout, TensorSlot

from .block_stages import blocks
from .errors import UnsupportedByXDiT
from .families import adapter_for
from .safetensors_files import open_safetensors
from .shell_model import detect, meta_state_dict, unet_prefix

CHOICES = ("none", "blocks")
ATTACHMENT = "comfyui_xdit.sharded_blocks"
WRAPPER_KEY = "comfyui_xdit.weight_sharding"
_MODEL_PREFIX = "diffusion_model."


def check_choice(weight_sharding: str, pipefusion_degree: int = 1) -> None:
    """Refuse a value the loader does not offer, and sharding on top of PipeFusion's stages."""
    if weight_sharding not in CHOICES:
        raise UnsupportedByXDiT(f"weight_sharding must be one of {', '.join(CHOICES)}, got {weight_sharding!r}")
    if weight_sharding == "blocks" and pipefusion_degree > 1:
        raise UnsupportedByXDiT(f"weight_sharding 'blocks' cannot be combined with pipefusion_degree {pipefusion_degree}: "
                                f"each PipeFusion stage already holds only its own blocks; set weight_sharding to none "
                                f"or pipefusion_degree to 1")


def world_group() -> DimensionGroup:
    """Every rank of the pool, as the group weights are sharded over."""
    if not (dist.is_available() and dist.is_initialized()):
        return DimensionGroup("world", 0, 1, (0,))
    size = dist.get_world_size()
    return DimensionGroup("world", dist.get_rank(), size, tuple(range(size)), dist.group.WORLD if size > 1 else None)


def _block_containers(model) -> tuple[str, ...]:
    adapter = adapter_for(model)
    if not adapter.block_containers:
        raise UnsupportedByXDiT(f"{adapter.family_name(model)} has no transformer blocks XDiT knows of to shard; "
                                f"set weight_sharding to none")
    return adapter.block_containers


class ShardedBlocks:
    """A model's blocks with their parameters sharded over `group`, gathered around each block's forward."""

    def __init__(self, diffusion_model: torch.nn.Module, containers: tuple[str, ...], group: DimensionGroup,
                 pieces: list[torch.Tensor], layouts: list[BlockLayout]):
        self.group, self.containers = group, containers
        self.prefetch = True
        self.gatherer = BlockGatherer(layouts, pieces, group, CommStats())
        self._params: list[list[tuple[str, torch.nn.Parameter]]] = []
        self._where: dict[str, tuple[int, str]] = {}  # model key -> (block index, name in the block)
        names = [f"{c}.{i}." for c in containers for i in range(len(getattr(diffusion_model, c)))]
        for index, (block, prefix) in enumerate(zip(blocks(diffusion_model, containers), names)):
            params = list(block.named_parameters())
            if [name for name, _ in params] != [slot.name for slot in layouts[index].slots]:
                raise ValueError(f"block {prefix!r}: its parameters are not the ones its pieces were cut from")
            self._params.append(params)
            for name, _ in params:
                self._where[f"{_MODEL_PREFIX}{prefix}{name}"] = (index, name)
            block.register_forward_pre_hook(lambda module, args, i=index: self._gathered(i))
            block.register_forward_hook(lambda module, args, output, i=index: self._released(i))
        for index in range(len(self._params)):
            self._point(index, None)

    def _point(self, index: int, whole: dict[str, torch.Tensor] | None) -> None:
        for name, param in self._params[index]:
            param.data = whole[name] if whole is not None else param.data.new_empty(0)

    def _gathered(self, index: int) -> None:
        self._point(index, self.gatherer.before(index))

    def _released(self, index: int) -> None:
        self._point(index, None)
        self.gatherer.release(index)

    def reset(self) -> None:
        """No block whole and nothing in flight (after a model call, or one that failed part-way)."""
        self.gatherer.reset()
        for index in range(len(self._params)):
            self._point(index, None)

    @contextlib.contextmanager
    def counted_in(self, stats: CommStats) -> Iterator[None]:
        """One model call: gathers counted in `stats` (and prefetched unless `prefetch` was turned off, for
        benchmarks); nothing whole or in flight afterwards."""
        self.gatherer.stats, self.gatherer.prefetch = stats, self.prefetch
        try:
            yield
        finally:
            self.reset()

    def holds(self, key: str) -> bool:
        return key in self._where

    def block_of(self, key: str) -> int:
        return self._where[key][0]

    def read(self, key: str) -> torch.Tensor:
        """A copy of this rank's bytes of weight `key`."""
        index, name = self._where[key]
        return self.gatherer.layouts[index].read(self.gatherer.pieces[index], self.group.rank, name)

    def restore(self, key: str, saved: torch.Tensor) -> None:
        index, name = self._where[key]
        self.gatherer.layouts[index].restore(self.gatherer.pieces[index], self.group.rank, name, saved)

    def write(self, key: str, whole: torch.Tensor) -> None:
        """Keep this rank's part of `whole`, the new value of weight `key`."""
        index, name = self._where[key]
        self.gatherer.layouts[index].write(self.gatherer.pieces[index], self.group.rank, name, whole)

    @contextlib.contextmanager
    def whole(self, index: int) -> Iterator[None]:
        """Block `index`'s parameters whole while inside (every rank enters for the same blocks, in the same order)."""
        self.gatherer.prefetch = False
        try:
            self._gathered(index)
            yield
        finally:
            self._released(index)
            self.gatherer.prefetch = self.prefetch

    def resident_bytes(self) -> int:
        return self.gatherer.resident_bytes()

    def block_bytes(self) -> int:
        """Bytes of every block's weights, whole."""
        return sum(layout.data_bytes for layout in self.gatherer.layouts)

    def largest_block_bytes(self) -> int:
        return max((layout.total_bytes for layout in self.gatherer.layouts), default=0)


def sharded_blocks(model_patcher) -> ShardedBlocks | None:
    return model_patcher.attachments.get(ATTACHMENT)


def _layout(block: torch.nn.Module, parts: int) -> BlockLayout:
    return BlockLayout.of([(name, p.shape, p.dtype) for name, p in block.named_parameters()], parts)


def _attach(model_patcher, containers: tuple[str, ...], group: DimensionGroup, pieces, layouts):
    sharded = ShardedBlocks(model_patcher.model.diffusion_model, containers, group, pieces, layouts)
    model_patcher.set_attachments(ATTACHMENT, sharded)
    return model_patcher


def shard_loaded(model_patcher, group: DimensionGroup):
    """Shard the blocks of a model loaded whole (e.g. built in-process): this rank keeps its pieces, the whole
    block weights are freed. Returns the same ModelPatcher."""
    model = model_patcher.model
    containers = _block_containers(model)
    device = comfy.model_management.get_torch_device()
    layouts, pieces = [], []
    for block in blocks(model.diffusion_model, containers):
        layout = _layout(block, group.size)
        values = dict(block.named_parameters())
        layouts.append(layout)
        pieces.append(layout.piece(group.rank, lambda slot, first, end, v=values: v[slot.name].detach().reshape(-1)[first:end], device))
    return _attach(model_patcher, containers, group, pieces, layouts)


def _block_keys(diffusion_model: torch.nn.Module, containers: tuple[str, ...]) -> list[str]:
    return [f"{c}.{i}.{name}" for c in containers for i, block in enumerate(getattr(diffusion_model, c)) for name, _ in block.named_parameters()]


def check_shardable(path: str | Path, weight_dtype: str, shell=None) -> dict[str, str]:
    """Refuse, from the file's header alone, a model whose blocks `load_sharded` cannot read in pieces: a quantized
    file, a family without known blocks, or one whose loader converts block weights (a rename, as Flux's
    `*_norm.scale` -> `*_norm.weight`, is followed). Returns each block weight's key in the file, by its name in the
    model. `shell`: the file's model with meta weights, if already built."""
    header, metadata = meta_state_dict(path)
    if any(key.endswith(("scaled_fp8", ".comfy_quant")) for key in header) or "_quantization_metadata" in (metadata or {}):
        raise UnsupportedByXDiT(f"{Path(path).name} is a quantized checkpoint (scaled fp8 or a mixed-precision format), which weight_sharding 'blocks' "
                                f"does not read in pieces yet; use the full-precision file or set weight_sharding to none")
    config, meta_state, _, _ = detect(path, weight_dtype)
    model = shell.model if shell is not None else config.get_model(meta_state, "", device=torch.device("meta"))
    block_keys = _block_keys(model.diffusion_model, _block_containers(model))
    prefix = unet_prefix(header)
    named = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}
    origin = {id(v): prefix + k for k, v in named.items()}  # ComfyUI's conversion passes untouched tensors through
    processed = config.process_unet_state_dict(dict(named))
    in_file = {k: origin.get(id(processed[k])) for k in block_keys if k in processed}
    changed = [k for k in block_keys if in_file.get(k) is None]
    if changed:
        raise UnsupportedByXDiT(f"{Path(path).name}: ComfyUI converts its block weights while loading (e.g. {changed[0]!r}), "
                                f"so weight_sharding 'blocks' cannot read them in pieces; set weight_sharding to none")
    return in_file


def load_sharded(path: str | Path, weight_dtype: str, group: DimensionGroup) -> comfy.model_patcher.ModelPatcher:
    """The file's model (as UNETLoader loads it) with its blocks sharded over `group`, reading from the file only
    this rank's part of each block tensor (the whole rows it falls in) and the other layers whole."""
    in_file = check_shardable(path, weight_dtype)
    load_device = comfy.model_management.get_torch_device()
    config, meta_state, _, _ = detect(path, weight_dtype, load_device)
    model = config.get_model(meta_state, "", device=torch.device("meta"))
    diffusion_model = model.diffusion_model
    containers = _block_containers(model)
    prefix = unet_prefix(meta_state_dict(path)[0])
    block_file_keys = set(in_file.values())
    kept: dict[tuple[str, int], torch.nn.Module] = {}
    for container in containers:  # out of the model while the other layers are allocated and loaded
        modules = getattr(diffusion_model, container)
        for position in range(len(modules)):
            kept[(container, position)] = modules[position]
            modules[position] = torch.nn.Identity()
    offload_device = comfy.model_management.unet_offload_device()
    diffusion_model.to_empty(device=offload_device)
    layouts, pieces = [], []
    with open_safetensors(path, "diffusion model") as f:
        needed = set(diffusion_model.state_dict())
        weights = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and k not in block_file_keys}
        missing = sorted(needed - set(config.process_unet_state_dict(dict(weights))))
        if missing:
            raise RuntimeError(f"{Path(path).name}: no weights in the file for {missing[:3]}; it does not load as this model")
        model.load_model_weights(weights, "")
        for (container, position), block in kept.items():
            layout = _layout(block, group.size)
            name_prefix = f"{container}.{position}."
            for name, buffer in block.named_buffers():
                raise UnsupportedByXDiT(f"{Path(path).name}: block {container}.{position} keeps a buffer ({name}) that "
                                        f"weight_sharding 'blocks' does not load; set weight_sharding to none")
            pieces.append(layout.piece(group.rank, _file_reader(f, lambda name, p=name_prefix: in_file[p + name]), load_device))
            layouts.append(layout)
            for module in block.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None:
                        module._parameters[name] = torch.nn.Parameter(torch.empty(0, dtype=param.dtype, device=offload_device), requires_grad=False)
            getattr(diffusion_model, container)[position] = block
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    return _attach(patcher, containers, group, pieces, layouts)


def _file_reader(f, file_key: Callable[[str], str]) -> Callable[[TensorSlot, int, int], torch.Tensor]:
    """Elements [first, end) of a flattened block tensor in the file (`file_key` maps its name in the block to its
    key in the file), reading only the whole rows that hold them."""

    def read(slot: TensorSlot, first: int, end: int) -> torch.Tensor:
        key = file_key(slot.name)
        if len(slot.shape) == 0:
            return f.get_tensor(key).reshape(-1)[first:end]
        row = slot.numel // slot.shape[0]
        low, high = first // row, -(-end // row)
        return f.get_slice(key)[low:high].reshape(-1)[first - low * row:end - low * row]

    return read


def wrap(model_patcher, state: ParallelState, check_only: bool = False) -> None:
    """Count a sharded model's gathers in `state`'s CommStats, for each call of the parallel clone `model_patcher`;
    refuse PipeFusion (its stages hold their own blocks). `check_only`: refuse, add nothing."""
    sharded = sharded_blocks(model_patcher)
    if sharded is None:
        return
    check_choice("blocks", state.config.pipefusion_degree)
    if sharded.group.size != state.world_size:
        raise UnsupportedByXDiT(f"these weights were sharded over {sharded.group.size} ranks but the pool runs {state.world_size}; load the model again")
    if check_only:
        return

    def apply_model(executor, *args, **kwargs):
        with sharded.counted_in(state.comm):
            return executor(*args, **kwargs)

    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
