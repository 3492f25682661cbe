"""The product through a real ComfyUI server: XDiT nodes on a local Ray pool vs the stock graph, over HTTP + ws.

Each prompt is an API-format graph UNETLoader → ModelSamplingFlux → BasicGuider/CFGGuider → SamplerCustomAdvanced
→ SaveLatent, run once as stock and once with only the loader and sampler swapped for the XDiT nodes.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from server_graphs import flux_graph, saved_latent, sd15_graph
from server_jobs import cancel_mid_run, run_in_background, wait_for_progress

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed, PromptRejected

pytestmark = pytest.mark.server

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


CASES = [
    ("ulysses2", "basic", {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}),
    ("ring2", "basic", {"world_size": 2, "ulysses_degree": 1, "ring_degree": 2, "cfg_degree": 1}),
    ("cfg2", "cfg", {"world_size": 2, "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 2}),
    ("hybrid4-ulysses2-cfg2", "cfg", {"world_size": 4, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 2}),
    ("hybrid4-ulysses2-ring2", "basic", {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1}),
]


@pytest.mark.parametrize(("name", "guider", "degrees"), CASES, ids=[c[0] for c in CASES])
def test_xdit_nodes_match_the_stock_graph(comfy_server, client, name, guider, degrees):
    stock = saved_latent(comfy_server, client.run(flux_graph(False, guider, prefix=f"stock_{name}"), timeout=300))
    result = client.run(flux_graph(True, guider, prefix=f"xdit_{name}", **degrees), timeout=600)
    xdit = saved_latent(comfy_server, result)
    assert xdit.shape == stock.shape
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    progress = [data for kind, data in result.events if kind == "progress" and data.get("node") == "11"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 3, "the sampler's progress bar reached every step"
    status = comfy_server.get_json("/xdit/status")["pool"]
    assert status["world_size"] == degrees["world_size"] and status["backend"] == "gloo"


# CFG amplifies rounding, and an EPS model's latents reach ~15: the bound is relative to the latent's size there.
RELATIVE_TOL = 2e-6


@pytest.fixture
def without_onednn(client):
    """The server computes with PyTorch's own convolution during the test, and with oneDNN again after it
    (xdit_test_nodes.XDiTTestOneDNN says why)."""
    client.run({"1": {"class_type": "XDiTTestOneDNN", "inputs": {"enabled": False}}}, timeout=60)
    yield
    client.run({"1": {"class_type": "XDiTTestOneDNN", "inputs": {"enabled": True}}}, timeout=60)


@pytest.mark.parametrize("degrees", [{"cfg_degree": 2}, {"data_degree": 2}, {}], ids=["cfg2", "data2", "auto"])
def test_a_model_without_an_adapter_runs_cfg_and_data_parallel(comfy_server, client, degrees, without_onednn):
    """An SD1.5 U-Net through the whole product: loader, pool, generic CFG / data wrappers; auto gives it cfg 2.
    The pool follows the server's torch switches: on an AVX2 CPU this failed (2.6e-6 of max) while the workers
    kept oneDNN on."""
    name = "-".join(f"{k}{v}" for k, v in degrees.items()) or "auto"
    stock = saved_latent(comfy_server, client.run(sd15_graph(False, prefix=f"sd15_stock_{name}"), timeout=300))
    xdit = saved_latent(comfy_server, client.run(sd15_graph(True, prefix=f"sd15_xdit_{name}", world_size=2, **degrees), timeout=600))
    assert xdit.shape == stock.shape == (2, 4, 10, 10)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= max(FP32_TOL, RELATIVE_TOL * stock.abs().max().item())
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == 2


def test_a_model_without_an_adapter_refuses_sequence_parallel_by_name(client):
    with pytest.raises(ExecutionFailed, match=r"SD15 supports cfg and data parallel only .*set ulysses_degree to 1"):
        client.run(sd15_graph(True, prefix="sd15_refused", world_size=2, ulysses_degree=2), timeout=300)


def test_a_second_prompt_on_the_same_model_loads_nothing(comfy_server, client):
    """The test knows through GET /xdit/status: every rank reports how often it loaded a model and built a
    parallel clone; a second prompt (new seed, same loader inputs) runs one more job and loads nothing."""
    degrees = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}
    client.run(flux_graph(True, seed=11, prefix="warm", **degrees), timeout=600)
    before = comfy_server.get_json("/xdit/status")["pool"]
    started = time.monotonic()
    client.run(flux_graph(True, seed=12, prefix="again", **degrees), timeout=600)
    seconds = time.monotonic() - started
    after = comfy_server.get_json("/xdit/status")["pool"]
    assert after["jobs_run"] == before["jobs_run"] + 1
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    for rank_before, rank_after in zip(before["ranks"], after["ranks"]):
        assert rank_after["model_loads"] == rank_before["model_loads"]
        assert rank_after["parallel_builds"] == rank_before["parallel_builds"]
    assert seconds < 30, f"a warm prompt took {seconds:.1f} s"


def test_a_world_change_loads_the_model_only_on_new_workers(comfy_server, client):
    """2 -> 4 -> 2 workers: ranks 0 and 1 keep their processes and resident model throughout (the pool is resized,
    not rebuilt), and each world's result is stock's."""
    two = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}
    four = {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1}
    client.run(flux_graph(True, seed=31, prefix="world2_first", **two), timeout=600)
    first = comfy_server.get_json("/xdit/status")["pool"]
    stock = saved_latent(comfy_server, client.run(flux_graph(False, seed=32, prefix="world_stock"), timeout=300))
    for degrees in (four, two):
        xdit = saved_latent(comfy_server, client.run(flux_graph(True, seed=32, prefix=f"world{degrees['world_size']}", **degrees), timeout=600))
        assert (xdit - stock).abs().max().item() <= FP32_TOL
        pool = comfy_server.get_json("/xdit/status")["pool"]
        assert pool["world_size"] == degrees["world_size"] and pool["kept_workers"] == 2
        assert [w["pid"] for w in pool["workers"][:2]] == [w["pid"] for w in first["workers"]]
        assert [r["model_loads"] for r in pool["ranks"][:2]] == [r["model_loads"] for r in first["ranks"]]


def test_bad_degrees_are_refused_before_the_prompt_runs(client):
    with pytest.raises(PromptRejected, match="does not divide world_size 2"):
        client.queue_prompt(flux_graph(True, world_size=2, ulysses_degree=4))


def test_a_stock_sampler_on_an_xdit_model_fails_clearly_and_the_server_stays_up(comfy_server, client):
    graph = flux_graph(True, prefix="mixed", world_size=2, ulysses_degree=2)
    graph["11"]["class_type"] = "SamplerCustomAdvanced"
    with pytest.raises(ExecutionFailed, match="sample it with XDiTSamplerCustomAdvanced"):
        client.run(graph, timeout=300)
    assert comfy_server.get_json("/object_info/XDiTUNetLoader")


def test_interrupt_stops_every_rank_and_the_next_prompt_works(comfy_server, client):
    degrees = {"world_size": 2, "ulysses_degree": 1, "ring_degree": 2, "cfg_degree": 1}
    client.run(flux_graph(True, seed=1, prefix="pre_interrupt", **degrees), timeout=600)  # pool and model warm
    steps = cancel_mid_run(comfy_server.url, flux_graph(True, seed=2, steps=400, prefix="interrupted", **degrees))
    assert steps[-1] < 400
    pool = comfy_server.get_json("/xdit/status")["pool"]
    assert pool is not None, "an interrupt leaves the pool running"
    client.run(flux_graph(True, seed=3, prefix="post_interrupt", **degrees), timeout=600)


def test_a_killed_worker_fails_the_prompt_clearly_and_the_next_prompt_rebuilds_the_pool(comfy_server, client):
    degrees = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}
    client.run(flux_graph(True, seed=21, prefix="pre_kill", **degrees), timeout=600)
    victim = comfy_server.get_json("/xdit/status")["pool"]["workers"][1]["pid"]
    thread, outcome = run_in_background(ComfyClient(comfy_server.url), flux_graph(True, seed=22, steps=400, prefix="killed", **degrees))
    wait_for_progress(outcome, 3)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    error = outcome.get("error")
    assert isinstance(error, ExecutionFailed), outcome
    assert "XDiT worker pool failed" in error.exception_message and "queue the prompt again" in error.exception_message
    assert comfy_server.get_json("/xdit/status")["pool"] is None
    stock = saved_latent(comfy_server, client.run(flux_graph(False, seed=23, prefix="after_kill_stock"), timeout=300))
    xdit = saved_latent(comfy_server, client.run(flux_graph(True, seed=23, prefix="after_kill", **degrees), timeout=600))
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    workers = comfy_server.get_json("/xdit/status")["pool"]["workers"]
    assert victim not in [w["pid"] for w in workers]
