"""The ComfyUI process's handle on the worker pool: one registry, shut down with the process."""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from ray_backend.clusters import LOCAL_TARGET
from ray_backend.pool import PoolRegistry, WorkerPool

from .cluster_config import target_for
from .comfy_runtime import import_comfy
from .job_spec import PoolModelRef
from .worker_service import SERVICE_PATH

REGISTRY = PoolRegistry(SERVICE_PATH)
# Opt-in: start the pool (private local cluster only) when ComfyUI starts, so the first prompt finds it up.
PRESTART_ENV = "XDIT_PRESTART_WORKERS"
# What the start with ComfyUI did ("off", "starting", "ready", "failed"), for GET /xdit/status.
PRESTART: dict[str, Any] = {"state": "off"}
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


def prestart_world(value: str | None) -> int | None:
    """The pool XDIT_PRESTART_WORKERS asks for: None (unset, empty or 0: off), 0 for "auto" (what world_size 0 picks:
    every GPU, else 2 CPU workers), or a number of workers. Raises ValueError naming the variable otherwise."""
    text = (value or "").strip().lower()
    if text in ("", "0"):
        return None
    if text == "auto":
        return 0
    if not text.isdigit():
        raise ValueError(f"{PRESTART_ENV}={value!r} is not a number of workers: set it to a positive number, to 'auto' "
                         "(every GPU, else 2 CPU workers), or unset it (no pool until the first prompt)")
    return int(text)


def start_pool_with_comfyui() -> threading.Thread | None:
    """If XDIT_PRESTART_WORKERS asks for it, start the private local pool in the background now (ComfyUI is
    starting): the first prompt then pays only its model load. Never a configured cluster: loopback only."""
    try:
        world = prestart_world(os.environ.get(PRESTART_ENV))
    except ValueError as error:
        PRESTART.update(state="failed", error=str(error))
        print(f"comfyui-xdit: {error}", file=sys.stderr, flush=True)
        return None
    if world is None:
        return None
    PRESTART.update(state="starting")
    thread = threading.Thread(target=_prestart_and_stay, args=(world,), name="xdit-prestart", daemon=True)
    thread.start()
    return thread


def _prestart_and_stay(world: int) -> None:
    _prestart(world)
    # Ray starts its cluster's processes with PR_SET_PDEATHSIG, which fires when the *thread* that started them ends:
    # this thread must live as long as ComfyUI, or the private cluster is killed under the pool.
    threading.Event().wait()


def _prestart(world: int) -> None:
    from ray_backend.capacity import check_world_fits
    from ray_backend.cluster import cluster_gpus, cluster_memory_bytes, ensure_ray

    from .degrees import resolve_world_size

    started = time.perf_counter()
    try:
        import_comfy(prepare=False)  # exports COMFYUI_PATH, so workers import this same ComfyUI
        ensure_ray(LOCAL_TARGET)
        keep_sigterm_hook()
        world = resolve_world_size(world, cluster_gpus())
        check_world_fits(world, cluster_gpus(), cluster_memory_bytes(), 0)
        REGISTRY.get(world, LOCAL_TARGET)
    except Exception as error:  # ComfyUI runs on: the first prompt starts the pool as without the setting
        PRESTART.update(state="failed", error=f"{type(error).__name__}: {error}")
        print(f"comfyui-xdit: starting the pool with ComfyUI ({PRESTART_ENV}) failed: {error}", file=sys.stderr, flush=True)
        return
    PRESTART.update(state="ready", world_size=world, seconds=round(time.perf_counter() - started, 3))
    print(f"comfyui-xdit: pool of {world} workers started with ComfyUI in {PRESTART['seconds']:.1f} s ({PRESTART_ENV})", flush=True)
