"""How Flux's blocks divide into PipeFusion stages (shared by the pipeline, the stage loader and validation)."""
from __future__ import annotations

import torch

from parallel_core import partition_stages


class RemoteBlock(torch.nn.Module):
    """Stands in for a block another PipeFusion stage holds: no weights here, and the pipeline never calls it."""

    def __init__(self, parameters: int):
        super().__init__()
        self.parameters_elsewhere = parameters

    def forward(self, *args, **kwargs):
        raise RuntimeError("this Flux block's weights are held by another PipeFusion stage; it runs there")


def blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every transformer block in execution order: double blocks, then single blocks."""
    return list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)


def block_parameters(block: torch.nn.Module) -> int:
    if isinstance(block, RemoteBlock):
        return block.parameters_elsewhere
    return sum(p.numel() for p in block.parameters())


def stage_plan(diffusion_model: torch.nn.Module, stages: int) -> list[range]:
    """Block indices (see `blocks`) of each stage, balanced by parameters."""
    return partition_stages([block_parameters(b) for b in blocks(diffusion_model)], stages)
