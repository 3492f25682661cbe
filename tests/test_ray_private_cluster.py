"""The private local Ray cluster is ours alone (ray_backend on its own, no ComfyUI).

It never adopts a cluster it did not start (RAY_ADDRESS and /tmp/ray/ray_current_cluster point elsewhere here),
runs in a temp directory of its own with a token file only this user can read, and a local process without that
token can neither attach nor run a task. Connecting to an operator-named cluster that does not answer fails in
bounded time, can be cancelled, and never starts Ray in this process. The pool's ranks meet at a store file in the
cluster's own folder, so the rendezvous has no port another local user could reach.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfyui_xdit.testing.server_launcher import REPO_ROOT
from silent_port import silent_port

TESTS = Path(__file__).resolve().parent
CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")

DRIVER = """
import json, os, stat, sys
from ray_backend.cluster import private_cluster_info
from ray_backend.clusters import LOCAL_TARGET
from ray_backend.pool import PoolRegistry
registry = PoolRegistry("pool_echo_service:EchoService")
pool = registry.get(2, LOCAL_TARGET)
info = private_cluster_info()
report = {"output": pool.run({"value": 2}, {"ulysses_degree": 2})["output"], "info": info, "rendezvous": pool.status()["rendezvous"],
          "token_mode": stat.S_IMODE(os.stat(info["token_path"]).st_mode),
          "dir_mode": stat.S_IMODE(os.stat(info["temp_dir"]).st_mode)}
print(json.dumps(report), flush=True)
sys.stdin.readline()  # the test tries to attach while the cluster runs
registry.shutdown()
print(json.dumps({"temp_dir_left": os.path.exists(info["temp_dir"])}), flush=True)
"""

WORKER_ENV = """
import json, os
from ray_backend.cluster import set_private_cluster_env
from ray_backend.clusters import LOCAL_TARGET
from ray_backend.pool import PoolRegistry
report = {}
for name in ("shared", "differs"):
    registry = PoolRegistry("pool_echo_service:EchoService", lambda: {"XDIT_ECHO_PROBE": name})
    set_private_cluster_env(registry.worker_env if name == "shared" else (lambda: {"XDIT_ECHO_PROBE": "the cluster's"}))
    stats = registry.get(2, LOCAL_TARGET).run({"value": 1}, {"ulysses_degree": 2})["stats"]
    report[name] = {"probe": stats["probe_env"], "runtime_env_vars": stats["runtime_env_vars"], "here": os.environ.get("XDIT_ECHO_PROBE")}
    registry.shutdown()  # and the private cluster with it: the next one starts with the next environment
print(json.dumps(report))
"""

STRANGER = """
import sys, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
print("ran", ray.get(ray.remote(lambda: 41 + 1).remote()))
"""

TWO_CLUSTERS = """
import glob, json
from ray._private.state import state
from ray_backend.cluster import ensure_ray, private_cluster_folder, shutdown_ray
folders, spill = [], []
for _ in range(2):  # a second private cluster in the same process, as after a prompt on another cluster
    ensure_ray()
    folders.append(str(private_cluster_folder()))
    spill.append(json.loads(state.get_system_config()["object_spilling_config"])["params"]["directory_path"])
    shutdown_ray()
print(json.dumps({"folders": folders, "spill": spill, "left": [p for f in folders for p in glob.glob(f + "*")]}))
"""

AFTER_CLOSING = """
import json, psutil, ray
from ray_backend.cluster import RayClosed, close_ray, ensure_ray, start_private_cluster_if_unconnected
ensure_ray()
cluster = [p.pid for p in psutil.Process().children(recursive=True)]
close_ray()
try:  # what a prompt's thread still calling Ray would do
    ray.get(ray.put(1))
    late_call = "ran"
except Exception as error:
    late_call = f"{type(error).__name__}: {error}"
refusals = []
for connect in (ensure_ray, start_private_cluster_if_unconnected):
    try:
        connect()
    except RayClosed as error:
        refusals.append(str(error))
