"""The ComfyUI process's handle on the worker pool: one registry, shut down with the process."""
from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Callable

from ray_backend.pool import PoolRegistry, WorkerPool

from .cluster_config import target_for
from .comfy_runtime import import_comfy
from .job_spec import PoolModelRef
from .worker_service import SERVICE_PATH

REGISTRY = PoolRegistry(SERVICE_PATH)


def install_exit_hooks() -> None:
    """Stop the pool and the Ray cluster with ComfyUI: at a normal exit, and on SIGTERM, which Python does not
    turn into an exit by itself (Ray's agents would outlive ComfyUI). Call from the main thread (pack import)."""
    atexit.register(REGISTRY.shutdown)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        REGISTRY.shutdown()
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # whatever SIGTERM did before (terminate, by default)

    signal.signal(signal.SIGTERM, on_sigterm)


def pool_for(ref: PoolModelRef, should_interrupt: Callable[[], bool] | None = None) -> WorkerPool:
    """The pool for `ref`'s world and cluster (connecting to the cluster first, cancellably, if needed)."""
    import_comfy(prepare=False)  # inside ComfyUI: exports COMFYUI_PATH, so workers import this same ComfyUI
    return REGISTRY.get(ref.world_size, target_for(ref.cluster), should_interrupt)


def degrees_of(ref: PoolModelRef) -> dict[str, int]:
    return dict(ref.degrees)
