"""Stopping ComfyUI stops the pool: no Ray process or worker outlives a SIGTERM to the server, whether it ran one
pool, changed world size, went to an operator's cluster and back (a second private cluster), was still starting
its pool, or started it with ComfyUI (XDIT_PRESTART_WORKERS)."""
from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from ray_head import ray_head
from server_graphs import flux_graph
from server_jobs import descendants, own_server, pool_worker_processes, run_in_background, survivors

from comfyui_xdit.api_client import ComfyClient, PromptRejected
from comfyui_xdit.cluster_config import CLUSTERS_FILE, SYSTEM_USER

pytestmark = pytest.mark.server

ULYSSES2 = {"world_size": 2, "ulysses_degree": 2}
SIZE = 64


def _sigterm_leaves_nothing(server, seen: list[psutil.Process]) -> None:
    server.process.send_signal(signal.SIGTERM)  # the server only, as a service manager would
    server.process.wait(timeout=60)
    left = survivors(seen)
    assert not left, f"left running after ComfyUI exited: {left}\n{server.log_tail()}"


def _names(processes: list[psutil.Process]) -> set[str]:
    names = set()
    for p in processes:
        try:
            names.add(p.name())
        except psutil.NoSuchProcess:
            pass
    return names


def test_sigterm_to_comfyui_stops_every_pool_and_ray_process(comfy_root, tiny_flux_paths, tmp_path):
    with own_server(comfy_root, tiny_flux_paths, tmp_path) as server:
        ComfyClient(server.url).run(flux_graph(True, size=SIZE, **ULYSSES2), timeout=600)
        seen = descendants(server)
        assert any("raylet" in n for n in _names(seen)), f"expected a local Ray cluster under ComfyUI, found {_names(seen)}"
        _sigterm_leaves_nothing(server, seen)


def test_sigterm_after_a_world_change_and_a_cluster_round_trip(comfy_root, tiny_flux_paths, tmp_path):
    with ray_head() as head, own_server(comfy_root, tiny_flux_paths, tmp_path) as server:
        client = ComfyClient(server.url)
        client.run(flux_graph(True, seed=1, size=SIZE, **ULYSSES2), timeout=600)
        client.run(flux_graph(True, seed=2, size=SIZE, world_size=4, ulysses_degree=2, ring_degree=2), timeout=600)
        assert len(pool_worker_processes(server)) == 4, "the world-2 pool was replaced, not joined"
        first_cluster = descendants(server)
        clusters = server.base / "user" / f"__{SYSTEM_USER}" / CLUSTERS_FILE
        clusters.parent.mkdir(parents=True, exist_ok=True)
        clusters.write_text(json.dumps({"testhead": head}))
        client.run(flux_graph(True, seed=3, size=SIZE, ray_address="testhead", **ULYSSES2), timeout=600)
        assert server.get_json("/xdit/status")["pool"]["cluster"] == "testhead"
        left = survivors(first_cluster)
        assert not left, f"the first private cluster outlived the switch to another cluster: {left}"
        client.run(flux_graph(True, seed=4, size=SIZE, **ULYSSES2), timeout=600)
        assert server.get_json("/xdit/status")["pool"]["cluster"] == "local"
        second_cluster = descendants(server)
        assert any("raylet" in n for n in _names(second_cluster)), "back on a new private cluster"
        _sigterm_leaves_nothing(server, second_cluster)


def test_sigterm_while_the_pool_starts(comfy_root, tiny_flux_paths, tmp_path):
    with own_server(comfy_root, tiny_flux_paths, tmp_path) as server:
        _, outcome = run_in_background(ComfyClient(server.url), flux_graph(True, size=SIZE, **ULYSSES2))
        deadline = time.monotonic() + 300
        while not pool_worker_processes(server):
            assert time.monotonic() < deadline and "result" not in outcome, f"no pool worker appeared: {outcome}"
            time.sleep(0.05)
        _sigterm_leaves_nothing(server, descendants(server))


def test_the_pool_started_with_comfyui_serves_a_prompt_queued_meanwhile_and_stops_with_it(comfy_root, tiny_flux_paths, tmp_path):
    """XDIT_PRESTART_WORKERS=2: the pool starts while ComfyUI starts; a prompt queued before it is up waits for it
    (one Ray cluster, one pool of 2: nothing started twice), and a SIGTERM still stops every process."""
    with own_server(comfy_root, tiny_flux_paths, tmp_path, env={"XDIT_PRESTART_WORKERS": "2"}) as server:
        assert server.get_json("/xdit/status")["prestart"]["state"] == "starting"
        ComfyClient(server.url).run(flux_graph(True, size=SIZE, **ULYSSES2), timeout=600)
        status = server.get_json("/xdit/status")
        assert status["prestart"]["state"] == "ready" and status["prestart"]["world_size"] == 2
        assert status["pool"]["jobs_run"] == 1 and [r["model_loads"] for r in status["pool"]["ranks"]] == [1, 1]
        seen = descendants(server)
        assert len(pool_worker_processes(server)) == 2
        assert sum("raylet" in n for n in (p.name() for p in seen)) == 1, _names(seen)
        _sigterm_leaves_nothing(server, seen)


def test_a_queued_prompt_starts_the_local_pool_and_a_refused_one_starts_nothing(comfy_root, tiny_flux_paths, tmp_path):
    """The pool starts when a prompt that needs it is queued, before its loader runs (one cluster, one pool of 2:
    nothing started twice); a prompt naming a cluster the operator did not configure is refused and starts nothing;
    a SIGTERM still stops every process."""
    with own_server(comfy_root, tiny_flux_paths, tmp_path) as server:
        client = ComfyClient(server.url)
        with pytest.raises(PromptRejected):
            client.queue_prompt(flux_graph(True, size=SIZE, ray_address="nowhere", **ULYSSES2))
        assert server.get_json("/xdit/status")["queued_start"] == {"state": "off"}
        assert not any("raylet" in n for n in _names(descendants(server)))
        client.run(flux_graph(True, size=SIZE, **ULYSSES2), timeout=600)
        status = server.get_json("/xdit/status")
        assert status["queued_start"]["state"] == "ready" and status["queued_start"]["world_size"] == 2, status["queued_start"]
        assert status["pool"]["cold_start"]["started_for"] == "queued prompt" and status["pool"]["jobs_run"] == 1
        seen = descendants(server)
        assert len(pool_worker_processes(server)) == 2
        assert sum("raylet" in n for n in (p.name() for p in seen)) == 1, _names(seen)
        _sigterm_leaves_nothing(server, seen)
