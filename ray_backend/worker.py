"""One pool worker (a Ray actor): a rank of the job's process group, hosting a service that runs jobs.

The actor is generic: what a job means (which model, which sampling code) belongs to the service, named by an
import path so that this module needs neither ComfyUI nor the model code. The actor runs with several threads
so that progress() and request_interrupt() answer while run() is busy; prepare() and run() hand their work to one
compute thread of their own.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from .collector import collector_paused

# A fresh worker process imports torch here, when Ray loads the actor class (ComfyUI's process has torch already:
# there the pause lasts a moment, and nothing is frozen).
with collector_paused():
    import torch
    import torch.distributed as dist

    from parallel_core import ParallelConfig, ParallelState, init_parallel
    from parallel_core.rendezvous import connect_store, file_store, serve_store

from .step_control import StepControl
from .torch_switches import TorchSwitches

LOOPBACK_PREFIX = "127."
GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"


def interface_of(address: str) -> str | None:
    """The network interface that carries `address` (the one holding it, else the one whose network contains it,
    as loopback's 127.0.0.0/8 contains 127.0.0.2); None when no interface of this machine does."""
    import ipaddress
    import socket

    import psutil

    try:
        target = ipaddress.ip_address(address)
    except ValueError:
        return None
    containing = None
    for name, entries in psutil.net_if_addrs().items():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6) or not entry.netmask:
                continue
            own = entry.address.split("%")[0]
            if ipaddress.ip_address(own) == target:
                return name
            prefix = bin(int(ipaddress.ip_address(entry.netmask))).count("1")  # psutil gives IPv6 masks as addresses
            if containing is None and target in ipaddress.ip_network(f"{own}/{prefix}", strict=False):
                containing = name
    return containing


def pin_gloo_interface(node_address: str) -> None:
    """Make gloo listen on the interface of this worker's Ray node address, which the other nodes reach (Ray needs
    it too). Without it gloo picks the address its hostname resolves to, often 127.0.1.1 on Debian: unreachable
    from another machine. An operator's own GLOO_SOCKET_IFNAME (in `ray start`'s environment) wins off loopback."""
    if node_address.startswith(LOOPBACK_PREFIX):
        os.environ[GLOO_IFNAME_ENV] = "lo"  # a local pool never leaves the loopback interface
        return
    if os.environ.get(GLOO_IFNAME_ENV):
        return
    interface = interface_of(node_address)
    if interface is None:
        raise RuntimeError(f"no network interface of this machine holds its Ray node address {node_address}, so gloo "
                           f"cannot tell the other nodes where to reach it; set {GLOO_IFNAME_ENV} to the interface "
                           f"of the pool's network in the environment of `ray start` on this node")
    os.environ[GLOO_IFNAME_ENV] = interface


