"""Many prompts through the real server: a 100-prompt soak (degrees, seeds, LoRAs and interrupts alternating),
two clients queueing at once, and world-size switches that must never leave two pools resident.

Figures (prompt times, RSS drift) are printed as one JSON line per test: run with -s to see them.
"""
from __future__ import annotations

import json
import statistics
import threading
import time

import psutil
import pytest

from server_graphs import flux_graph, saved_latent
from server_jobs import pool_worker_processes, post_interrupt, run_in_background, survivors, wait_for_progress
from test_server_lora import lora_graph
from test_server_pool import FP32_TOL

from comfyui_xdit.api_client import ComfyClient, ExecutionInterrupted, PromptResult
from comfyui_xdit.testing.tiny_loras import flux_shapes, write_flux_lora

SIZE = 64  # 64 px: a 8x8 latent, 16 image tokens: every prompt is tiny
STEPS = 2
ULYSSES2 = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}
RING2 = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 2, "cfg_degree": 1}
CFG2 = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 2}
MODES = [("basic", ULYSSES2), ("basic", RING2), ("cfg", CFG2)]
SOAK_PROMPTS = 100
INTERRUPT_EVERY = 10
RSS_DRIFT_LIMIT = 0.05


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="module")
def soak_loras(comfy_server, tiny_flux_paths) -> list[list[tuple[str, float]]]:
    """LoRA stacks the soak cycles through (none, one, the other, both)."""
    folder = comfy_server.models_dir("loras")
    folder.mkdir(parents=True, exist_ok=True)
    shapes = flux_shapes(tiny_flux_paths["dev"])
    a = write_flux_lora(folder / "soak-a.safetensors", shapes, "kohya", rank=4, seed=31).name
    b = write_flux_lora(folder / "soak-b.safetensors", shapes, "diffusers", rank=8, seed=32).name
    return [[], [(a, 0.8)], [(b, -0.5)], [(a, 0.5), (b, 0.7)]]


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _snapshot(comfy_server) -> dict:
    pool = comfy_server.get_json("/xdit/status")["pool"]
    return {"server_rss": _rss(comfy_server.process.pid), "pids": [w["pid"] for w in pool["workers"]],
            "worker_rss": [_rss(w["pid"]) for w in pool["workers"]], "model_loads": [r["model_loads"] for r in pool["ranks"]],
            "parallel_builds": [r["parallel_builds"] for r in pool["ranks"]]}


def _drift(after: int, before: int) -> float:
    return (after - before) / before


