"""Refuse, before anything starts, a pool the cluster cannot host."""
from __future__ import annotations

import os

# A CPU worker's own footprint with torch and ComfyUI imported (measured ~0.5 GB), before the model's weights.
CPU_WORKER_OVERHEAD_BYTES = 512 * 2**20
MAX_CPU_WORKERS_ENV = "XDIT_MAX_CPU_WORKERS"


def max_cpu_workers(cluster_memory_bytes: int, model_bytes: int) -> int:
    """How many CPU workers fit: the operator's XDIT_MAX_CPU_WORKERS, else what the cluster's memory holds."""
    configured = os.environ.get(MAX_CPU_WORKERS_ENV, "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise ValueError(f"{MAX_CPU_WORKERS_ENV}={configured!r} must be a whole number >= 1")
        return int(configured)
    return max(1, cluster_memory_bytes // (CPU_WORKER_OVERHEAD_BYTES + max(0, model_bytes)))


def check_world_fits(world_size: int, cluster_gpus: int, cluster_memory_bytes: int, model_bytes: int) -> None:
    """Raise ValueError naming the limit if `world_size` workers cannot run on this cluster."""
    if cluster_gpus > 0:
        if world_size > cluster_gpus:
            raise ValueError(f"world_size {world_size} needs {world_size} GPUs, but the Ray cluster has {cluster_gpus}; "
                             f"set world_size to {cluster_gpus} or less (0 = every GPU)")
        return
    limit = max_cpu_workers(cluster_memory_bytes, model_bytes)
    if world_size > limit:
        source = (f"{MAX_CPU_WORKERS_ENV}={limit}" if os.environ.get(MAX_CPU_WORKERS_ENV, "").strip() else
                  f"{cluster_memory_bytes / 2**30:.1f} GiB of Ray memory / {(CPU_WORKER_OVERHEAD_BYTES + model_bytes) / 2**30:.2f} GiB "
                  f"per CPU worker with this model")
        raise ValueError(f"world_size {world_size} is more CPU workers than this machine can host ({limit}: {source}); "
                         f"set world_size to {limit} or less, or raise {MAX_CPU_WORKERS_ENV} if you know it fits")