print(json.dumps({"cluster": cluster, "late_call": late_call, "refusals": refusals, "ray_initialized": ray.is_initialized(),
                  "children_after": [p.cmdline() for p in psutil.Process().children(recursive=True)
                                     if p.status() != psutil.STATUS_ZOMBIE and "ray_backend.reaper" not in p.cmdline()]}))
"""

ENDED_WHILE_CLOSING = """
import json, os, psutil, ray
from ray_backend.cluster import close_ray, ensure_ray, private_cluster_folder
ensure_ray()
ray.get(ray.remote(num_cpus=0)(lambda: 1).remote())  # a worker too
print(json.dumps({"cluster": [p.pid for p in psutil.Process().children(recursive=True)], "folder": str(private_cluster_folder())}), flush=True)
ray.shutdown = lambda: os._exit(3)  # stands in for Ray's core worker ending the process when a thread calls Ray meanwhile
close_ray()
"""

NODE_LOOKUP = """
import json, time, ray
from ray._private import services
from ray_backend import raylet_wait
from ray_backend.cluster import ensure_ray, shutdown_ray
original, polled = services.get_node, []
real_wait = raylet_wait.wait_registered
def recording(gcs_address, node_id, patience_s=raylet_wait.PATIENCE_S):
    found = real_wait(gcs_address, node_id, patience_s)
    polled.append({"node_id": node_id, "found": found})
    return found
raylet_wait.wait_registered = recording
ensure_ray()
context = ray.get_runtime_context()
gcs, head = context.gcs_address, context.get_node_id()
started = time.monotonic()
stranger = real_wait(gcs, "ab" * 28, 0.3)
stranger_s = time.monotonic() - started
def broken(*_):
    raise ConnectionError("the poll failed")
raylet_wait.wait_registered = broken
with raylet_wait.prompt_node_lookup():
    despite_broken_poll = services.get_node(gcs, head)["node_id"] == head
shutdown_ray()
print(json.dumps({"head": head, "polled": polled, "restored": services.get_node is original,
                  "stranger": stranger, "stranger_s": stranger_s, "despite_broken_poll": despite_broken_poll}))
"""

HEAD_SERVICES = """
import json, sys, time, ray
from ray._private import node as ray_node, ray_constants
from ray_backend.cluster import ensure_ray, shutdown_ray
from ray_backend.head_services import UNUSED_HEAD_SERVICES
originals = {name: getattr(ray_node.Node, name) for name in UNUSED_HEAD_SERVICES}
ensure_ray()
started = sorted(ray._private.worker._global_node.all_processes)
@ray.remote(num_cpus=0)
def speak():
    print("a line from a worker", flush=True)
    return 1
ray.get(speak.remote())
time.sleep(3)  # Ray's log monitor forwards workers' output about once a second
shutdown_ray()
print(json.dumps({"started": started, "restored": all(getattr(ray_node.Node, n) is f for n, f in originals.items()),
                  "dashboard": ray_constants.PROCESS_TYPE_DASHBOARD, "monitor": ray_constants.PROCESS_TYPE_MONITOR,
                  "log_monitor": ray_constants.PROCESS_TYPE_LOG_MONITOR}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # A stranger that knows the cluster is on loopback (else Ray maps 127.0.0.1 to the machine's own address).
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO_ROOT)])})
    env.update(extra)
    return env


