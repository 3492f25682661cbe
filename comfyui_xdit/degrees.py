"""The loader's degree inputs (0 = auto): their names, tooltips and resolution into a ParallelConfig.

DEGREE_TOOLTIPS is the one list of degree inputs: the loader's inputs, tooltips and validation are made from it.
Its order is the loader's widget order: saved workflows store widget values by position, so a new degree is
appended at the end, never inserted.
"""
from __future__ import annotations

from collections.abc import Collection

from parallel_core import DIMENSIONS, ParallelConfig

AUTO = 0
DEFAULT_CPU_WORKERS = 2

DEGREE_TOOLTIPS: dict[str, str] = {
    "ulysses": "Ulysses sequence parallel (exact); 0 = auto",
    "ring": "Ring sequence parallel (exact); 0 = auto",
    "cfg": "positive and negative on separate workers (exact, any model); 0 = auto (1, or the rest of the world for models without sequence parallel)",
    "pipefusion": "PipeFusion stages: each worker holds only 1/N of the blocks; approximate after the sampler's warmup steps; 0 = auto (1)",
    "patch": "displaced patch parallel (DistriFusion-style), full model per worker; approximate after warmup, excludes ulysses/ring/pipefusion; 0 = auto (1)",
    "data": "the latent batch shared out over workers (exact, any model); 0 = auto (1)",
}
if set(DEGREE_TOOLTIPS) != set(DIMENSIONS):
    raise ImportError(f"DEGREE_TOOLTIPS must name every parallel dimension {DIMENSIONS}")
DEGREE_INPUTS: tuple[str, ...] = tuple(f"{name}_degree" for name in DEGREE_TOOLTIPS)


def resolve_world_size(world_size: int, visible_gpus: int) -> int:
    """0 = every visible GPU, or DEFAULT_CPU_WORKERS CPU workers where there is none."""
    if world_size < 0:
        raise ValueError(f"world_size must be 0 (auto) or a positive number of workers, got {world_size}")
    if world_size:
        return world_size
    return visible_gpus if visible_gpus > 0 else DEFAULT_CPU_WORKERS


def resolve_degrees(world_size: int, num_heads: int | None, ulysses: int = AUTO, ring: int = AUTO, cfg: int = AUTO,
                    pipefusion: int = AUTO, patch: int = AUTO, data: int = AUTO,
                    supported: Collection[str] = DIMENSIONS) -> ParallelConfig:
    """Fill the auto (0) degrees: CFG, PipeFusion, patch and data parallel default to 1; what remains of the world
    goes to sequence parallelism, as much Ulysses as divides the heads (cheapest), the rest Ring (none of it with
    patch parallel, which replaces them). A model without sequence parallel (`supported`, the dimensions its
    family takes) gives the rest to CFG if that is auto, else to data. num_heads None = not known yet (input
    validation before the file is read): only the product is checked."""
    named = {"ulysses_degree": ulysses, "ring_degree": ring, "cfg_degree": cfg, "pipefusion_degree": pipefusion,
             "patch_degree": patch, "data_degree": data}
    for name, value in named.items():
        if value < 0:
            raise ValueError(f"{name} must be 0 (auto) or >= 1, got {value}")
    rest_to = None
    if "ulysses" not in supported and "ring" not in supported:
        ulysses, ring = ulysses or 1, ring or 1
        rest_to = "cfg" if not cfg else "data" if not data else None
    cfg, pipefusion, patch, data = cfg or 1, pipefusion or 1, patch or 1, data or 1
    if patch > 1:
        ulysses, ring = ulysses or 1, ring or 1
    fixed = cfg * pipefusion * patch * data * (ulysses or 1) * (ring or 1)
    if world_size % fixed:
        given = " × ".join(f"{k} {v}" for k, v in named.items() if v) or "the degrees"
        raise ValueError(f"{given} = {fixed} does not divide world_size {world_size}; choose degrees whose product divides (or equals) {world_size}")
    rest = world_size // fixed
    if patch > 1 and rest > 1:
        raise ValueError(f"patch_degree {patch} × cfg_degree {cfg} × pipefusion_degree {pipefusion} covers {fixed} of world_size "
                         f"{world_size} workers, and patch parallel takes no Ulysses/Ring for the rest; raise patch_degree "
                         f"or cfg_degree so the product is {world_size}")
    if rest_to == "cfg":
        cfg *= rest
    elif rest_to == "data":
        data *= rest
    elif not ulysses and not ring:
        ulysses = max(d for d in range(1, rest + 1) if rest % d == 0 and (num_heads is None or num_heads % d == 0))
        ring = rest // ulysses
    elif not ulysses:
        ulysses = rest
    elif not ring:
        ring = rest
    config = ParallelConfig(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg, pipefusion_degree=pipefusion,
                            patch_degree=patch, data_degree=data)
    if config.world_size != world_size:
        product = " × ".join(f"{name} {getattr(config, name)}" for name in named)
        raise ValueError(f"{product} = {config.world_size}, but world_size is {world_size}; "
                         f"set a degree to 0 (auto) or make their product {world_size}")
    config.validate(world_size, num_heads)
    return config
