"""ray_backend on its own (no ComfyUI): a job its caller abandons is stopped on every rank before the next job
starts, every job of a worker runs on one thread in inference mode with the sender's torch switches, and a worker that dies while the model loads
takes the pool down so the next request starts a fresh one; a worker's startup imports run without the cyclic
collector and end frozen, with the collector back on."""
from __future__ import annotations

from echo_driver import run_echo_driver

DRIVER = """
import json
from ray_backend.clusters import LOCAL_TARGET
from ray_backend.errors import PoolFailure
from ray_backend.pool import PoolRegistry

class Cancelled(Exception):
    pass

def cancel_at_step_2(step, total, preview):
    if step >= 2:  # as ComfyUI's progress hook raises when the user cancels
        raise Cancelled()

registry = PoolRegistry("pool_echo_service:EchoService")
degrees = {"ulysses_degree": 2}
pool = registry.get(2, LOCAL_TARGET)
report = {}
try:
    pool.run({"value": 1, "steps": 1000, "step_s": 0.01}, degrees, on_progress=cancel_at_step_2)
except Cancelled:
    report["cancelled"] = True
report["after_cancel"] = pool.run({"value": 5}, degrees)["output"]
report["jobs_after_cancel"] = [s["jobs"] for s in pool.last_stats]
report["alive_after_cancel"] = pool.alive
for value in range(6):  # Ray answers each call on any thread of the actor's pool
    pool.run({"value": value}, degrees)
report["compute_threads"] = [s["compute_threads"] for s in pool.last_stats]
report["inference_mode"] = [s["inference_mode"] for s in pool.last_stats]
import torch
torch.backends.mkldnn.enabled = False  # as a node, or ComfyUI's --deterministic, sets them in the ComfyUI process
torch.use_deterministic_algorithms(True, warn_only=True)
pool.run({"value": 1}, degrees)
report["switches_sent"] = [s["switches"] for s in pool.last_stats]
torch.backends.mkldnn.enabled = True
torch.use_deterministic_algorithms(False)
pool.run({"value": 1}, degrees)
report["switches_back"] = [s["switches"] for s in pool.last_stats]
report["collector"] = [(s["collector_while_built"], s["collector_now"], s["frozen_objects"]) for s in pool.last_stats]
try:
    pool.warm({"die_rank": 1}, degrees)
except PoolFailure as error:
    report["warm_error"] = str(error)
report["alive_after_warm"] = pool.alive
fresh = registry.get(2, LOCAL_TARGET)
report["fresh_is_new"] = fresh is not pool
report["fresh"] = fresh.run({"value": 2}, degrees)["output"]
print(json.dumps(report))
registry.shutdown()
"""


def test_an_abandoned_job_stops_on_every_rank_and_a_death_in_prepare_takes_the_pool_down():
    report = run_echo_driver(DRIVER)
    assert report["cancelled"]
    # Without the stop, the 1000-step job (10 s) still ran on the ranks when the next job arrived.
    assert report["after_cancel"] == {"sum": 5 * 1 + 5 * 2, "world": 2, "overlapped": False}
    assert report["jobs_after_cancel"] == [1, 1], "the abandoned job ended at an interrupt, not at its last step"
    assert report["alive_after_cancel"]
    # One thread computes on each worker: with OpenMP teams of several threads alive, libgomp stops spin-waiting.
    assert report["compute_threads"] == [1, 1]
    assert report["inference_mode"] == [[True], [True]], "jobs run in inference mode, as ComfyUI runs a prompt's nodes"
    # Each job computes with the torch switches of the process that sent it.
    assert report["switches_sent"] == [[False, True]] * 2, report["switches_sent"]
    assert report["switches_back"] == [[True, False]] * 2, report["switches_back"]
    # The startup imports ran without the cyclic collector and were frozen after; the collector is back on for jobs.
    for while_built, now, frozen in report["collector"]:
        assert (while_built, now) == (False, True) and frozen > 50_000, report["collector"]
    assert report["warm_error"].startswith("loading the model in the worker pool failed:"), report
    assert report["alive_after_warm"] is False
    assert report["fresh_is_new"] and report["fresh"] == {"sum": 2 * 1 + 2 * 2, "world": 2, "overlapped": False}
