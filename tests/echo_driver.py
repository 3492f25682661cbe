"""Run a driver script against ray_backend with pool_echo_service's EchoService (no ComfyUI), in a fresh process:
its own private Ray cluster, none of the caller's Ray token; the script prints a JSON report as its last line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from comfyui_xdit.testing.server_launcher import REPO_ROOT

TESTS = Path(__file__).resolve().parent


def run_echo_driver(script: str, timeout_s: float = 300) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO_ROOT)])})
    driver = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-4000:]
    return json.loads(driver.stdout.strip().splitlines()[-1])
