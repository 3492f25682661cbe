"""A real two-node Ray cluster behind a real ComfyUI server: a head on 127.0.0.2 and a second node on 127.0.0.3
(own raylet, object store and temp dir, its ports pinned as between machines), each offering 2 CPU worker slots
(`xdit_worker`), configured through the operator's clusters.json.

A world-4 pool puts ranks 0,1 on the head and 2,3 on the second node, and is exact against the stock graph for
Ulysses x Ring and Ulysses x CFG, across a LoRA switch, and for PipeFusion with one stage per node at full warmup.
Then the second node is killed mid-prompt: the prompt fails clearly within 30 s, ComfyUI stays up, a world-4
prompt is refused naming the slots that are left, and a world-2 prompt runs exact on the head alone.
"""
from __future__ import annotations

import json
import re
import threading
import time

import psutil
import pytest

from ray_head import alive_node_addresses, ray_head, ray_node
from server_graphs import flux_graph, saved_latent
from test_server_lora import lora_graph, loras  # noqa: F401 (loras: the LoRA files fixture)

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.cluster_config import CLUSTERS_FILE, SYSTEM_USER
from ray_backend.placement import WORKER_SLOT_RESOURCE

FP32_TOL = 1e-5
CLUSTER = "two"
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"  # tests/ray_head.py: why not 127.0.0.1
SLOTS = {WORKER_SLOT_RESOURCE: 2}
U2R2 = {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1, "ray_address": CLUSTER}
U2CFG2 = {"world_size": 4, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 2, "ray_address": CLUSTER}
PF2U2 = {"world_size": 4, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1, "pipefusion_degree": 2, "ray_address": CLUSTER}
TIMINGS: dict[str, float] = {}  # printed at the end of the module (README's table)


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="module")
def cluster(comfy_server):
    """The two nodes, named 'two' in the test server's clusters.json; yields (head address, second node)."""
    path = comfy_server.base / "user" / f"__{SYSTEM_USER}" / CLUSTERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Ray's health checks list a lost node dead after 5 failed checks 3 s apart; 40 here, so that the test proves
    # the pool finds a lost node by itself, however fast or slow this machine runs.
    with ray_head(SLOTS, env={"RAY_health_check_failure_threshold": "40"}) as head, ray_node(head, SECOND_IP, SLOTS) as second:
        TIMINGS["two nodes up (s)"] = time.monotonic() - started
        path.write_text(json.dumps({CLUSTER: head}))
        try:
            yield head, second
        finally:
            path.unlink(missing_ok=True)
            # Leave the session's later tests a private pool, not one on a cluster about to vanish.
            ComfyClient(comfy_server.url).run(flux_graph(True, seed=99, prefix="mn_back_local", world_size=2), timeout=600)
    print("\ntwo-node timings:", json.dumps({k: round(v, 2) for k, v in TIMINGS.items()}))


def _pool(comfy_server) -> dict:
    return comfy_server.get_json("/xdit/status")["pool"]


def _stock(comfy_server, client, guider: str, prefix: str, seed: int = 5, steps: int = 3):
    return saved_latent(comfy_server, client.run(flux_graph(False, guider, seed=seed, steps=steps, prefix=prefix), timeout=300))


def _timed(comfy_server, client, graph: dict, label: str):
    started = time.monotonic()
    latent = saved_latent(comfy_server, client.run(graph, timeout=600))
    TIMINGS[label] = time.monotonic() - started
    return latent


