"""A throwaway Ray head on 127.0.0.1 started by a test (as an operator would start a cluster), and a look at who
joined it as a driver."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from comfyui_xdit.testing.server_launcher import REPO_ROOT, free_port

TESTS = Path(__file__).resolve().parent

_DRIVERS = """
import json, os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([job["DriverPid"] for job in ray._private.state.jobs() if job["DriverPid"] != os.getpid()]))
"""


def head_env() -> dict[str, str]:
    # Token auth off for this throwaway loopback cluster: the tests using it are about addresses, not credentials.
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO_ROOT)])}


def _wait_for_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray head on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """A Ray head listening on 127.0.0.1; yields its address."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=head_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, 15)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()


def driver_pids(address: str) -> list[int]:
    """Pids of every driver that ever joined the head (from its GCS job table), other than the one asking."""
    result = subprocess.run([sys.executable, "-c", _DRIVERS, address], env=head_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