@pytest.mark.soak
@pytest.mark.server
def test_a_hundred_prompts_hold_memory_processes_and_loads_steady(comfy_server, client, soak_loras):
    times, interrupts, at_10 = [], 0, None
    for i in range(1, SOAK_PROMPTS + 1):
        guider, degrees = MODES[i % len(MODES)]
        stack = soak_loras[(i // len(MODES)) % len(soak_loras)]
        if i % INTERRUPT_EVERY == 0:
            graph = lora_graph(True, stack, guider=guider, seed=1000 + i, steps=400, size=SIZE, prefix=f"soak_{i}", **degrees)
            thread, outcome = run_in_background(ComfyClient(comfy_server.url), graph)
            wait_for_progress(outcome, 1)
            post_interrupt(comfy_server.url)
            thread.join(timeout=120)
            assert isinstance(outcome.get("error"), ExecutionInterrupted), f"prompt {i}: {outcome.get('error')!r}"
            interrupts += 1
        else:
            started = time.monotonic()
            client.run(lora_graph(True, stack, guider=guider, seed=1000 + i, steps=STEPS, size=SIZE, prefix=f"soak_{i}", **degrees), timeout=300)
            times.append(time.monotonic() - started)
        if i == 10:
            at_10 = _snapshot(comfy_server)
    at_100 = _snapshot(comfy_server)
    figures = {"prompts": SOAK_PROMPTS, "interrupts": interrupts, "prompt_s_median": round(statistics.median(times), 3),
               "prompt_s_max": round(max(times), 3), "server_rss_mb": [at_10["server_rss"] >> 20, at_100["server_rss"] >> 20],
               "server_rss_drift": round(_drift(at_100["server_rss"], at_10["server_rss"]), 4),
               "worker_rss_drift": [round(_drift(a, b), 4) for a, b in zip(at_100["worker_rss"], at_10["worker_rss"])]}
    print(json.dumps({"soak": figures}))
    assert interrupts == SOAK_PROMPTS // INTERRUPT_EVERY
    assert at_100["pids"] == at_10["pids"], "the pool was never restarted"
    assert at_100["model_loads"] == at_10["model_loads"] and at_100["parallel_builds"] == at_10["parallel_builds"], "warm prompts load nothing"
    assert abs(figures["server_rss_drift"]) <= RSS_DRIFT_LIMIT, figures
    assert all(abs(d) <= RSS_DRIFT_LIMIT for d in figures["worker_rss_drift"]), figures
    assert sorted(p.pid for p in pool_worker_processes(comfy_server)) == sorted(at_100["pids"]), "no leaked worker processes"


def test_switching_world_size_never_leaves_two_pools_resident(comfy_server, client):
    worlds = [ULYSSES2, {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1}, RING2]
    previous: list[psutil.Process] = []
    for n, degrees in enumerate(worlds):
        client.run(flux_graph(True, seed=300 + n, steps=STEPS, size=SIZE, prefix=f"switch_{n}", **degrees), timeout=600)
        pids = [w["pid"] for w in comfy_server.get_json("/xdit/status")["pool"]["workers"]]
        assert len(pids) == degrees["world_size"]
        assert not survivors([p for p in previous if p.pid not in pids]), "the previous pool's workers outlived the switch"
        resident = pool_worker_processes(comfy_server)
        assert sorted(p.pid for p in resident) == sorted(pids), f"one pool resident, found {[p.pid for p in resident]} for {pids}"
        previous = resident


def _wait_done(client: ComfyClient, prompt_id: str, timeout: float = 600) -> PromptResult:
    deadline = time.monotonic() + timeout
    while (entry := client.history(prompt_id)) is None or not entry.get("status", {}).get("completed"):
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish in {timeout} s"
        assert entry is None or entry.get("status", {}).get("status_str") != "error", entry["status"]
        time.sleep(0.2)
    return PromptResult(prompt_id, entry["outputs"])


def test_two_clients_queueing_twenty_prompts_each_get_the_stock_results(comfy_server):
    per_client = 20
    clients = [ComfyClient(comfy_server.url, client_id=f"soak-client-{c}") for c in range(2)]
    jobs = {c: [(2000 + 100 * c + i, *MODES[i % len(MODES)]) for i in range(per_client)] for c in range(2)}
    queued: dict[int, list[tuple[int, str, str]]] = {}
    start = threading.Barrier(2)

    def queue(c: int) -> None:
        start.wait()
        queued[c] = [(seed, guider, clients[c].queue_prompt(flux_graph(True, guider, seed=seed, steps=STEPS, size=SIZE, prefix=f"conc_{seed}", **degrees)))
                     for seed, guider, degrees in jobs[c]]

    threads = [threading.Thread(target=queue, args=(c,)) for c in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    results = {(seed, guider): saved_latent(comfy_server, _wait_done(clients[c], prompt_id))
               for c in range(2) for seed, guider, prompt_id in queued[c]}
    seconds = time.monotonic() - started
    assert len(results) == 2 * per_client
    stock_client = ComfyClient(comfy_server.url)
    worst = 0.0
    for (seed, guider), xdit in results.items():
        stock = saved_latent(comfy_server, stock_client.run(flux_graph(False, guider, seed=seed, steps=STEPS, size=SIZE, prefix=f"conc_stock_{seed}"), timeout=300))
        worst = max(worst, (xdit - stock).abs().max().item())
    print(json.dumps({"concurrency": {"prompts": len(results), "seconds": round(seconds, 1), "max_abs_error": worst}}))
    assert worst <= FP32_TOL