def test_a_world_of_four_spreads_over_both_nodes_and_is_exact(comfy_server, client, cluster):
    stock = _stock(comfy_server, client, "basic", "mn_stock_basic")
    xdit = _timed(comfy_server, client, flux_graph(True, prefix="mn_u2r2", **U2R2), "first prompt, ulysses2 x ring2, incl. pool start (s)")
    assert stock.abs().max() > 0.1 and (xdit - stock).abs().max().item() <= FP32_TOL

    pool = _pool(comfy_server)
    assert pool["cluster"] == CLUSTER and pool["ray_address"] == cluster[0] and pool["backend"] == "gloo"
    assert [w["node_address"] for w in pool["workers"]] == [HEAD_IP, HEAD_IP, SECOND_IP, SECOND_IP], "ranks grouped per node"
    assert len({w["node_id"] for w in pool["workers"]}) == 2
    assert pool["workers"][0]["node_id"] == pool["workers"][1]["node_id"] != pool["workers"][2]["node_id"] == pool["workers"][3]["node_id"]
    TIMINGS["pool start, 4 workers on 2 nodes (s)"] = pool["startup_s"]
    low, high = cluster[1].ports["min_worker"], cluster[1].ports["max_worker"]
    for worker in pool["workers"][2:]:  # the second node's pinned worker ports hold, as README tells operators
        listening = [c.laddr.port for c in psutil.Process(worker["pid"]).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert any(low <= port <= high for port in listening), (worker, listening, (low, high))

    stock_cfg = _stock(comfy_server, client, "cfg", "mn_stock_cfg")
    xdit_cfg = _timed(comfy_server, client, flux_graph(True, "cfg", prefix="mn_u2cfg2", **U2CFG2), "warm prompt, ulysses2 x cfg2 (s)")
    assert (xdit_cfg - stock_cfg).abs().max().item() <= FP32_TOL
    assert [w["pid"] for w in _pool(comfy_server)["workers"]] == [w["pid"] for w in pool["workers"]], "one pool served both"


def test_a_lora_switch_on_both_nodes_matches_stock_loras(comfy_server, client, cluster, loras):
    def stock(name):
        return saved_latent(comfy_server, client.run(lora_graph(False, [(loras[name], 0.8)], prefix=f"mn_lora_stock_{name}"), timeout=300))

    first = saved_latent(comfy_server, client.run(lora_graph(True, [(loras["a"], 0.8)], prefix="mn_lora_a", **U2R2), timeout=600))
    before = _pool(comfy_server)
    switched = _timed(comfy_server, client, lora_graph(True, [(loras["b"], 0.8)], prefix="mn_lora_b", **U2R2), "LoRA switch prompt (s)")
    after = _pool(comfy_server)
    assert (first - stock("a")).abs().max().item() <= FP32_TOL
    assert (switched - stock("b")).abs().max().item() <= FP32_TOL
    assert (switched - first).abs().max() > 0.05
    for rank_before, rank_after in zip(before["ranks"], after["ranks"]):
        assert rank_after["model_loads"] == rank_before["model_loads"], "the switch reloaded no base weights on any node"
        assert rank_after["lora_switches"] == rank_before["lora_switches"] + 1


def test_pipefusion_with_one_stage_per_node_is_exact_at_full_warmup(comfy_server, client, cluster):
    steps = 4
    stock = _stock(comfy_server, client, "basic", "mn_pf_stock", steps=steps)
    graph = flux_graph(True, steps=steps, prefix="mn_pf", sampler_inputs={"warmup_steps": steps}, **PF2U2)
    xdit = _timed(comfy_server, client, graph, "PipeFusion 2 stages x ulysses 2, model reload (s)")
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    pool = _pool(comfy_server)
    held = [rank["block_parameters_held"] for rank in pool["ranks"]]
    total = pool["ranks"][0]["block_parameters_total"]
    assert held[0] == held[1] and held[2] == held[3] and held[0] + held[2] == total and 0 < held[0] < total, \
        f"stage 0 on {pool['workers'][0]['node_address']}, stage 1 on {pool['workers'][2]['node_address']}: {held}"


def test_losing_the_second_node_mid_prompt_fails_clearly_and_what_is_left_keeps_serving(comfy_server, client, cluster):
    head, second = cluster
    client.run(flux_graph(True, seed=31, prefix="mn_pre_kill", **U2R2), timeout=600)
    outcome: dict = {}

    def run_long():
        try:
            outcome["result"] = ComfyClient(comfy_server.url).run(
                flux_graph(True, seed=32, steps=400, prefix="mn_killed", **U2R2),
                on_event=lambda kind, data: outcome.setdefault("events", []).append((kind, data)), timeout=600)
        except Exception as error:  # inspected below
            outcome["error"] = error
            outcome["failed_at"] = time.monotonic()

    thread = threading.Thread(target=run_long, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not any(kind == "progress" and data.get("node") == "11" and data["value"] >= 3 for kind, data in outcome.get("events", [])):
        assert time.monotonic() < deadline and "error" not in outcome and "result" not in outcome, outcome
        time.sleep(0.05)
    killed_at = time.monotonic()
    second.kill()
    thread.join(timeout=120)
    error = outcome.get("error")
    assert isinstance(error, ExecutionFailed), outcome
    TIMINGS["killed node -> prompt failed (s)"] = outcome["failed_at"] - killed_at
    assert outcome["failed_at"] - killed_at < 30
    assert re.search(rf"XDiT worker pool failed: worker rank [23] on Ray node {SECOND_IP} \(node \w+, ranks 2, 3\) died during the job",
                     error.exception_message), error.exception_message
    assert comfy_server.get_json("/object_info/XDiTUNetLoader"), "ComfyUI is up"
    assert _pool(comfy_server) is None, "the broken pool was stopped"

    # Ray still lists the node alive (its health checks, slowed above): the pool sees its raylet not answering.
    with pytest.raises(ExecutionFailed, match=r"world_size 4 needs 4 CPU worker slots, but the Ray cluster 'two' now has 2 on "
                                              r"1 node: 127.0.0.2 \(2 CPU worker slots\); set world_size to 2 or less"):
        client.run(flux_graph(True, seed=33, prefix="mn_four_left", **U2R2), timeout=300)
    assert _pool(comfy_server) is None, "nothing was started"
    TIMINGS["killed node -> world 4 refused (s)"] = time.monotonic() - killed_at
    assert SECOND_IP in alive_node_addresses(head), "refused while Ray still listed the lost node alive"

    left = {**U2R2, "world_size": 2, "ring_degree": 1}
    stock = _stock(comfy_server, client, "basic", "mn_after_stock", seed=34)
    xdit = _timed(comfy_server, client, flux_graph(True, seed=34, prefix="mn_after", **left), "world 2 on the head alone, incl. pool start (s)")
    assert (xdit - stock).abs().max().item() <= FP32_TOL
    assert [w["node_address"] for w in _pool(comfy_server)["workers"]] == [HEAD_IP, HEAD_IP]
