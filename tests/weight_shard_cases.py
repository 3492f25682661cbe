"""Rank-side checks of parallel_core.weight_shards on real gloo groups (no ComfyUI)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel_core import CommStats, DimensionGroup
from parallel_core.weight_shards import BlockGatherer, BlockLayout

# A block of mixed dtypes and odd sizes: fp32, bf16, fp8 (carried as bytes) and a single scalar.
SHAPES = (("w", (5, 7), torch.float32), ("b", (3,), torch.bfloat16), ("q", (11, 2), torch.float8_e4m3fn), ("s", (), torch.float32))


def tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape, dtype in SHAPES}


def gather_rank(rank: int, world_size: int) -> dict:
    """With and without prefetch, in one process group."""
    return {prefetch: _gather(rank, world_size, prefetch) for prefetch in (True, False)}


def _gather(rank: int, world_size: int, prefetch: bool) -> dict:
    group = DimensionGroup("world", rank, world_size, tuple(range(world_size)), dist.group.WORLD)
    stats = CommStats()
    blocks = [tensors(seed) for seed in range(3)]
    layouts = [BlockLayout.of([(n, t.shape, t.dtype) for n, t in block.items()], world_size) for block in blocks]
    pieces = [layout.piece(rank, lambda slot, first, end, b=block: b[slot.name].reshape(-1)[first:end]) for layout, block in zip(layouts, blocks)]
    gatherer = BlockGatherer(layouts, pieces, group, stats, prefetch=prefetch)
    equal, most_whole = [], 0
    for index, block in enumerate(blocks):
        whole = gatherer.before(index)
        most_whole = max(most_whole, gatherer.whole_blocks)
        equal.append(all(torch.equal(whole[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)) for n, t in block.items()))
        gatherer.release(index)
    gatherer.reset()
    return {"equal": equal, "most_whole": most_whole, "bytes": stats.bytes_sent(), "resident": gatherer.resident_bytes(),
            "total": sum(layout.total_bytes for layout in layouts), "leftover": gatherer.whole_blocks}
