"""How a diffusion model's blocks divide into PipeFusion stages (shared by the pipeline, the stage loader and
validation). A family adapter names the module lists that hold its blocks, in execution order, and how their
compute is modelled (families.BlockCompute); parallel_core.stage_cuts chooses the cut."""
from __future__ import annotations

import functools

import torch

from parallel_core import BALANCES, DEFAULT_BALANCE, BlockProfile, Tokens, block_flops, cut_stages

from .errors import UnsupportedByXDiT

# Where a loaded ModelPatcher records the balance its stages were cut with (stage_loading.py), so the pipeline
# runs the cut the weights were loaded for; a whole model without it is cut with DEFAULT_BALANCE.
BALANCE_ATTACHMENT = "comfyui_xdit.pipefusion_balance"
# The loader's pipefusion_balance choices, each explained (parallel_core.stage_cuts has the rule).
BALANCE_TOOLTIP = ("how PipeFusion cuts the blocks into stages: balanced = even modelled compute while each worker holds at most "
                   "1/N + 5% of the block weights (default); memory = even block weights, the least memory per worker; speed = "
                   "even compute, whatever each worker holds (one may hold far more than 1/N); no effect without PipeFusion")
# The adapter's joint-attention layout as the compute model's attention kind.
_ATTENTION_KIND = {"front": "joint", "rear": "joint", "cross": "cross", "none": "image"}


class RemoteBlock(torch.nn.Module):
    """Stands in for a block another PipeFusion stage holds: no weights here, and the pipeline never calls it; it
    keeps the block's profile so every stage cuts the model the same way."""

    def __init__(self, profile: BlockProfile):
        super().__init__()
        self.profile = profile

    def forward(self, *args, **kwargs):
        raise RuntimeError("this block's weights are held by another PipeFusion stage; it runs there")


def blocks(diffusion_model: torch.nn.Module, containers: tuple[str, ...]) -> list[torch.nn.Module]:
    """Every transformer block in execution order: the containers' blocks, one container after the other."""
    return [block for name in containers for block in getattr(diffusion_model, name)]


def container_and_index(diffusion_model: torch.nn.Module, containers: tuple[str, ...], index: int) -> tuple[str, int]:
    """(container name, position in it) of block `index` in execution order."""
    for name in containers:
        count = len(getattr(diffusion_model, name))
        if index < count:
            return name, index
        index -= count
    raise IndexError(f"block {index} is past the model's last block")


def block_parameters(block: torch.nn.Module) -> int:
    if isinstance(block, RemoteBlock):
        return block.profile.parameters
    return sum(p.numel() for p in block.parameters())


def _is_linear(module: torch.nn.Module) -> bool:
    # ComfyUI's quantized layers are not torch.nn.Linear subclasses but keep its shape attributes.
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)


def block_profile(block: torch.nn.Module, diffusion_model: torch.nn.Module, adapter) -> BlockProfile:
    """The block's parameters, its linear layers' multiply-adds per token by the stream each runs on (the adapter's
    BlockCompute.streams, by module name; every token otherwise), and its attention (the adapter's layout and width)."""
    if isinstance(block, RemoteBlock):
        return block.profile
    compute = adapter.block_compute
    macs: dict[str, int] = {}
    for name, module in block.named_modules():
        if _is_linear(module):
            stream = next((s for prefix, s in compute.streams if name.startswith(prefix)), "all")
            macs[stream] = macs.get(stream, 0) + module.in_features * module.out_features
    width = functools.reduce(getattr, compute.width_attribute.split("."), diffusion_model)
    return BlockProfile(block_parameters(block), tuple(sorted(macs.items())), _ATTENTION_KIND[adapter.joint_attention], int(width))


def profiles(diffusion_model: torch.nn.Module, adapter) -> list[BlockProfile]:
    """block_profile of every block, in execution order."""
    return [block_profile(b, diffusion_model, adapter) for b in blocks(diffusion_model, adapter.block_containers)]


def reference_tokens(adapter) -> Tokens:
    """The job size stages are cut for: they are cut once, when the model loads, before any job's size is known."""
    image, text = adapter.block_compute.reference_tokens
    return Tokens(image=image, text=text)


def stage_plan(diffusion_model: torch.nn.Module, adapter, stages: int, balance: str = DEFAULT_BALANCE) -> list[range]:
    """Block indices (see `blocks`) of each stage, cut by `balance` (parallel_core.stage_cuts.BALANCES) with
    compute modelled at the adapter's reference job size."""
    every = profiles(diffusion_model, adapter)
    tokens = reference_tokens(adapter)
    return cut_stages([p.parameters for p in every], [block_flops(p, tokens) for p in every], stages, balance)


def balance_of(model_patcher) -> str:
    """The balance the model's stages were loaded with (DEFAULT_BALANCE for a whole model)."""
    return model_patcher.get_attachment(BALANCE_ATTACHMENT) or DEFAULT_BALANCE


def check_balance(balance: str) -> None:
    """Raise, naming the choices, unless `balance` is one of the loader's pipefusion_balance values."""
    if balance not in BALANCES:
        raise UnsupportedByXDiT(f"pipefusion_balance must be one of {', '.join(BALANCES)}, got {balance!r}")
