"""Run one function on N local ranks joined in a process group (tests and benches): CPU ranks over gloo, or
one CUDA device per rank over NCCL.

Ranks are new processes that rendezvous through a TCPStore the caller serves on 127.0.0.1 only (port chosen
by the OS, so no free-port race) and talk over the loopback interface only. A rank that raises fails the whole run with
its traceback; the others are stopped.

CPU ranks fork from multiprocessing's fork server, which imports the modules `preload_in_ranks` names once for the
whole process: a rank started fresh pays its imports at every launch (torch and ComfyUI's dependencies: ~5 CPU-s a
rank, 9.5 s of wall time for 2 ranks and 18 s for 4 on 2 cores). Each rank still starts with the caller's current
environment, working folder and sys.path, as a spawned one would. CUDA ranks are spawned (a forked process must not
inherit an initialised CUDA context).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from datetime import timedelta
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.distributed as dist

from .rendezvous import connect_store, serve_store

LOOPBACK = "127.0.0.1"
_preload: list[str] = ["torch", "torch.distributed"]


class RankFailed(RuntimeError):
    """A rank raised, died or timed out; the message carries its traceback."""


def preload_in_ranks(modules: Sequence[str]) -> None:
    """Modules CPU ranks find already imported (besides torch): the fork server imports them when it starts, at this
    process's first CPU launch, so call this before it. Only modules whose import reads no state the caller may change
    later (ComfyUI's own modules read its command-line arguments: leave them out)."""
    _preload[:] = dict.fromkeys(["torch", "torch.distributed", *modules])


def _rank_main(fn, rank, world_size, port, threads, env, args, results, backend):
    os.environ.clear()  # the caller's environment now, not the fork server's from when it started
    os.environ.update(env)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own connections on loopback
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # before anything allocates: each rank owns one device
        store = connect_store(LOOPBACK, port, world_size + 1)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensor data into the message; the queue's own reducer would share file descriptors
        # that vanish when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        results.put((rank, "error", traceback.format_exc()))


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    threads_per_rank: int = 1,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Call fn(rank, world_size, *args) on `world_size` ranks; return each rank's result, by rank.

    `fn` and `args` must be picklable (a module-level function). Each rank uses `threads_per_rank` torch threads.
    backend "nccl" puts rank r on CUDA device r.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend nccl needs one CUDA device per rank: {world_size} ranks, {torch.cuda.device_count()} devices visible; use gloo")
    if backend == "gloo":
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_preload)  # read when the server starts; the list is fixed from then on
    else:
        ctx = mp.get_context("spawn")
    env = {**os.environ, **(env or {})}
    store = serve_store(LOOPBACK, world_size + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, store.port, threads_per_rank, env, args, results, backend), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                dead = [r for r in missing if procs[r].exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"rank {dead[0]} of {world_size} died (exit code {procs[dead[0]].exitcode}) without a result") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"ranks {missing} gave no result in {timeout_s:.0f} s") from None
                continue
            if status == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
            collected[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    return [collected[r] for r in range(world_size)]
