"""parallel_core.weight_shards: any block splits over any number of ranks, and gathers back bit for bit."""
from __future__ import annotations

import pytest
import torch

import weight_shard_cases
from parallel_core.local_launch import run_on_ranks
from parallel_core.weight_shards import ALIGN, BlockLayout

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7, 64])
def test_pieces_cover_every_byte_once_and_rebuild_the_tensors(parts):
    block = weight_shard_cases.tensors(0)
    layout = BlockLayout.of([(n, t.shape, t.dtype) for n, t in block.items()], parts)
    assert layout.piece_bytes % ALIGN == 0 and layout.total_bytes >= layout.data_bytes
    assert all(slot.offset % ALIGN == 0 for slot in layout.slots)
    pieces = [layout.piece(r, lambda slot, first, end: block[slot.name].reshape(-1)[first:end]) for r in range(parts)]
    whole = layout.views(torch.cat(pieces))
    for name, tensor in block.items():
        assert torch.equal(whole[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    covered = sum(part.end - part.first for r in range(parts) for part in layout.overlaps(r))
    assert covered == sum(t.numel() for t in block.values())


def test_write_read_restore_touch_only_the_ranks_part():
    block = weight_shard_cases.tensors(1)
    layout = BlockLayout.of([(n, t.shape, t.dtype) for n, t in block.items()], 3)
    piece = layout.piece(1, lambda slot, first, end: block[slot.name].reshape(-1)[first:end])
    saved = layout.read(piece, 1, "w")
    layout.write(piece, 1, "w", torch.zeros(5, 7))
    assert not torch.equal(layout.read(piece, 1, "w"), saved) and layout.read(piece, 1, "w").count_nonzero() == 0
    layout.restore(piece, 1, "w", saved)
    assert torch.equal(layout.read(piece, 1, "w"), saved)


def test_gathered_blocks_are_bit_exact_and_at_most_two_are_whole():
    world_size = 3  # pieces of uneven fill, one of them mostly padding
    for by_prefetch in run_on_ranks(weight_shard_cases.gather_rank, world_size):
        for prefetch, result in by_prefetch.items():
            assert all(result["equal"]), result
            assert result["most_whole"] == (2 if prefetch else 1) and result["leftover"] == 0
            assert result["resident"] * world_size == result["total"]
            # Each rank sends its piece to every other rank once per block.
            assert result["bytes"] == result["resident"] * (world_size - 1)
