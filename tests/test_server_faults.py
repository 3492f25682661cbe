"""Faults through a real server of the module's own (its stall limit cut to STALL_S): a worker SIGKILLed while a
fresh pool starts, while it reads a LoRA, during PipeFusion sampling, and a worker SIGSTOPped during sampling.
Each ends the prompt with a clear error in bounded time, and the next prompt works (exact against stock).

The time from the signal to the failed prompt is printed as one JSON line per test (run with -s to see it).
"""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import save_file

from server_graphs import flux_graph, saved_latent
from server_jobs import own_server, pool_worker_processes, run_in_background, survivors, wait_for_progress
from test_server_lora import lora_graph
from test_server_pool import FP32_TOL

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.tiny_loras import flux_lora, flux_shapes

pytestmark = pytest.mark.server

STALL_S = 8
SIZE = 64
ULYSSES2 = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}
PIPEFUSION2 = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 1, "pipefusion_degree": 2}
PADDING_FLOATS = 128 * 2**20  # 512 MB: reading it takes the worker long enough to be caught at it


@pytest.fixture(scope="module")
def server(comfy_root, tiny_flux_paths, tmp_path_factory):
    with own_server(comfy_root, tiny_flux_paths, tmp_path_factory.mktemp("faults"), env={"XDIT_STALL_TIMEOUT_S": str(STALL_S)}) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> ComfyClient:
    return ComfyClient(server.url)


def _workers(server) -> list[int]:
    return [w["pid"] for w in server.get_json("/xdit/status")["pool"]["workers"]]


def _failed_clearly(outcome: dict, node_type: str, signalled_at: float, fault: str) -> str:
    error = outcome.get("error")
    assert isinstance(error, ExecutionFailed), outcome
    assert error.node_type == node_type, error
    assert "XDiT worker pool failed" in error.exception_message and "queue the prompt again" in error.exception_message, error
    print(json.dumps({"fault": fault, "detected_s": round(outcome["ended"] - signalled_at, 2)}))
    return error.exception_message


def _next_prompt_is_exact(server, client, seed: int, graph_kwargs: dict, stock_kwargs: dict | None = None) -> None:
    stock = saved_latent(server, client.run(flux_graph(False, seed=seed, steps=2, size=SIZE, prefix=f"stock_{seed}", **(stock_kwargs or {})), timeout=300))
    xdit = saved_latent(server, client.run(flux_graph(True, seed=seed, steps=2, size=SIZE, prefix=f"next_{seed}", **graph_kwargs), timeout=600))
    assert (xdit - stock).abs().max().item() <= FP32_TOL


def test_a_worker_killed_while_a_fresh_pool_starts(server, client):
    assert server.get_json("/xdit/status")["pool"] is None, "this test needs the server's first pool"
    thread, outcome = run_in_background(ComfyClient(server.url), flux_graph(True, seed=1, steps=2, size=SIZE, prefix="start_kill", **ULYSSES2))
    deadline = time.monotonic() + 300
    while len(workers := pool_worker_processes(server)) < 2:
        assert time.monotonic() < deadline and "error" not in outcome and "result" not in outcome, f"no pool started: {outcome}"
        time.sleep(0.05)
    workers[-1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=300)
    message = _failed_clearly(outcome, "XDiTUNetLoader", killed_at, "SIGKILL during pool start-up")
    assert "did not start" in message or "loading the model" in message, message
    assert server.get_json("/xdit/status")["pool"] is None
    assert not survivors(workers), "the failed pool's other worker was left running"
    _next_prompt_is_exact(server, client, 2, ULYSSES2)


def test_a_worker_killed_while_it_reads_a_lora(server, client, tiny_flux_paths):
    folder = server.models_dir("loras")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = flux_lora(flux_shapes(tiny_flux_paths["dev"]), "kohya", rank=4, seed=41)
    tensors["xdit_test_padding"] = torch.zeros(PADDING_FLOATS)  # no model weight takes it: read, then ignored
    save_file(tensors, str(folder / "padded.safetensors"))
    del tensors
    client.run(flux_graph(True, seed=3, steps=2, size=SIZE, prefix="lora_warm", **ULYSSES2), timeout=600)
    victim = _workers(server)[1]
    thread, outcome = run_in_background(ComfyClient(server.url), lora_graph(True, [("padded.safetensors", 0.8)], seed=4, steps=2, size=SIZE, prefix="lora_kill", **ULYSSES2))
    maps = f"/proc/{victim}/maps"
    while "padded.safetensors" not in open(maps).read():  # the worker maps the file while it reads it
        assert "error" not in outcome and "result" not in outcome, f"the LoRA was never seen being read: {outcome}"
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=300)
    _failed_clearly(outcome, "XDiTSamplerCustomAdvanced", killed_at, "SIGKILL during a LoRA load/merge")
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    stock = saved_latent(server, client.run(lora_graph(False, [("padded.safetensors", 0.8)], seed=5, steps=2, size=SIZE, prefix="lora_stock"), timeout=300))
    xdit = saved_latent(server, client.run(lora_graph(True, [("padded.safetensors", 0.8)], seed=5, steps=2, size=SIZE, prefix="lora_next", **ULYSSES2), timeout=600))
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    (folder / "padded.safetensors").unlink()


def test_a_worker_killed_during_pipefusion_sampling(server, client):
    client.run(flux_graph(True, seed=6, steps=2, size=SIZE, prefix="pf_warm", **PIPEFUSION2), timeout=600)
    victim = _workers(server)[1]
    thread, outcome = run_in_background(ComfyClient(server.url), flux_graph(True, seed=7, steps=400, size=SIZE, prefix="pf_kill", **PIPEFUSION2))
    wait_for_progress(outcome, 3)  # past the one warmup step: the stages pass stale patches through the pipeline
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=300)
    _failed_clearly(outcome, "XDiTSamplerCustomAdvanced", killed_at, "SIGKILL during PipeFusion sampling")
    # Every step synchronous: PipeFusion is exact, so the next prompt is compared with stock.
    _next_prompt_is_exact(server, client, 8, {**PIPEFUSION2, "sampler_inputs": {"warmup_steps": 2}})


def test_a_stopped_worker_is_ended_by_the_stall_limit(server, client):
    client.run(flux_graph(True, seed=9, steps=2, size=SIZE, prefix="stop_warm", **ULYSSES2), timeout=600)
    victim = _workers(server)[1]
    thread, outcome = run_in_background(ComfyClient(server.url), flux_graph(True, seed=10, steps=400, size=SIZE, prefix="stopped", **ULYSSES2))
    wait_for_progress(outcome, 3)
    victim_process = psutil.Process(victim)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        thread.join(timeout=STALL_S + 120)
        message = _failed_clearly(outcome, "XDiTSamplerCustomAdvanced", stopped_at, f"SIGSTOP during sampling (stall limit {STALL_S} s)")
        assert f"made no progress for {STALL_S} s" in message, message
        assert outcome["ended"] - stopped_at >= STALL_S
        assert not survivors([victim_process]), "the stopped worker was left behind"
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    _next_prompt_is_exact(server, client, 11, ULYSSES2)
