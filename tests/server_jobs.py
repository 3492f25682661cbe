"""Helpers for server tests that act while a prompt runs: a prompt in a background thread, its progress, POST
/interrupt, the pool's processes under the server, and a ComfyUI server of a test's own (with extra env)."""
from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from comfyui_xdit.api_client import ComfyClient
from comfyui_xdit.testing.server_launcher import TINY_UNET_NAMES, ComfyServer, launch_server, prepare_base

SAMPLER_NODE = "11"  # server_graphs' sampler node id
POOL_WORKER_TITLE = "ray::PoolWorker"  # the process title Ray gives an actor of class PoolWorker


def run_in_background(client: ComfyClient, graph: dict) -> tuple[threading.Thread, dict]:
    """client.run(graph) in a thread; the dict gets "events" as they come, then "result" or "error"."""
    outcome: dict = {"events": []}

    def target():
        try:
            outcome["result"] = client.run(graph, on_event=lambda kind, data: outcome["events"].append((kind, data)), timeout=600)
        except Exception as error:  # the test inspects it
            outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for_progress(outcome: dict, at_least: int, timeout: float = 300) -> None:
    """Until the sampler's progress bar reached step `at_least` (AssertionError if the prompt ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [d["value"] for k, d in list(outcome["events"]) if k == "progress" and d.get("node") == SAMPLER_NODE]
        if steps and steps[-1] >= at_least:
            return
        if "error" in outcome or "result" in outcome:
            raise AssertionError(f"the prompt ended before step {at_least}: {outcome}")
        time.sleep(0.02)
    raise AssertionError(f"no progress to step {at_least} within {timeout} s")


def post_interrupt(server_url: str) -> None:
    request = urllib.request.Request(f"{server_url}/interrupt", data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def cancel_mid_run(server_url: str, graph: dict, after_steps: int = 3) -> list[int]:
    """Queue `graph`, press Cancel (POST /interrupt) once its sampler reached step `after_steps`, check the prompt ended
    interrupted within 20 s, and return the sampler's progress steps."""
    from comfyui_xdit.api_client import ExecutionInterrupted

    thread, outcome = run_in_background(ComfyClient(server_url), graph)
    wait_for_progress(outcome, after_steps)
    interrupted_at = time.monotonic()
    post_interrupt(server_url)
    thread.join(timeout=120)
    assert isinstance(outcome.get("error"), ExecutionInterrupted), outcome
    assert time.monotonic() - interrupted_at < 20
    return [d["value"] for kind, d in outcome["events"] if kind == "progress" and d.get("node") == SAMPLER_NODE]


def descendants(server: ComfyServer) -> list[psutil.Process]:
    try:
        return psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def pool_worker_processes(server: ComfyServer) -> list[psutil.Process]:
    """Every live PoolWorker actor process under the server (whatever pool it belongs to)."""
    return [p for p in descendants(server) if _title(p).startswith(POOL_WORKER_TITLE) and _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(processes: list[psutil.Process], timeout: float = 30) -> list[tuple[int, str]]:
    """(pid, title) of the `processes` still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.5)
    return [(p.pid, _title(p) or p.name()) for p in alive if _alive(p)]


@contextlib.contextmanager
def own_server(comfy_root: Path, tiny_flux_paths: dict[str, Path], folder: Path,
               env: dict[str, str] | None = None) -> Iterator[ComfyServer]:
    """A ComfyUI server of the test's own (tiny Flux dev only), with `env` added to its environment; stopped after."""
    base = prepare_base(folder / "base")
    (base / "models" / "diffusion_models" / TINY_UNET_NAMES["dev"]).symlink_to(tiny_flux_paths["dev"])
    server = launch_server(comfy_root, base, folder / "comfyui.log", env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
