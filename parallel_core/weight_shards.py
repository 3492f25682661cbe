"""Blocks' weights sharded over ranks (FSDP-style) and gathered whole just before a block runs.

One block's parameters lie back to back in one byte buffer, each at an ALIGN-byte offset (so a view of any dtype
starts aligned), padded to a multiple of parts × ALIGN bytes and cut into `parts` equal pieces: rank r keeps piece r.
Any block splits over any number of ranks this way (a piece may be all padding). Gathering copies bytes, so the
whole weights are bit for bit the ones that were sharded, in any dtype (fp8 included: the wire carries uint8).

BlockGatherer runs the schedule: before block i runs, its gather is waited for (started then if no prefetch did)
and block i+1's gather is started, so it travels while block i computes; after block i, its whole weights go.
At most two blocks are whole at once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .comm import CommStats, DimensionGroup, PendingGatherInto

ALIGN = 16  # bytes; a multiple of every dtype's size, so piece edges fall between elements


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor of a block lies in the block's byte buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Overlap:
    """The part of a tensor inside one rank's piece: its elements [first, end) of the flattened tensor, at byte
    `at` of the piece."""

    slot: TensorSlot
    first: int
    end: int
    at: int


@dataclass(frozen=True)
class BlockLayout:
    slots: tuple[TensorSlot, ...]
    parts: int
    piece_bytes: int

    @classmethod
    def of(cls, tensors: Sequence[tuple[str, Sequence[int], torch.dtype]], parts: int) -> BlockLayout:
        """The layout of (name, shape, dtype) tensors, in that order, split into `parts` pieces."""
        if parts < 1:
            raise ValueError(f"a block's weights split into at least 1 piece, got {parts}")
        slots, offset = [], 0
        for name, shape, dtype in tensors:
            slot = TensorSlot(name, tuple(int(s) for s in shape), dtype, offset)
            slots.append(slot)
            offset = _aligned(offset + slot.nbytes)
        piece = _aligned(-(-offset // parts))
        return cls(tuple(slots), parts, piece)

    @property
    def total_bytes(self) -> int:
        return self.piece_bytes * self.parts

    @property
    def data_bytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots)

    def overlaps(self, rank: int) -> list[Overlap]:
        """The parts of each tensor that rank `rank`'s piece holds, in slot order."""
        start, stop = rank * self.piece_bytes, (rank + 1) * self.piece_bytes
        found = []
        for slot in self.slots:
            low, high = max(slot.offset, start), min(slot.offset + slot.nbytes, stop)
            if low < high:
                found.append(Overlap(slot, (low - slot.offset) // slot.itemsize, (high - slot.offset) // slot.itemsize, low - start))
        return found

    def piece(self, rank: int, read: Callable[[TensorSlot, int, int], torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """Rank `rank`'s piece (uint8), filled by read(slot, first, end): elements [first, end) of the flattened
        tensor, in any dtype (cast to the slot's as a state-dict load casts)."""
        piece = torch.zeros(self.piece_bytes, dtype=torch.uint8, device=device)
        for part in self.overlaps(rank):
            values = read(part.slot, part.first, part.end).reshape(-1).to(device=device, dtype=part.slot.dtype)
            piece[part.at:part.at + values.numel() * part.slot.itemsize].copy_(values.view(torch.uint8))
        return piece

    def write(self, piece: torch.Tensor, rank: int, name: str, whole: torch.Tensor) -> None:
        """Put rank `rank`'s part of tensor `name`, given whole, into its piece."""
        flat = whole.reshape(-1)
        for part in self.overlaps(rank):
            if part.slot.name == name:
                values = flat[part.first:part.end].to(dtype=part.slot.dtype).contiguous()
                piece[part.at:part.at + values.numel() * part.slot.itemsize].copy_(values.view(torch.uint8))

    def read(self, piece: torch.Tensor, rank: int, name: str) -> torch.Tensor:
        """A copy of the bytes of tensor `name` that rank `rank`'s piece holds (empty if none)."""
        for part in self.overlaps(rank):
            if part.slot.name == name:
                return piece[part.at:part.at + (part.end - part.first) * part.slot.itemsize].clone()
        return piece[:0].clone()

    def restore(self, piece: torch.Tensor, rank: int, name: str, saved: torch.Tensor) -> None:
        """Put back bytes `read` returned."""
        for part in self.overlaps(rank):
            if part.slot.name == name:
                piece[part.at:part.at + saved.numel()].copy_(saved)

    def views(self, whole: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor as a view of the gathered buffer (total_bytes uint8)."""
        return {s.name: whole[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots}


class BlockGatherer:
    """Whole weights of sharded blocks on demand, over `group` (every rank runs the same blocks in the same order).

    before(i) returns block i's tensors whole; release(i) drops them. With `prefetch`, before(i) also starts block
    i+1's gather. Gathers are recorded in `stats` as ("all_gather", group name) bytes sent.
    """

    def __init__(self, layouts: Sequence[BlockLayout], pieces: Sequence[torch.Tensor], group: DimensionGroup,
                 stats: CommStats, prefetch: bool = True):
        if len(layouts) != len(pieces):
            raise ValueError(f"{len(layouts)} block layouts for {len(pieces)} pieces")
        for layout in layouts:
            if layout.parts != group.size:
                raise ValueError(f"a block split into {layout.parts} pieces cannot be gathered over {group.size} ranks")
        self.layouts, self.pieces, self.group = list(layouts), list(pieces), group
        self.stats, self.prefetch = stats, prefetch
        self._pending: dict[int, PendingGatherInto] = {}
        self._whole: dict[int, dict[str, torch.Tensor]] = {}

    def _start(self, index: int) -> None:
        if index in self._pending or index in self._whole:
            return
        piece = self.pieces[index]
        if self.group.size == 1:
            self._whole[index] = self.layouts[index].views(piece)
            return
        whole = torch.empty(self.layouts[index].total_bytes, dtype=torch.uint8, device=piece.device)
        self._pending[index] = PendingGatherInto(whole, piece, self.group, self.stats)

    def before(self, index: int) -> dict[str, torch.Tensor]:
        self._start(index)
        if index in self._pending:
            self._whole[index] = self.layouts[index].views(self._pending.pop(index).wait())
        if self.prefetch and index + 1 < len(self.layouts):
            self._start(index + 1)
        return self._whole[index]

    def release(self, index: int) -> None:
        self._whole.pop(index, None)

    def reset(self) -> None:
        """Wait for gathers in flight (every rank started them) and drop every whole block."""
        for pending in self._pending.values():
            pending.wait()
        self._pending.clear()
        self._whole.clear()

    @property
    def whole_blocks(self) -> int:
        """Blocks whole or on their way now (the schedule keeps this at two or fewer)."""
        return len(self._whole) + len(self._pending)

    def resident_bytes(self) -> int:
        return sum(p.numel() for p in self.pieces)
