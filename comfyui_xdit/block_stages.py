"""How a diffusion model's blocks divide into PipeFusion stages (shared by the pipeline, the stage loader and
validation). A family adapter names the module lists that hold its blocks, in execution order."""
from __future__ import annotations

import torch

from parallel_core import partition_stages


class RemoteBlock(torch.nn.Module):
    """Stands in for a block another PipeFusion stage holds: no weights here, and the pipeline never calls it."""

    def __init__(self, parameters: int):
        super().__init__()
        self.parameters_elsewhere = parameters

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
        return block.parameters_elsewhere
    return sum(p.numel() for p in block.parameters())


def stage_plan(diffusion_model: torch.nn.Module, containers: tuple[str, ...], stages: int) -> list[range]:
    """Block indices (see `blocks`) of each stage, balanced by parameters."""
    return partition_stages([block_parameters(b) for b in blocks(diffusion_model, containers)], stages)
