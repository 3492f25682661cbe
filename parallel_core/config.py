"""Parallel degrees of one job and their validation."""
from __future__ import annotations

from dataclasses import dataclass, fields

# Outermost first: the rank layout `init_parallel` builds (see state.py).
DIMENSIONS: tuple[str, ...] = ("data", "cfg", "pipefusion", "patch", "ring", "ulysses")
# Patch parallelism (DistriFusion-style, displaced) shares out the sequence the way Ulysses/Ring do, but with stale
# keys/values: it replaces them rather than nesting with them (stale_kv.py).
_EXCLUSIVE_WITH_PATCH = ("ulysses_degree", "ring_degree", "pipefusion_degree")


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks each parallel dimension uses; their product is the world size."""

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    pipefusion_degree: int = 1
    data_degree: int = 1
    patch_degree: int = 1

    def degree(self, dimension: str) -> int:
        """Degree of `dimension` (one of DIMENSIONS)."""
        if dimension not in DIMENSIONS:
            raise ValueError(f"unknown parallel dimension {dimension!r}; expected one of {', '.join(DIMENSIONS)}")
        return getattr(self, f"{dimension}_degree")

    @property
    def sequence_degree(self) -> int:
        """Ranks that share one sequence: Ulysses x Ring."""
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        size = 1
        for dimension in DIMENSIONS:
            size *= self.degree(dimension)
        return size

    def describe(self) -> str:
        """'ulysses_degree 2 × ring_degree 2' style product of the degrees that are not 1."""
        parts = [f"{f.name} {getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != 1]
        return " × ".join(parts) if parts else "all degrees 1"

    def validate(self, world_size: int, num_heads: int | None = None) -> None:
        """Raise ValueError, saying what to change, unless this config can run on `world_size` ranks.

        A Ulysses degree that does not divide `num_heads` is allowed: attention pads the heads with zero heads
        (exact, at the cost of computing the padding), see usp.py.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a whole number >= 1, got {value!r}; set it to 1 to disable it")
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if self.world_size != world_size:
            raise ValueError(
                f"{self.describe()} = {self.world_size}, but {world_size} ranks are running; "
                f"choose degrees whose product is {world_size} (or run {self.world_size} ranks)"
            )
        if self.patch_degree > 1:
            clashing = [name for name in _EXCLUSIVE_WITH_PATCH if getattr(self, name) > 1]
            if clashing:
                raise ValueError(
                    f"patch_degree {self.patch_degree} (displaced patch parallel) cannot be combined with "
                    f"{', '.join(f'{n} {getattr(self, n)}' for n in clashing)}; set those to 1, or patch_degree to 1"
                )
        if num_heads is not None and num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
