"""Turn the loader's degree inputs (0 = auto) into a ParallelConfig for a world size."""
from __future__ import annotations

from parallel_core import ParallelConfig

AUTO = 0
DEFAULT_CPU_WORKERS = 2


def resolve_world_size(world_size: int, visible_gpus: int) -> int:
    """0 = every visible GPU, or DEFAULT_CPU_WORKERS CPU workers where there is none."""
    if world_size < 0:
        raise ValueError(f"world_size must be 0 (auto) or a positive number of workers, got {world_size}")
    if world_size:
        return world_size
    return visible_gpus if visible_gpus > 0 else DEFAULT_CPU_WORKERS


def resolve_degrees(world_size: int, num_heads: int | None, ulysses: int = AUTO, ring: int = AUTO, cfg: int = AUTO,
                    pipefusion: int = AUTO, patch: int = AUTO) -> ParallelConfig:
    """Fill the auto (0) degrees: CFG, PipeFusion and patch parallel default to 1; what remains of the world goes
    to sequence parallelism, as much Ulysses as divides the heads (cheapest), the rest Ring (none of it with
    patch parallel, which replaces them). num_heads None = not known yet (input validation before the file is
    read): only the product is checked."""
    named = {"ulysses_degree": ulysses, "ring_degree": ring, "cfg_degree": cfg, "pipefusion_degree": pipefusion,
             "patch_degree": patch}
    for name, value in named.items():
        if value < 0:
            raise ValueError(f"{name} must be 0 (auto) or >= 1, got {value}")
    cfg, pipefusion, patch = cfg or 1, pipefusion or 1, patch or 1
    if patch > 1:
        ulysses, ring = ulysses or 1, ring or 1
    fixed = cfg * pipefusion * patch * (ulysses or 1) * (ring or 1)
    if world_size % fixed:
        given = " × ".join(f"{k} {v}" for k, v in named.items() if v) or "the degrees"
        raise ValueError(f"{given} = {fixed} does not divide world_size {world_size}; choose degrees whose product divides (or equals) {world_size}")
    rest = world_size // fixed
    if patch > 1 and rest > 1:
        raise ValueError(f"patch_degree {patch} × cfg_degree {cfg} × pipefusion_degree {pipefusion} covers {fixed} of world_size "
                         f"{world_size} workers, and patch parallel takes no Ulysses/Ring for the rest; raise patch_degree "
                         f"or cfg_degree so the product is {world_size}")
    if not ulysses and not ring:
        ulysses = max(d for d in range(1, rest + 1) if rest % d == 0 and (num_heads is None or num_heads % d == 0))
        ring = rest // ulysses
    elif not ulysses:
        ulysses = rest
    elif not ring:
        ring = rest
    config = ParallelConfig(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg, pipefusion_degree=pipefusion, patch_degree=patch)
    if config.world_size != world_size:
        product = " × ".join(f"{name} {getattr(config, name)}" for name in named)
        raise ValueError(f"{product} = {config.world_size}, but world_size is {world_size}; "
                         f"set a degree to 0 (auto) or make their product {world_size}")
    config.validate(world_size, num_heads)
    return config