def _return_free_memory() -> None:
    """Give the heap pages a job freed back to the system (glibc keeps them otherwise): a worker lives for thousands
    of jobs, and without this its RSS crept up by ~0.4 MB a job (about 5 % per 100 tiny prompts) without live growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


class PoolWorker:
    def __init__(self, rank: int, world_size: int, service_path: str, threads: int):
        import psutil

        # From this process's start to here: Python, torch, Ray and this module imported.
        self.startup: dict[str, float] = {"process_s": round(time.time() - psutil.Process().create_time(), 3)}
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self._service_path = service_path
        self._service = None
        self._store = None
        self._states: dict[ParallelConfig, ParallelState] = {}
        self._device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL on GPUs, gloo on CPU
        if self._device == "cuda":
            torch.cuda.set_device(0)  # Ray shows each actor only its own GPU
        self.control: StepControl | None = None
        self.jobs_run = 0
        # The service's imports (ComfyUI: seconds of CPU) run while the pool asks who we are and the group forms.
        executor = ThreadPoolExecutor(1, thread_name_prefix="service-import")
        self._service_ready: Future = executor.submit(self._make_service)
        executor.shutdown(wait=False)
        # Every call that computes runs on this one thread. libgomp keeps a team of threads for each thread that
        # starts parallel regions; with teams of several of Ray's method threads alive it counts more threads than
        # cores and stops spin-waiting between regions, which made a 2-thread CPU worker's steps 40-60% slower.
        # OpenMP's thread count is per thread: the compute thread starts from OMP_NUM_THREADS (Ray sets 1 for an
        # actor without CPUs) and torch's first parallel op there copies the process's count into it once; a later
        # set_num_threads on another thread (regroup) never reaches it. So the compute thread sets its own, each time.
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=torch.set_num_threads, initargs=(threads,))

    def _make_service(self):
        started = time.perf_counter()
        module, name = self._service_path.split(":")
        with collector_paused(then_freeze=True):
            service = getattr(importlib.import_module(module), name)(self._device)
        self.startup["service_s"] = round(time.perf_counter() - started, 3)
        return service

    def describe(self) -> dict[str, Any]:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "cuda": torch.cuda.is_available(),
                "threads": torch.get_num_threads()}

    def open_rendezvous(self, host: str) -> int:
        """Rank 0: serve the TCP store the group meets at, on `host` only; returns its port (chosen by the OS)."""
        self._store = serve_store(host, self.world_size)
        return self._store.port

    def join(self, host: str, port: int, timeout_s: float, node_address: str) -> str:
        """Join the process group that meets at rank 0's store `host:port`; `node_address` is this worker's own
        Ray node address. NCCL on GPUs, gloo on CPU. Returns the backend."""
        pin_gloo_interface(node_address)
        store = self._store or connect_store(host, port, self.world_size)
        return self._init_group(store, timeout_s)

    def join_file(self, path: str, timeout_s: float) -> str:
        """Join the process group at a store file (every rank on this machine: the private local cluster)."""
        pin_gloo_interface("127.0.0.1")
        return self._init_group(file_store(path, self.world_size), timeout_s)

    def _init_group(self, store, timeout_s: float) -> str:
        backend = "nccl" if self._device == "cuda" else "gloo"
        started = time.perf_counter()
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        self.startup["join_s"] = round(time.perf_counter() - started, 3)
        self.control = StepControl(self.world_size > 1, self._device)
        if self._service is None:  # a regrouped worker keeps its service, and with it its resident model
            # Ready before any job arrives: a job's arguments may only unpickle once the service's imports ran.
            started = time.perf_counter()
            self._service = self._service_ready.result()
            self.startup["service_wait_s"] = round(time.perf_counter() - started, 3)
        return backend

    def startup_timings(self) -> dict[str, float]:
        """Where this worker's start went: process_s (process start to actor, imports of torch and Ray), service_s
        (the service's imports and construction, in a thread from the actor's start), join_s (forming the group),
        service_wait_s (how long the group join then waited for the service)."""
        return dict(self.startup)

    def regroup(self, rank: int, world_size: int, threads: int) -> None:
        """Leave this process group to join one of another world size as `rank` (then join/join_file): the groups
        and everything the service built on them go; the service and its resident model stay."""
        if dist.is_initialized():
            dist.destroy_process_group()  # every subgroup init_parallel made goes with it
        self._states.clear()
        self._store = None
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(threads)
        self._compute.submit(torch.set_num_threads, threads).result()  # the thread that computes (see __init__)
        if self._service is not None:
            self._service.regroup()

    def _state_for(self, degrees: dict[str, int]) -> ParallelState:
        config = ParallelConfig(**degrees)
        if config not in self._states:  # group creation is collective: every rank reaches here in the same job
            self._states[config] = init_parallel(config)
        return self._states[config]

    def _computed(self, switches: TorchSwitches, work, *args):
        """`work(*args)` on the compute thread, in inference mode as ComfyUI runs a prompt's nodes (no autograd
        bookkeeping per op: 8% of a tiny model's step), with the torch switches of the process that sent it."""
        def call():
            with torch.inference_mode(), switches.applied():
                return work(*args)

        return self._compute.submit(call).result()

    def prepare(self, model_ref: Any, degrees: dict[str, int], switches: TorchSwitches) -> dict[str, Any]:
        """Make a model resident (every rank at once); returns the service's stats."""
        return self._computed(switches, self._prepare, model_ref, degrees)

    def _prepare(self, model_ref: Any, degrees: dict[str, int]) -> dict[str, Any]:
        service = self._service
        service.prepare(model_ref, self._state_for(degrees))
        return service.stats()

    def run(self, job: Any, degrees: dict[str, int], switches: TorchSwitches) -> dict[str, Any]:
        """Run one job on this rank with the sender's torch `switches`. Rank 0's result carries the job's output
        (every rank's, for a job that says `every_rank_returns`)."""
        return self._computed(switches, self._run, job, degrees)

    def _run(self, job: Any, degrees: dict[str, int]) -> dict[str, Any]:
        service = self._service
        state = self._state_for(degrees)
        started = time.perf_counter()
        if self.control:
            self.control.first_step_at = None  # a job without steps (VAE) reports none, not the last job's
        try:
            result = service.run(job, state, self.control)
        finally:
            _return_free_memory()
        self.jobs_run += 1
        first_step = self.control.first_step_at if self.control else None  # None: the job ran no step (a VAE job)
        returns = self.rank == 0 or getattr(job, "every_rank_returns", False)
        return {"rank": self.rank, "output": result if returns else None, "seconds": time.perf_counter() - started, "stats": service.stats(),
                "comm_bytes": state.comm.snapshot(), "first_step_s": None if first_step is None else round(first_step - started, 3)}

    def progress(self, preview_after: int | None = None) -> tuple[int, int, Any]:
        """(step, total, preview): the preview is the latest step's payload when that step is past `preview_after`
        (None: the caller asked for none), so each step's preview crosses to the caller at most once."""
        if not self.control:
            return 0, 0, None
        latest = self.control.preview
        fresh = preview_after is not None and latest is not None and latest[0] > preview_after
        return self.control.step, self.control.total, latest if fresh else None

    def request_interrupt(self) -> None:
        if self.control:
            self.control.request_interrupt()
