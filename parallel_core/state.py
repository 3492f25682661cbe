"""Process groups of every parallel dimension, built once and passed explicitly.

Rank layout (outermost to innermost): data, cfg, pipefusion, patch, ring, ulysses. A global rank is the
mixed-radix number (data, cfg, pipefusion, patch, ring, ulysses) with Ulysses varying fastest, so:
- the sequence-parallel ranks of one sequence are contiguous, and inside them each Ulysses group is contiguous:
  the all-to-all, the heaviest collective, stays among neighbouring devices (same node, fastest links);
- ring neighbours are one Ulysses group apart; CFG and data, which talk once per step, are outermost;
- a PipeFusion stage (one pipefusion rank) is a contiguous block of sequence-parallel ranks, and the ranks that
  pass a patch from stage to stage hold the same sequence shard.
Example, world 8 = data 1 × cfg 2 × pipefusion 1 × ring 2 × ulysses 2: ranks 0-3 hold the conditional branch
(ulysses groups {0,1} and {2,3}, ring groups {0,2} and {1,3}), ranks 4-7 the unconditional one; cfg groups are
{0,4}, {1,5}, {2,6}, {3,7}.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch.distributed as dist

from .attention_kernels import resolve_backend_name
from .comm import CommStats, DimensionGroup
from .config import DIMENSIONS, ParallelConfig

# Dimension sets that get a group: each single dimension, plus the sequence-parallel pair.
_GROUP_DIMENSIONS: dict[str, tuple[str, ...]] = {**{d: (d,) for d in DIMENSIONS}, "sequence": ("ring", "ulysses")}


@dataclass
class ParallelState:
    """One rank's place in the job: a DimensionGroup per dimension plus per-job bookkeeping.

    `lengths` records the true (unpadded) length of the last tensor split per kind ("sequence", "cfg", "data") so
    that attention can ignore padded keys and gathers can trim padding; pass explicit lengths to override it.
    """

    config: ParallelConfig
    rank: int
    world_size: int
    ulysses: DimensionGroup
    ring: DimensionGroup
    sequence: DimensionGroup
    cfg: DimensionGroup
    pipefusion: DimensionGroup
    patch: DimensionGroup
    data: DimensionGroup
    attention_backend: str = "auto"
    comm: CommStats = field(default_factory=CommStats)
    lengths: dict[str, int] = field(default_factory=dict)

    def group_of(self, dimension: str) -> DimensionGroup:
        if dimension not in _GROUP_DIMENSIONS:
            raise ValueError(f"unknown dimension {dimension!r}; expected one of {', '.join(_GROUP_DIMENSIONS)}")
        return getattr(self, dimension)


def _coordinates(rank: int, degrees: tuple[int, ...]) -> tuple[int, ...]:
    coords = []
    for degree in reversed(degrees):
        coords.append(rank % degree)
        rank //= degree
    return tuple(reversed(coords))


def _rank_of(coords: tuple[int, ...], degrees: tuple[int, ...]) -> int:
    rank = 0
    for coord, degree in zip(coords, degrees):
        rank = rank * degree + coord
    return rank


def rank_groups(config: ParallelConfig, dimensions: tuple[str, ...]) -> list[tuple[int, ...]]:
    """Every group of global ranks that differ only along `dimensions`, each in group-rank order."""
    degrees = tuple(config.degree(d) for d in DIMENSIONS)
    varying = [i for i, d in enumerate(DIMENSIONS) if d in dimensions]
    fixed = [i for i in range(len(DIMENSIONS)) if i not in varying]
    groups = []
    for fixed_coords in itertools.product(*(range(degrees[i]) for i in fixed)):
        members = []
        for varying_coords in itertools.product(*(range(degrees[i]) for i in varying)):
            coords = [0] * len(DIMENSIONS)
            for i, c in zip(fixed, fixed_coords):
                coords[i] = c
            for i, c in zip(varying, varying_coords):
                coords[i] = c
            members.append(_rank_of(tuple(coords), degrees))
        groups.append(tuple(members))
    return groups


def init_parallel(config: ParallelConfig, attention_backend: str = "auto", num_heads: int | None = None) -> ParallelState:
    """Build the ParallelState of this rank from the already-initialised default process group.

    Every rank must call this with the same config (group creation is collective). With world size 1 no process
    group is needed.
    """
    initialised = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialised else 1
    rank = dist.get_rank() if initialised else 0
    config.validate(world_size, num_heads)
    resolve_backend_name(attention_backend)  # fail early on a misspelt backend
    views: dict[str, DimensionGroup] = {}
    for name, dimensions in _GROUP_DIMENSIONS.items():
        mine: DimensionGroup | None = None
        for members in rank_groups(config, dimensions):
            # new_group is collective: every rank creates every multi-rank group, in the same order.
            group = dist.new_group(list(members)) if len(members) > 1 else None
            if rank in members:
                mine = DimensionGroup(name, members.index(rank), len(members), members, group)
        assert mine is not None
        views[name] = mine
    return ParallelState(config=config, rank=rank, world_size=world_size, attention_backend=attention_backend, **views)
