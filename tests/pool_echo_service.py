"""A pool service without ComfyUI, for ray_backend's own tests: each job all-reduces a number over the ranks;
a job with "hang_rank" leaves that rank asleep (a stuck worker); one with "steps" runs that many steps of
"step_s" seconds (something to interrupt); a model ref {"die_rank": r} makes rank r's process exit in prepare."""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import torch
import torch.distributed as dist


def openmp_threads() -> int | None:
    """The calling thread's OpenMP thread count, from the libgomp torch loaded (None if it loaded none): OpenMP keeps
    it per thread, while torch.get_num_threads() reports the last set_num_threads of any thread."""
    with open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "libgomp" in line]
    return ctypes.CDLL(paths[0]).omp_get_max_threads() if paths else None


class EchoService:
    def __init__(self, device: str):
        self._collector_while_built = gc.isenabled()  # a worker builds its service with the collector paused
        self.jobs = 0
        self.regroups = 0  # process groups of another world this service was carried into
        self._active = 0  # jobs inside run() right now: more than one means two jobs' collectives interleave
        self._lock = threading.Lock()
        self._compute_threads: set[int] = set()  # threads prepare() and run() were called on
        self._inference_mode: set[bool] = set()  # whether each run() was in inference mode
        self._openmp_threads: int | None = None  # the OpenMP thread count the last run() computed with
        self._switches: tuple[bool, bool] | None = None  # (oneDNN, deterministic algorithms) as the last run() saw them

    def prepare(self, model_ref, state) -> None:
        self._compute_threads.add(threading.get_ident())
        if isinstance(model_ref, dict) and model_ref.get("die_rank") == state.rank:
            os._exit(1)  # the worker process dies while it loads the model

    def run(self, job: dict, state, control) -> dict:
        self._compute_threads.add(threading.get_ident())
        self._inference_mode.add(torch.is_inference_mode_enabled())
        torch.ones(1 << 16).add_(1)  # a parallel op, as every model step has: torch sets this thread's count once, here
        self._openmp_threads = openmp_threads()
        self._switches = (torch.backends.mkldnn.enabled, torch.are_deterministic_algorithms_enabled())
        with self._lock:
            self._active += 1
            overlapped = self._active > 1
        try:
            if job.get("hang_rank") == state.rank:
                time.sleep(3600)
            value = torch.tensor([float(job["value"]) * (state.rank + 1)])
            dist.all_reduce(value)
            steps = job.get("steps", 1)
            control.start(steps)
            for step in range(1, steps + 1):
                time.sleep(job.get("step_s", 0))
                control.after_step(step)
            self.jobs += 1
            return {"sum": value.item(), "world": state.world_size, "overlapped": overlapped}
        finally:
            with self._lock:
                self._active -= 1

    def regroup(self) -> None:
        self.regroups += 1

    def stats(self) -> dict:
        return {"jobs": self.jobs, "regroups": self.regroups, "pid": os.getpid(), "compute_threads": len(self._compute_threads),
                "inference_mode": sorted(self._inference_mode), "collector_while_built": self._collector_while_built,
                "collector_now": gc.isenabled(), "frozen_objects": gc.get_freeze_count(),
                "openmp_threads": self._openmp_threads, "switches": self._switches,
                "probe_env": os.environ.get("XDIT_ECHO_PROBE"), "runtime_env_vars": sorted(_runtime_env().get("env_vars") or {})}


def _runtime_env() -> dict:
    import ray

    return dict(ray.get_runtime_context().runtime_env)
