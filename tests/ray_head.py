"""Throwaway Ray nodes started by a test as an operator would start a cluster: a head on 127.0.0.2, and more nodes
on other loopback addresses (127.0.0.3, ...) joining it, each with its own raylet, object store and temp dir; and a
look at who joined a head as a driver and which nodes it sees alive.

Not 127.0.0.1: Ray rewrites "127.0.0.1" and "localhost" (not other loopback addresses) to the machine's outward
address when it may form multi-node clusters, so a cluster on 127.0.0.1 would be reached over the machine's network
address; 127.0.0.2 and 127.0.0.3 stay on loopback."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from comfyui_xdit.testing.server_launcher import REPO_ROOT, free_port

TESTS = Path(__file__).resolve().parent
HEAD_IP = "127.0.0.2"

_DRIVERS = """
import json, os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, _node_ip_address=sys.argv[1].rsplit(":", 1)[0])
print(json.dumps([job["DriverPid"] for job in ray._private.state.jobs() if job["DriverPid"] != os.getpid()]))
"""

_ALIVE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, _node_ip_address=sys.argv[1].rsplit(":", 1)[0])
print(json.dumps(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])))
"""


def head_env() -> dict[str, str]:
    # Token auth off for this throwaway loopback cluster: the tests using it are about addresses, not credentials.
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO_ROOT)])}


def _wait_for_port(host: str, port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray process listening on {host}:{port} after {timeout} s")


def _port_range(host: str, count: int) -> tuple[int, int]:
    """`count` consecutive ports free on `host`, below the OS's ephemeral range (so no test's free_port() takes one)."""
    for _ in range(100):
        first = random.randrange(20000, 32000 - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return first, first + count - 1
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


@dataclass
class RayNode:
    """A running `ray start --block` and what it listens on."""

    ip: str
    process: subprocess.Popen
    ports: dict[str, int]

    def kill(self) -> None:
        """SIGKILL every process of the node at once (raylet, object store, agents, its workers), as when a machine
        drops off the network."""
        try:
            tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        self.process.wait()


@contextlib.contextmanager
def _ray_start(args: list[str], ip: str, resources: dict[str, int] | None, ports: dict[str, int],
               env: dict[str, str] | None = None) -> Iterator[RayNode]:
    """One Ray node (`ray start ... --block`), stopped and its temp dir removed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    process = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--node-ip-address={ip}", "--num-cpus=2",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", *args, *([f"--resources={json.dumps(resources)}"] if resources else [])],
        env={**head_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    node = RayNode(ip, process, ports)
    try:
        yield node
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_head(resources: dict[str, int] | None = None, ip: str = HEAD_IP, env: dict[str, str] | None = None) -> Iterator[str]:
    """A Ray head on `ip` (with custom `resources` and extra environment `env`, if any); yields its address."""
    port = free_port()
    with _ray_start(["--head", f"--port={port}", "--include-dashboard=false"], ip, resources, {"gcs": port}, env):
        _wait_for_port(ip, port)
        yield f"{ip}:{port}"


@contextlib.contextmanager
def ray_node(head: str, ip: str, resources: dict[str, int] | None = None) -> Iterator[RayNode]:
    """Another node joining `head` from `ip` (e.g. 127.0.0.3), with every port it listens on pinned, as an operator
    pins them between machines; yields it once the head lists it alive."""
    first, last = _port_range(ip, 64)
    ports = {"node_manager": first, "object_manager": first + 1, "runtime_env_agent": first + 2,
             "min_worker": first + 8, "max_worker": last}
    args = [f"--address={head}", f"--node-manager-port={first}", f"--object-manager-port={first + 1}",
            f"--runtime-env-agent-port={first + 2}", f"--min-worker-port={first + 8}", f"--max-worker-port={last}"]
    with _ray_start(args, ip, resources, ports) as node:
        _wait_for_port(ip, ports["node_manager"])
        deadline = time.monotonic() + 60
        while ip not in alive_node_addresses(head):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the node on {ip} did not join {head} within 60 s")
            time.sleep(1)
        yield node


def alive_node_addresses(address: str) -> list[str]:
    """The addresses of the nodes the head at `address` lists alive (from a throwaway driver)."""
    result = subprocess.run([sys.executable, "-c", _ALIVE, address], env=head_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def driver_pids(address: str) -> list[int]:
    """Pids of every driver that ever joined the head (from its GCS job table), other than the one asking."""
    result = subprocess.run([sys.executable, "-c", _DRIVERS, address], env=head_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
