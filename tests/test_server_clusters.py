"""Which Ray cluster ComfyUI joins is the operator's choice, never the workflow's (real server, real Ray heads).

A workflow naming the address of a running head that the operator did not configure is refused before any
connection (the head's job table shows no driver from ComfyUI); a configured head is used; a configured head that
does not answer fails the prompt in bounded time and leaves the private local cluster exactly as it was.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import psutil
import pytest

from ray_head import driver_pids, ray_head
from server_graphs import flux_graph, saved_latent
from silent_port import silent_port

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed, ExecutionInterrupted, PromptRejected
from comfyui_xdit.cluster_config import CLUSTERS_FILE, SYSTEM_USER

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
DEGREES = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="module")
def head():
    with ray_head() as address:
        yield address


@pytest.fixture
def clusters_file(comfy_server):
    """The operator's cluster file of the test server (read on every use, so no restart is needed)."""
    path = comfy_server.base / "user" / f"__{SYSTEM_USER}" / CLUSTERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    yield path
    path.unlink(missing_ok=True)


def _pool(comfy_server) -> dict:
    return comfy_server.get_json("/xdit/status")["pool"]


def test_a_workflow_naming_an_unconfigured_cluster_is_refused_before_any_connection(comfy_server, client, head):
    with pytest.raises(PromptRejected, match=r"is not a cluster configured on this ComfyUI .* XDIT_RAY_CLUSTERS"):
        client.queue_prompt(flux_graph(True, prefix="foreign", ray_address=head, **DEGREES))
    server_pids = {comfy_server.process.pid} | {p.pid for p in psutil.Process(comfy_server.process.pid).children(recursive=True)}
    assert not set(driver_pids(head)) & server_pids, "ComfyUI joined a cluster the workflow named"
    assert comfy_server.get_json("/object_info/XDiTUNetLoader")


def test_a_configured_cluster_is_used_and_one_that_does_not_answer_changes_nothing(comfy_server, client, head, clusters_file):
    stock = saved_latent(comfy_server, client.run(flux_graph(False, prefix="stock_clusters"), timeout=300))
    client.run(flux_graph(True, prefix="local_before", **DEGREES), timeout=600)
    local = _pool(comfy_server)
    assert local["cluster"] == "local" and local["ray_address"] == "local" and local["rendezvous"] == "file"

    clusters_file.write_text(json.dumps({"testhead": head, "gone": "127.0.0.1:1"}))
    choices = client.object_info()["XDiTUNetLoader"]["input"]["optional"]["ray_address"][0]
    assert choices == ["local", "gone", "testhead"]

    started = time.monotonic()
    with pytest.raises(ExecutionFailed, match=r"'gone' at 127.0.0.1:1 cannot be reached"):
        client.run(flux_graph(True, prefix="gone", ray_address="gone", **DEGREES), timeout=120)
    assert time.monotonic() - started < 30
    after = _pool(comfy_server)
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in local["workers"]], "the private pool was disturbed"
    client.run(flux_graph(True, seed=6, prefix="local_again", **DEGREES), timeout=600)  # a new seed: not cached
    again = _pool(comfy_server)
    assert [w["pid"] for w in again["workers"]] == [w["pid"] for w in local["workers"]]
    assert again["jobs_run"] == local["jobs_run"] + 1, "the same pool served the next prompt"

    used = saved_latent(comfy_server, client.run(flux_graph(True, prefix="testhead", ray_address="testhead", **DEGREES), timeout=600))
    assert (used - stock).abs().max().item() <= FP32_TOL
    remote = _pool(comfy_server)
    assert remote["cluster"] == "testhead" and remote["ray_address"] == head and remote["rendezvous"] == "tcp"
    assert comfy_server.process.pid in driver_pids(head), "the configured head was not the one used"
    # Back to the private cluster, as the rest of the session expects.
    client.run(flux_graph(True, prefix="local_after", **DEGREES), timeout=600)
    assert _pool(comfy_server)["cluster"] == "local"


def test_every_port_of_the_private_cluster_and_pool_listens_on_loopback_only(comfy_server, client):
    """ComfyUI's own port and everything the pack starts under it (Ray's GCS, raylet, agents, workers, the
    rendezvous store): nothing listens on another interface."""
    client.run(flux_graph(True, seed=7, prefix="ports", **DEGREES), timeout=600)
    assert _pool(comfy_server)["cluster"] == "local"
    server = psutil.Process(comfy_server.process.pid)
    listening = []
    for process in [server, *server.children(recursive=True)]:
        try:
            listening += [(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    names = {name for name, _, _ in listening}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), listening
    exposed = [entry for entry in listening if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_cancel_stops_an_attempt_to_reach_a_cluster_that_hangs(comfy_server, client, clusters_file):
    client.run(flux_graph(True, seed=8, prefix="before_hang", **DEGREES), timeout=600)
    pids = [w["pid"] for w in _pool(comfy_server)["workers"]]
    with silent_port() as address:
        clusters_file.write_text(json.dumps({"hangs": address}))
        outcome: dict = {}
        events: list = []

        def queue() -> None:
            try:
                client.run(flux_graph(True, prefix="hangs", ray_address="hangs", **DEGREES), timeout=120,
                           on_event=lambda kind, data: events.append((kind, data)))
            except Exception as error:  # the test inspects it
                outcome["error"] = error

        thread = threading.Thread(target=queue, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not any(kind == "executing" and data.get("node") == "1" for kind, data in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the loader is now waiting on the silent cluster
        cancelled_at = time.monotonic()
        request = urllib.request.Request(f"{comfy_server.url}/interrupt", data=b"{}", method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).read()
        thread.join(timeout=60)
    assert isinstance(outcome.get("error"), ExecutionInterrupted), outcome
    assert time.monotonic() - cancelled_at < 5
    assert [w["pid"] for w in _pool(comfy_server)["workers"]] == pids, "the private pool was disturbed"