def test_private_cluster_never_adopts_another_and_refuses_processes_without_its_token(tmp_path):
    saved = CURRENT_CLUSTER_FILE.read_text() if CURRENT_CLUSTER_FILE.exists() else None
    CURRENT_CLUSTER_FILE.parent.mkdir(parents=True, exist_ok=True)
    CURRENT_CLUSTER_FILE.write_text("127.0.0.1:1")  # what any local user can write there
    # An unrelated process's token in its own home (Ray's default place) must not open our cluster either.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=_env(RAY_ADDRESS="127.0.0.1:1"), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = driver.stdout.readline()
        assert line, driver.stderr.read()[-4000:]
        report = json.loads(line)
        assert report["output"] == {"sum": 2 * 1 + 2 * 2, "world": 2, "overlapped": False}
        assert report["token_mode"] == 0o600 and report["dir_mode"] == 0o700
        assert report["rendezvous"] == "file", "ranks on one machine meet at a file in the 0700 folder: no port to reach"
        gcs = report["info"]["gcs_address"]
        assert gcs.startswith("127.0.0.1:") and gcs != "127.0.0.1:1", "the pool must run on a cluster it started"

        attempts = {
            "no token": _env(HOME=str(home)),
            "token auth off": _env(HOME=str(home), RAY_AUTH_MODE="disabled"),
            "another token": _env(HOME=str(home), RAY_AUTH_MODE="token"),
        }
        for what, env in attempts.items():
            stranger = subprocess.run([sys.executable, "-c", STRANGER, gcs], env=env, capture_output=True, text=True, timeout=90)
            assert stranger.returncode != 0 and "ran 42" not in stranger.stdout, f"{what}: attached and ran a task"
            assert "auth" in (stranger.stderr + stranger.stdout).lower(), f"{what}: failed for another reason:\n{stranger.stderr[-2000:]}"
        # The same attempt with the token succeeds: the refusals above were the token's doing.
        holder = subprocess.run([sys.executable, "-c", STRANGER, gcs], capture_output=True, text=True, timeout=120,
                                env=_env(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=report["info"]["token_path"]))
        assert "ran 42" in holder.stdout, holder.stderr[-2000:]

        out, err = driver.communicate("\n", timeout=120)
        assert driver.returncode == 0, err[-4000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"temp_dir_left": False}
    finally:
        if driver.poll() is None:
            driver.kill()
        if saved is None:
            CURRENT_CLUSTER_FILE.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER_FILE.write_text(saved)


@pytest.fixture
def silent_listener():
    with silent_port() as address:
        yield address


def test_a_configured_cluster_that_does_not_answer_fails_in_bounded_time_and_can_be_cancelled(silent_listener):
    import ray

    from ray_backend.cluster import ClusterConnectCancelled, ClusterUnreachable, probe_cluster
    from ray_backend.clusters import ClusterTarget

    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=r"'gone' at 127.0.0.1:1 cannot be reached"):
        probe_cluster(ClusterTarget("gone", "127.0.0.1:1"))
    assert time.monotonic() - started < 5

    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=r"did not answer within 4 s"):
        probe_cluster(ClusterTarget("silent", silent_listener), timeout_s=4)
    assert time.monotonic() - started < 10

    cancel_at = time.monotonic() + 0.5
    with pytest.raises(ClusterConnectCancelled):
        probe_cluster(ClusterTarget("silent", silent_listener), should_interrupt=lambda: time.monotonic() > cancel_at, timeout_s=60)
    assert time.monotonic() - cancel_at < 3
    assert not ray.is_initialized(), "a failed probe must not touch this process's Ray connection"


