"""The ComfyUI process's handle on the worker pool: one registry, shut down with the process."""
from __future__ import annotations

import atexit

from ray_backend.pool import PoolRegistry, WorkerPool

from .comfy_runtime import import_comfy
from .job_spec import PoolModelRef
from .worker_service import SERVICE_PATH

REGISTRY = PoolRegistry(SERVICE_PATH)
atexit.register(REGISTRY.shutdown)


def pool_for(ref: PoolModelRef) -> WorkerPool:
    import_comfy(prepare=False)  # inside ComfyUI: exports COMFYUI_PATH, so workers import this same ComfyUI
    return REGISTRY.get(ref.world_size, ref.ray_address)


def degrees_of(ref: PoolModelRef) -> dict[str, int]:
    return dict(ref.degrees)
