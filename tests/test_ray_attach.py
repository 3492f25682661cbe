"""ray_backend on its own (no ComfyUI): attaching to a Ray cluster the operator named (here one on a loopback address
started by the test, configured through XDIT_RAY_CLUSTERS), and ending a job whose worker is stuck."""
from __future__ import annotations

import json
import subprocess
import sys

from ray_head import head_env, ray_head

DRIVER = """
import json, sys
from ray_backend.clusters import resolve_cluster
from ray_backend.pool import PoolRegistry
registry = PoolRegistry("pool_echo_service:EchoService")
pool = registry.get(2, resolve_cluster("testhead", None))
result = pool.run({"value": 3}, {"ulysses_degree": 2})
report = {"output": result["output"], "status": pool.status()}
try:
    pool.run({"value": 1, "hang_rank": 1}, {"ulysses_degree": 2})
except Exception as error:
    report["stuck"] = f"{type(error).__name__}: {error}"
report["alive_after_stuck"] = pool.alive
print(json.dumps(report))
registry.shutdown()
"""


def test_pool_runs_on_an_existing_cluster_given_its_address_and_ends_a_stuck_job():
    with ray_head() as address:
        # The driver's stuck-worker limit is 600 s by default.
        env = {**head_env(), "XDIT_STALL_TIMEOUT_S": "5", "XDIT_RAY_CLUSTERS": f"testhead={address}"}
        driver = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=300)
        assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-4000:]
        report = json.loads(driver.stdout.strip().splitlines()[-1])
        assert report["output"] == {"sum": 3 * 1 + 3 * 2, "world": 2, "overlapped": False}
        assert report["status"]["cluster"] == "testhead" and report["status"]["ray_address"] == address
        assert report["status"]["backend"] == "gloo" and report["status"]["rendezvous"] == "tcp"
        assert report["stuck"].startswith("PoolFailure: the worker pool made no progress for 5 s")
        assert report["alive_after_stuck"] is False, "a stuck pool is taken down so the next job starts a fresh one"
