"""The ComfyUI process's handle on the worker pool: one registry, shut down with the process."""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from ray_backend.cluster import set_private_cluster_env
from ray_backend.clusters import LOCAL_TARGET
from ray_backend.pool import PoolRegistry, WorkerPool

from .cluster_config import target_for
from .comfy_args import compute_args_env
from .comfy_runtime import import_comfy
from .job_spec import PoolModelRef
from .worker_service import SERVICE_PATH

REGISTRY = PoolRegistry(SERVICE_PATH, compute_args_env)  # workers compute with ComfyUI's compute arguments
set_private_cluster_env(REGISTRY.worker_env)  # the private cluster's processes start with what its workers need
# Opt-in: start the pool (private local cluster only) when ComfyUI starts, so the first prompt finds it up.
PRESTART_ENV = "XDIT_PRESTART_WORKERS"
# What the start with ComfyUI did ("off", "starting", "ready", "failed"), for GET /xdit/status.
PRESTART: dict[str, Any] = {"state": "off"}
# The start a queued prompt began before it ran (queued_start.py): "off", "starting", "ready", "skipped" (a
# pool or a connection was there by then), "failed"; for GET /xdit/status.
QUEUED_START: dict[str, Any] = {"state": "off"}
# The one thread that starts pools in the background (with ComfyUI, or for a queued prompt). Ray starts its cluster's
# processes with PR_SET_PDEATHSIG, which fires when the *thread* that started them ends: this thread lives as long
# as ComfyUI (an executor's idle thread waits for work instead of ending), or the private cluster dies under the pool.
_STARTER = ThreadPoolExecutor(1, thread_name_prefix="xdit-start")
# Our SIGTERM handler, and the main thread's event loop (ComfyUI's server) that can put it back (see keep_sigterm_hook).
_sigterm_hook: dict[str, object] = {}


def install_exit_hooks() -> None:
    """Stop the pool and the Ray cluster with ComfyUI: at a normal exit, and on SIGTERM, which Python does not
    turn into an exit by itself (Ray's agents would outlive ComfyUI). Call from the main thread (pack import)."""
    atexit.register(REGISTRY.shutdown, ending=True)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        REGISTRY.shutdown(ending=True)
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


def start_pool_with_comfyui() -> Future | None:
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
    return _STARTER.submit(_prestart, world)


def _prestart(world: int) -> None:
    started = time.perf_counter()
    try:
        world = _start_local_pool(world, 0, "comfyui start", for_a_prompt=False)
    except Exception as error:  # ComfyUI runs on: the first prompt starts the pool as without the setting
        PRESTART.update(state="failed", error=f"{type(error).__name__}: {error}")
        print(f"comfyui-xdit: starting the pool with ComfyUI ({PRESTART_ENV}) failed: {error}", file=sys.stderr, flush=True)
        return
    PRESTART.update(state="ready", world_size=world, seconds=round(time.perf_counter() - started, 3))
    print(f"comfyui-xdit: pool of {world} workers started with ComfyUI in {PRESTART['seconds']:.1f} s ({PRESTART_ENV})", flush=True)


def _start_local_pool(world_size: int, model_bytes: int, started_for: str, for_a_prompt: bool) -> int | None:
    """Start the private local cluster and a pool of `world_size` (0: auto) on it, bounded as the loader bounds it;
    only where this process has no cluster connection other than it and no pool at all. The world started, or None
    when something was already there (then nothing was touched)."""
    from ray_backend.capacity import check_world_fits
    from ray_backend.cluster import cluster_gpus, cluster_memory_bytes, start_private_cluster_if_unconnected

    from .degrees import resolve_world_size

    import_comfy(prepare=False)  # exports COMFYUI_PATH, so workers import this same ComfyUI

    def bounded_world() -> int | None:
        if not start_private_cluster_if_unconnected():
            return None
        keep_sigterm_hook()
        world = resolve_world_size(world_size, cluster_gpus())
        check_world_fits(world, cluster_gpus(), cluster_memory_bytes(), model_bytes)
        return world

    # started_for: the pool's start is then outside (or beside) its first prompt (GET /xdit/status, the demo)
    pool = REGISTRY.start_if_none(LOCAL_TARGET, bounded_world, started_for, for_a_prompt)
    return None if pool is None else pool.key.world_size


def start_for_queued_prompt(world_size: int, model_bytes: int) -> Future | None:
    """A prompt that needs the private local pool was queued while nothing runs and no pool is up: start it in the
    background now, so Ray and the workers start while ComfyUI validates the prompt and runs its other nodes (the
    loader then finds the pool, or waits for it). `world_size` must be checked as the loader's inputs are."""
    if REGISTRY.current is not None or QUEUED_START.get("state") == "starting" or PRESTART.get("state") == "starting":
        return None
    QUEUED_START.clear()
    QUEUED_START.update(state="starting", world_size=world_size)
    return _STARTER.submit(_queued_start, world_size, model_bytes)


def _queued_start(world_size: int, model_bytes: int) -> None:
    started = time.perf_counter()
    try:
        world = _start_local_pool(world_size, model_bytes, "queued prompt", for_a_prompt=True)
    except Exception as error:  # the prompt's loader starts the pool itself (and reports what is wrong)
        QUEUED_START.update(state="failed", error=f"{type(error).__name__}: {error}")
        return
    QUEUED_START.update(state="skipped" if world is None else "ready", world_size=world,
                        seconds=round(time.perf_counter() - started, 3))
