"""A pool of PoolWorker actors joined in one process group, and the job loop the caller drives.

The caller (a ComfyUI node) runs a job on every rank and polls: progress goes to its progress bar, an interrupt
request goes to every rank (which stop together, see step_control.py), and a worker that dies, fails alone or
stops making progress ends the job with PoolFailure and takes the pool down, so the next job starts a fresh one.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .cluster import cluster_gpus, ensure_ray, live_nodes, private_cluster_env, private_cluster_folder, take_connect_seconds
from .clusters import ClusterTarget
from .errors import JobInterrupted, PoolFailure
from .placement import WORKER_SLOT_RESOURCE, NodeSlots, node_slots, spread, uses_worker_slots
from .torch_switches import TorchSwitches
from .worker import PoolWorker

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = float(os.environ.get("XDIT_STARTUP_TIMEOUT_S", "300"))
# A step that makes no progress for this long means a stuck worker.
STALL_TIMEOUT_S = float(os.environ.get("XDIT_STALL_TIMEOUT_S", "600"))
COLLECTIVE_TIMEOUT_S = float(os.environ.get("XDIT_COLLECTIVE_TIMEOUT_S", "900"))
# After one rank fails, the others get this long to fail the same way (a consistent, input-caused error).
FAILURE_GRACE_S = 10.0
# A job abandoned by its caller: how long its ranks get to stop at their next step before the pool is taken down.
STOP_JOB_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PoolKey:
    world_size: int
    cluster: ClusterTarget


def _worker_env(service_env: dict[str, str]) -> dict[str, str]:
    # Workers import this repo's packages and the ComfyUI this process uses; the repo goes after whatever is
    # already there, so ComfyUI's top-level `nodes` module is never shadowed by our `nodes/` folder.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(REPO_ROOT)]
    env = {**service_env, "PYTHONPATH": os.pathsep.join(paths), "RAY_USAGE_STATS_ENABLED": "0"}
    if os.environ.get("COMFYUI_PATH"):
        env["COMFYUI_PATH"] = os.environ["COMFYUI_PATH"]
    return env


def _cause(error: BaseException) -> BaseException:
    """The worker-side exception behind a Ray error (Ray wraps it)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class WorkerPool:
    """`key.world_size` actors, one per GPU when the cluster has enough GPUs, else CPU workers over gloo."""

    def __init__(self, key: PoolKey, service_path: str, should_interrupt: Callable[[], bool] | None = None,
                 service_env: dict[str, str] | None = None):
        ensure_ray(key.cluster, should_interrupt)
        ray_s = take_connect_seconds()  # the connection may have been made before (the loader connects first)
        self.key = key
        self._service_path = service_path
        self._env = _worker_env(service_env or {})
        self.actors: list = []
        self.placement: list[NodeSlots] = []
        self.jobs_run = 0
        self.last_stats: list[dict] = []
        self.last_job: dict[str, float] = {}
        self._preview_seen: int | None = None  # the last step whose preview was delivered; None: the job asked for none
        self._assemble(key.world_size)
        self.cold_start["ray_s"] = round(ray_s, 3)

    def resize(self, world_size: int) -> None:
        """Serve `world_size` ranks, keeping the workers (processes, imports, resident models) that can serve the new
        world: rank r < both sizes stays where the new plan puts rank r on the same node. Only the other workers stop
        or start, so a world change pays the model load on new workers alone. Raises ValueError (nothing changed)
        when the cluster lacks the slots, PoolFailure (the pool is then down) when the new group does not form."""
        self._assemble(world_size)

    def _assemble(self, world_size: int) -> None:
        import ray

        started = time.perf_counter()
        use_gpus = cluster_gpus() >= world_size
        threads = 1 if use_gpus else max(1, (os.cpu_count() or 1) // world_size)
        nodes = live_nodes()
        # Refused here, before any worker starts or stops, when the live nodes lack the slots (ValueError names them).
        plan = spread(world_size, node_slots(nodes, use_gpus, world_size), ray.get_runtime_context().get_node_id(), use_gpus,
                      self.key.cluster.name)
        by_slots = not use_gpus and uses_worker_slots(nodes)  # then each worker also holds one slot, as Ray counts them
        kept = {rank: actor for rank, actor in enumerate(self.actors[:world_size])
                if self.placement[rank].node_id == plan[rank].node_id and self.workers[rank]["cuda"] == use_gpus}
        for rank, actor in enumerate(self.actors):
            if rank not in kept:
                ray.kill(actor)  # before new workers start: its GPU or worker slot is free for them
        try:
            ray.get([actor.regroup.remote(rank, world_size, threads) for rank, actor in kept.items()], timeout=STARTUP_TIMEOUT_S)
            self.actors = [kept.get(rank) or self._actor(ray, node, use_gpus, by_slots).remote(rank, world_size, self._service_path, threads)
                           for rank, node in enumerate(plan)]
            self.placement, self.key = plan, PoolKey(world_size, self.key.cluster)
            described = ray.get([a.describe.remote() for a in self.actors], timeout=STARTUP_TIMEOUT_S)
            self.workers = [{**w, "node_address": node.address} for w, node in zip(described, self.placement)]
            workers_up = time.perf_counter()
            backends = ray.get(self._join_calls(), timeout=STARTUP_TIMEOUT_S)
            ranks = ray.get([a.startup_timings.remote() for a in self.actors], timeout=STARTUP_TIMEOUT_S)
        except Exception as error:
            self.shutdown()
            raise PoolFailure(f"the worker pool of {world_size} did not start: {_cause(error)}") from error
        self.backend = backends[0]
        self.kept_workers = len(kept)
        self.startup_s = time.perf_counter() - started
        # Where this start went (GET /xdit/status, the demo): workers_s until every worker answered (new processes
        # importing torch and Ray), group_s until the group formed and every service imported (ComfyUI, in the
        # workers); the first loads and the first job are added as they happen (warm, run).
        self.cold_start: dict[str, Any] = {
            "ray_s": 0.0, "workers_s": round(workers_up - started, 3), "group_s": round(time.perf_counter() - workers_up, 3),
            "startup_s": round(self.startup_s, 3), "new_workers": world_size - len(kept), "ranks": ranks}

    def _join_calls(self) -> list:
        """Every rank joins the group: at a store file in the private cluster's own folder (no port at all), or at
        a TCP store rank 0 serves on its node's own address (a cluster spanning machines)."""
        import ray

        folder = private_cluster_folder()
        if folder is not None:
            self.rendezvous = "file"
            path = str(folder / f"rendezvous-{uuid.uuid4().hex}")
            return [a.join_file.remote(path, COLLECTIVE_TIMEOUT_S) for a in self.actors]
        self.rendezvous = "tcp"
        host = self.placement[0].address
        port = ray.get(self.actors[0].open_rendezvous.remote(host), timeout=STARTUP_TIMEOUT_S)
        return [a.join.remote(host, port, COLLECTIVE_TIMEOUT_S, node.address) for a, node in zip(self.actors, self.placement)]

    def _actor(self, ray, node: NodeSlots, use_gpus: bool, by_slots: bool):
        """The actor class pinned to `node` (hard affinity: a worker never lands elsewhere than planned)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return ray.remote(PoolWorker).options(
            num_cpus=0 if not use_gpus else 1, num_gpus=1 if use_gpus else 0, max_concurrency=4,
            resources={WORKER_SLOT_RESOURCE: 1} if by_slots else {},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            # The private cluster's processes may have this environment already (set_private_cluster_env): a worker
            # then starts without waiting for Ray's runtime-env agent.
            **({} if self.key.cluster.is_local and private_cluster_env() == self._env else {"runtime_env": {"env_vars": self._env}}),
        )

    def warm(self, model_ref: Any, degrees: dict[str, int]) -> list[dict]:
        """Load the model on every rank now (so the first prompt does not pay for it)."""
        import ray

        started = time.perf_counter()
        switches = TorchSwitches.of_this_process()
        try:
            self.last_stats = ray.get([a.prepare.remote(model_ref, degrees, switches) for a in self.actors], timeout=STARTUP_TIMEOUT_S)
        except Exception as error:
            # A rank that died or failed here leaves the others waiting in a collective: no later job can run on it.
            self.shutdown()
            raise PoolFailure(f"loading the model in the worker pool failed: {_cause(error)}") from error
        if "first_job_s" not in self.cold_start:  # the loads before this pool's first job (model, VAE)
            self.cold_start["loads_s"] = round(self.cold_start.get("loads_s", 0.0) + time.perf_counter() - started, 3)
        return self.last_stats

    def run(self, job: Any, degrees: dict[str, int], on_progress: Callable[[int, int, Any], None] | None = None,
            should_interrupt: Callable[[], bool] | None = None, poll_s: float = 0.05, previews: bool = False) -> dict[str, Any]:
        """Run `job` on every rank; returns rank 0's result, whose "output" is the list of every rank's output for a
        job that says `every_rank_returns`. Raises JobInterrupted, or PoolFailure (pool is dead).

        `on_progress(step, total, preview)` sees rank 0's progress; with `previews`, `preview` is the payload rank 0
        attached to a step it has not delivered before (else None), so a preview crosses at most once per step.
        """
        dispatched = time.perf_counter()
        switches = TorchSwitches.of_this_process()  # the workers compute with the kernels this process would
        refs = [a.run.remote(job, degrees, switches) for a in self.actors]
        try:
            results = self._collect(refs, on_progress, should_interrupt, poll_s, previews)
        except (PoolFailure, JobInterrupted):
            raise
        except BaseException:
            # The caller's callback raised (ComfyUI's progress hook raises when the user cancels): the ranks must stop
            # before any next job starts, or two jobs' collectives interleave and the process group desyncs.
            self._stop_job(refs)
            raise
        self.last_stats = [results[r]["stats"] for r in sorted(results)]
        # What the pool adds around the ranks' own work: dispatch, polling, result transfer (benches read it).
        self.last_job = {"seconds_total": time.perf_counter() - dispatched, "seconds_in_workers": max(r["seconds"] for r in results.values())}
        if "first_job_s" not in self.cold_start:
            self.cold_start["first_job_s"] = round(self.last_job["seconds_total"], 3)
            self.cold_start["first_step_s"] = results[0].get("first_step_s")  # rank 0: job start to its first step's end
        if getattr(job, "every_rank_returns", False):
            return {**results[0], "output": [results[rank]["output"] for rank in sorted(results)]}
        return results[0]

    def _collect(self, refs: list, on_progress, should_interrupt, poll_s: float, previews: bool) -> dict[int, Any]:
        """Every rank's result of the job `refs`, following rank 0's progress; raises as run() documents."""
        import ray

        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        last_step, last_change, first_error_at, interrupting = -1, time.monotonic(), None, False
        self._preview_seen = 0 if previews else None
        while len(results) + len(errors) < len(refs):
            pending = [r for i, r in enumerate(refs) if i not in results and i not in errors]
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            for ref in ready:
                rank = refs.index(ref)
                try:
                    results[rank] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as error:
                    self.shutdown()
                    raise PoolFailure(f"{self._where(rank)} died during the job (its process or its node went away): {error}") from error
                except ray.exceptions.RayTaskError as error:
                    errors[rank] = _cause(error)
                    first_error_at = first_error_at or time.monotonic()
            if first_error_at is not None:
                if time.monotonic() - first_error_at > FAILURE_GRACE_S:
                    self.shutdown()
                    rank, error = next(iter(errors.items()))
                    raise PoolFailure(f"{self._where(rank)} failed alone and the others stopped answering: {error!r}") from error
                continue
            if should_interrupt is not None and not interrupting and should_interrupt():
                interrupting = True
                for a in self.actors:
                    a.request_interrupt.remote()
            step = self._progress(on_progress)
            if step != last_step:
                last_step, last_change = step, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT_S:
                self.shutdown()
                raise PoolFailure(f"the worker pool made no progress for {STALL_TIMEOUT_S:.0f} s (stuck at step {step}); it was stopped")
        self.jobs_run += 1
        if errors and results:
            self.shutdown()
            rank, error = next(iter(errors.items()))
            raise PoolFailure(f"{self._where(rank)} failed while others finished: {error!r}") from error
        if errors:
            return self._consistent_error(errors)
        return results

    def _stop_job(self, refs: list) -> None:
        """Interrupt the job `refs` on every rank and wait until each rank has left it; a pool whose ranks do not
        all stop in time (or died) is taken down, so the next job never meets a rank still inside this one."""
        import ray

        for a in self.actors:
            a.request_interrupt.remote()
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=STOP_JOB_TIMEOUT_S)
        healthy = not pending
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                healthy = healthy and isinstance(_cause(error), JobInterrupted)
            except Exception:  # the rank died
                healthy = False
        if not healthy:
            self.shutdown()

    def _where(self, rank: int) -> str:
        """A rank and its node, for failures: on a cluster, which machine to look at."""
        node = self.placement[rank]
        peers = [r for r, n in enumerate(self.placement) if n.node_id == node.node_id]
        return f"worker rank {rank} on Ray node {node.address} (node {node.node_id[:12]}, ranks {', '.join(map(str, peers))})"

    def _progress(self, on_progress: Callable[[int, int, Any], None] | None) -> int:
        import ray

        try:
            step, total, preview = ray.get(self.actors[0].progress.remote(self._preview_seen), timeout=30)
        except Exception as error:
            self.shutdown()
            raise PoolFailure(f"{self._where(0)} stopped answering: {_cause(error)}") from error
        if preview is not None:
            self._preview_seen = preview[0]
        if on_progress is not None and total:
            # A preview goes with the step it belongs to (rank 0 may have moved on since it was made).
            on_progress(*((preview[0], total, preview[1]) if preview is not None else (step, total, None)))
        return step

    def _consistent_error(self, errors: dict[int, BaseException]):
        """Every rank failed: an interrupt or an input error they all hit; the pool itself is healthy."""
        kinds = {type(e) for e in errors.values()}
        error = errors[min(errors)]
        if kinds == {JobInterrupted}:
            raise JobInterrupted(str(error))
        if len(kinds) > 1:
            self.shutdown()
            raise PoolFailure(f"the workers failed differently: {sorted(k.__name__ for k in kinds)}; first: {error!r}") from error
        raise error

    def shutdown(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # already dead: nothing to free
                pass
        self.actors = []

    @property
    def alive(self) -> bool:
        return bool(self.actors)

    def status(self) -> dict[str, Any]:
        return {"world_size": self.key.world_size, "cluster": self.key.cluster.name, "ray_address": self.key.cluster.address or "local", "backend": self.backend, "rendezvous": self.rendezvous,
                "workers": self.workers, "startup_s": round(self.startup_s, 3), "kept_workers": self.kept_workers, "jobs_run": self.jobs_run, "ranks": self.last_stats,
                "last_job": self.last_job, "cold_start": self.cold_start}


class PoolRegistry:
    """The ComfyUI process's one live pool: reused while its key matches, replaced when it changes or dies.
    `service_env()` gives the environment entries the service needs in its workers, read when a pool starts."""

    def __init__(self, service_path: str, service_env: Callable[[], dict[str, str]] = dict):
        self._service_path = service_path
        self._service_env = service_env
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()  # a prompt's get waits for a start already under way (started with ComfyUI)
        self._failed_start: PoolFailure | None = None  # a background start's failure, for the next get to report

    def worker_env(self) -> dict[str, str]:
        """The environment entries this registry's workers start with."""
        return _worker_env(self._service_env())

    def get(self, world_size: int, cluster: ClusterTarget, should_interrupt: Callable[[], bool] | None = None) -> WorkerPool:
        """The live pool for this world size and cluster, started (after connecting, cancellably) if needed."""
        with self._lock:
            return self._get(world_size, cluster, should_interrupt)

    def _get(self, world_size: int, cluster: ClusterTarget, should_interrupt: Callable[[], bool] | None) -> WorkerPool:
        if self._failed_start is not None:  # the prompt a background start was for fails as if it had started the pool
            error, self._failed_start = self._failed_start, None
            raise error
        key = PoolKey(world_size, cluster)
        if self._pool is not None and (self._pool.key.cluster != cluster or not self._pool.alive):
            self._pool.shutdown()
            self._pool = None
        if self._pool is not None and self._pool.key != key:
            try:
                self._pool.resize(world_size)  # a world change keeps the workers that can serve the new world
            except PoolFailure:
                self._pool = None  # it took the pool down: start afresh below
        if self._pool is None:
            self._pool = WorkerPool(key, self._service_path, should_interrupt, self._service_env())
        return self._pool

    def start_if_none(self, cluster: ClusterTarget, world_for: Callable[[], int | None], started_for: str,
                      for_a_prompt: bool) -> WorkerPool | None:
        """Start a pool only if there is none at all (never resizing or replacing one a prompt may be using); the
        pool started, else None. `world_for` (connects, bounds the world size; None: start nothing) runs under the
        registry's lock, so a prompt's get waits for this start instead of racing it. `for_a_prompt` (started for a
        queued prompt): the next get then raises the start's PoolFailure (a worker died or hung while starting), as
        that prompt would have, instead of starting another pool; a start with ComfyUI leaves the first prompt to
        start the pool afresh. `started_for` (why it started in the background) goes into the pool's cold_start
        before any prompt can see the pool."""
        with self._lock:
            if self._pool is not None:
                return None
            world_size = world_for()
            if world_size is None:
                return None
            try:
                self._pool = WorkerPool(PoolKey(world_size, cluster), self._service_path, service_env=self._service_env())
            except PoolFailure as error:
                if for_a_prompt:
                    self._failed_start = error  # once: the prompt after it starts a fresh pool
                raise
            self._pool.cold_start["started_for"] = started_for
            return self._pool

    @property
    def current(self) -> WorkerPool | None:
        return self._pool if self._pool is not None and self._pool.alive else None

    def shutdown(self, ending: bool = False) -> None:
        """Stop the pool and leave its cluster; `ending`: for good, as this process ends (see close_ray)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if "ray" in sys.modules:
            from .cluster import close_ray, shutdown_ray

            if ending:
                close_ray()
            else:
                shutdown_ray()
