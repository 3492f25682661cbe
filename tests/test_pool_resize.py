"""ray_backend on its own (no ComfyUI): a world change keeps the workers that can serve the new world.

Growing 2 -> 3 keeps ranks 0 and 1 (same processes, same service and so the same resident model) and starts one;
shrinking 3 -> 1 keeps rank 0 and stops the others; every world's group computes over exactly its own ranks. The
private cluster holds no idle Ray workers, and its raylet retries a socket every 10 ms rather than every second.
Each world's workers compute with the machine's cores shared out among them, kept workers included."""
from __future__ import annotations

import os

import psutil

from echo_driver import run_echo_driver

DRIVER = """
import json
import psutil
from ray_backend.clusters import LOCAL_TARGET
from ray_backend.pool import PoolRegistry


def idle_workers():
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "ray::IDLE" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:  # a stopped worker not reaped yet
            pass
    return found


registry = PoolRegistry("pool_echo_service:EchoService")
report = []
for world in (2, 3, 1, 2):
    pool = registry.get(world, LOCAL_TARGET)
    idle = idle_workers()
    pool.warm({}, {"ulysses_degree": world})
    output = pool.run({"value": 1, "steps": 2}, {"ulysses_degree": world})["output"]
    report.append({"world": world, "pool": id(pool), "sum": output["sum"], "kept": pool.kept_workers,
                   "stats": pool.last_stats, "pids": [w["pid"] for w in pool.workers], "cold": pool.status()["cold_start"], "idle": idle})
from ray._private.state import state  # the system config Ray's GCS holds for this cluster
config = state.get_system_config()
print(json.dumps({"worlds": report, "config": {key: config.get(key) for key in (
    "enable_worker_prestart", "prestart_worker_first_driver", "raylet_client_connect_timeout_milliseconds",
    "raylet_client_num_connect_attempts")}}))
registry.shutdown()
"""


def test_a_world_change_keeps_the_workers_that_fit_and_forms_a_group_of_the_new_size():
    report = run_echo_driver(DRIVER)
    two, three, one, two_again = report["worlds"]
    # The all-reduce of value * (rank + 1) sums over exactly the new world's ranks.
    assert [r["sum"] for r in (two, three, one, two_again)] == [3.0, 6.0, 1.0, 3.0]
    assert len({r["pool"] for r in (two, three, one, two_again)}) == 1, "the pool object was replaced, not resized"
    assert three["pids"][:2] == two["pids"] and three["pids"][2] not in two["pids"] and three["kept"] == 2
    assert [s["regroups"] for s in three["stats"]] == [1, 1, 0]
    assert [s["jobs"] for s in three["stats"]] == [2, 2, 1], "kept workers keep their service (and resident model)"
    assert one["pids"] == two["pids"][:1] and one["kept"] == 1
    assert two_again["pids"][0] == two["pids"][0] and two_again["kept"] == 1
    # The private cluster starts no idle Ray workers (ours carry their own environment, so none could be used).
    assert [r["idle"] for r in (two, three, one, two_again)] == [[]] * 4
    # The raylet retries its object store's socket every 10 ms, not every second (a 1 s stall in some starts).
    assert report["config"] == {"enable_worker_prestart": False, "prestart_worker_first_driver": False,
                                "raylet_client_connect_timeout_milliseconds": 10, "raylet_client_num_connect_attempts": 1000}
    # Each start's record (the demo prints it): only the first started Ray; only new workers have a process start.
    assert two["cold"]["ray_s"] > 0 and three["cold"]["ray_s"] == 0
    assert [r["cold"]["new_workers"] for r in (two, three, one, two_again)] == [2, 1, 0, 1]
    for record in (two, three, one, two_again):
        cold = record["cold"]
        assert min(cold["workers_s"], cold["group_s"], cold["loads_s"], cold["first_job_s"], cold["first_step_s"]) >= 0
        # Each of the three is rounded to the millisecond on its own, so their sum may be off by up to 1.5 ms.
        assert cold["first_step_s"] <= cold["first_job_s"] and cold["startup_s"] >= cold["workers_s"] + cold["group_s"] - 2e-3
        assert all(rank["process_s"] > 0 and rank["service_s"] >= 0 and rank["join_s"] >= 0 for rank in cold["ranks"])
    # A CPU worker's share of the cores is what its compute thread uses, also after a world change (OpenMP counts
    # threads per thread: the compute thread kept the count of its first parallel op, whatever a regroup set).
    for record in (two, three, one, two_again):
        share = max(1, (os.cpu_count() or 1) // record["world"])
        assert [s["openmp_threads"] for s in record["stats"]] == [share] * record["world"], (record["world"], record["stats"])
    # The stopped workers are gone, not idling.
    for pid in set(three["pids"]) - set(two_again["pids"]):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
