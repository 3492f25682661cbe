"""ray_backend on its own (no ComfyUI): attaching to a Ray cluster the user started (ray_address), here one on
127.0.0.1 started by the test, and ending a job whose worker is stuck."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from comfyui_xdit.testing.server_launcher import REPO_ROOT, free_port

TESTS = Path(__file__).resolve().parent
DRIVER = """
import json, sys
from ray_backend.pool import PoolRegistry
registry = PoolRegistry("pool_echo_service:EchoService")
pool = registry.get(2, sys.argv[1])
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


def _wait_for_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray head on 127.0.0.1:{port} after {timeout} s")


def test_pool_runs_on_an_existing_cluster_given_its_address_and_ends_a_stuck_job():
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    # Token auth off for this throwaway loopback cluster: the test is about attaching, not about credentials.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO_ROOT)])}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    env["XDIT_STALL_TIMEOUT_S"] = "5"  # the driver's stuck-worker limit (600 s by default)
    try:
        _wait_for_port(port)
        driver = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=300)
        assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-4000:]
        report = json.loads(driver.stdout.strip().splitlines()[-1])
        assert report["output"] == {"sum": 3 * 1 + 3 * 2, "world": 2}
        assert report["status"]["ray_address"] == f"127.0.0.1:{port}" and report["status"]["backend"] == "gloo"
        assert report["stuck"].startswith("PoolFailure: the worker pool made no progress for 5 s")
        assert report["alive_after_stuck"] is False, "a stuck pool is taken down so the next job starts a fresh one"
    finally:
        os.killpg(head.pid, 15)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