def test_workers_find_their_environment_in_the_private_cluster_or_get_it_as_a_runtime_env():
    """A private cluster started with the environment its pool's workers need (set_private_cluster_env) hands it to
    them without a runtime_env (which would make every worker's start wait for Ray's runtime-env agent); where the
    cluster's differs, the pool passes its own as a runtime_env and that wins. The driver's own environment is left
    as it was either way."""
    driver = subprocess.run([sys.executable, "-c", WORKER_ENV], env=_env(), capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-4000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert report["shared"] == {"probe": "shared", "runtime_env_vars": [], "here": None}, report
    assert report["differs"]["probe"] == "differs" and report["differs"]["here"] is None, report
    assert {"XDIT_ECHO_PROBE", "PYTHONPATH"} <= set(report["differs"]["runtime_env_vars"]), report


def test_a_second_private_cluster_in_one_process_keeps_to_its_own_folder():
    """Ray writes into the system config it is given (the spill directory, in the first cluster's folder): a second
    private cluster must spill into its own folder, and stopping both leaves neither folder (nor one made again)."""
    driver = subprocess.run([sys.executable, "-c", TWO_CLUSTERS], env=_env(), capture_output=True, text=True, timeout=180)
    assert driver.returncode == 0, driver.stderr[-4000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    first, second = report["folders"]
    assert first != second
    assert [Path(s).is_relative_to(f) for s, f in zip(report["spill"], report["folders"])] == [True, True], report["spill"]
    assert report["left"] == [], "a stopped private cluster's folder came back"


def test_the_private_cluster_start_polls_for_its_node_instead_of_sleeping_through_ray_s_retry():
    """Ray's start asks the GCS for the new node before the raylet has registered and then sleeps a whole second;
    our start polls the node table first (raylet_wait): it found the head node, Ray's own lookup is back after the
    start, a node that never registers is given up on after the patience, and a poll that fails leaves the answer to
    Ray's own lookup."""
    driver = subprocess.run([sys.executable, "-c", NODE_LOOKUP], env=_env(), capture_output=True, text=True, timeout=180)
    assert driver.returncode == 0, driver.stderr[-4000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert report["polled"] == [{"node_id": report["head"], "found": True}], report
    assert report["restored"] and report["despite_broken_poll"], report
    assert report["stranger"] is False and report["stranger_s"] >= 0.3, report


def test_the_private_cluster_starts_without_ray_s_api_server_and_autoscaler_monitor():
    """Neither serves a one-node private cluster with usage stats off, and ray.init waited for the API server (head_services):
    the head starts without them, the log monitor still forwards a worker's output to the driver, and Ray's node
    class is as it was after the start."""
    driver = subprocess.run([sys.executable, "-c", HEAD_SERVICES], env=_env(), capture_output=True, text=True, timeout=180)
    assert driver.returncode == 0, driver.stderr[-4000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert report["dashboard"] not in report["started"] and report["monitor"] not in report["started"], report
    assert report["log_monitor"] in report["started"] and "gcs_server" in report["started"], report
    assert "a line from a worker" in driver.stdout + driver.stderr
    assert report["restored"], report

def test_after_closing_ray_nothing_connects_again_not_even_a_late_ray_call():
    """After close_ray (ComfyUI's exit or SIGTERM) the private cluster is gone, a late Ray call fails instead of Ray
    starting a default cluster by itself (on the machine's address, without our token, or RAY_ADDRESS's), and
    connecting again is refused."""
    from server_jobs import survivors

    driver = subprocess.run([sys.executable, "-c", AFTER_CLOSING], env=_env(), capture_output=True, text=True, timeout=180)
    assert driver.returncode == 0, driver.stderr[-4000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert report["late_call"].startswith("RaySystemError") and "not been started" in report["late_call"], report["late_call"]
    assert len(report["refusals"]) == 2 and all("shutting down" in r for r in report["refusals"]), report["refusals"]
    assert not report["ray_initialized"] and report["children_after"] == [], report
    import psutil

    assert survivors([psutil.Process(pid) for pid in report["cluster"] if psutil.pid_exists(pid)], timeout=10) == []


def test_the_private_cluster_stops_and_its_folder_goes_even_when_ray_ends_the_process_while_closing():
    """Ray's core worker ends the whole process when another thread calls Ray during ray.shutdown() (seen when
    ComfyUI got SIGTERM while its pool started): the reaper close_ray handed the cluster to beforehand still stops
    every process of it and removes its folder, token included. Ray's shutdown is replaced by that exit here (the
    race itself cannot be forced)."""
    from server_jobs import survivors

    driver = subprocess.run([sys.executable, "-c", ENDED_WHILE_CLOSING], env=_env(), capture_output=True, text=True, timeout=180)
    assert driver.returncode == 3, driver.stderr[-4000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert len(report["cluster"]) >= 4, "expected GCS, raylet, agents and a worker"
    import psutil

    assert survivors([psutil.Process(pid) for pid in report["cluster"] if psutil.pid_exists(pid)], timeout=15) == []
    deadline = time.monotonic() + 15
    while Path(report["folder"]).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(report["folder"]).exists(), "the private cluster's folder (with its token) outlived it"
