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
# Our SIGTERM handler, and the main thread's event loop (ComfyUI's server) that can put it back (see keep_sigterm_hook).
_sigterm_hook: dict[str, object] = {}


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
    _sigterm_hook["handler"] = on_sigterm
    try:
        from server import PromptServer

        _sigterm_hook["loop"] = PromptServer.instance.loop
    except (ImportError, AttributeError):  # not inside a ComfyUI server: nothing starts Ray off the main thread
        pass


def keep_sigterm_hook() -> None:
    """Put our SIGTERM handler back after Ray started or joined a cluster: every ray.init installs Ray's own C-level
    handler, which prints a stack trace and exits at once, so ours (stop the pool, then every process of the
    private cluster) would never run. Python sets handlers only from the main thread: ComfyUI's event loop runs there."""
    handler, loop = _sigterm_hook.get("handler"), _sigterm_hook.get("loop")
    if handler is None:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    elif loop is not None:
        loop.call_soon_threadsafe(signal.signal, signal.SIGTERM, handler)


def pool_for(ref: PoolModelRef, should_interrupt: Callable[[], bool] | None = None) -> WorkerPool:
    """The pool for `ref`'s world and cluster (connecting to the cluster first, cancellably, if needed)."""
    import_comfy(prepare=False)  # inside ComfyUI: exports COMFYUI_PATH, so workers import this same ComfyUI
    try:
        return REGISTRY.get(ref.world_size, target_for(ref.cluster), should_interrupt)
    finally:
        keep_sigterm_hook()


def live_world(cluster: str) -> int | None:
    """The world size of the pool that is up on `cluster` (a configured cluster name), or None."""
    pool = REGISTRY.current
    return pool.key.world_size if pool is not None and pool.key.cluster.name == cluster else None


def degrees_of(ref: PoolModelRef) -> dict[str, int]:
    return dict(ref.degrees)
