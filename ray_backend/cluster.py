"""Connect this process to Ray: a private local cluster that is ours alone, or a cluster the operator named.

The private cluster is always started new (`address="local"`, so neither RAY_ADDRESS nor the world-writable
/tmp/ray/ray_current_cluster can make us adopt somebody else's), in a temp directory of its own, on 127.0.0.1,
without dashboard, API server, autoscaler monitor or usage stats, and with Ray token authentication on a token only
this user can read: a local process without the token can neither attach nor run a task.

An operator-named cluster is probed in a separate process first (bounded time, cancellable); only a cluster that
answered is connected to in-process, so an unreachable one never hangs ComfyUI and never disturbs the private one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from .clusters import LOCAL_TARGET, ClusterTarget
from .head_services import without_unused_head_services
from .raylet_wait import prompt_node_lookup

# Set before Ray starts: keep a local cluster on 127.0.0.1 and send nothing home.
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
AUTH_ENV_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Ray's system config for the private cluster:
# - no prestarted idle workers: starting them took CPU from the pool's own workers while they start (a Python process
#   and Ray each), and on a machine with many CPUs Ray would start one per CPU;
# - the raylet connects to its object store's socket just after starting the store's thread, and when it came first
#   it slept Ray's whole retry interval (1 s) before trying again: 6 of 25 starts here took 3.2 s instead of 2.2 s.
#   Retrying every 10 ms up to 1000 times keeps Ray's 10 s of patience (this also paces workers connecting to the raylet).
# Read-only: ray.init gets a copy, because Ray writes into the dict it is given (node.py's validate_external_storage
# adds object_spilling_config, naming that cluster's session dir): a shared dict sent the next private cluster of this
# process (after a world on another cluster) spilling into the first one's removed folder, which Ray then made again.
PRIVATE_CLUSTER_CONFIG = MappingProxyType({
    "enable_worker_prestart": False, "prestart_worker_first_driver": False,
    "raylet_client_connect_timeout_milliseconds": 10, "raylet_client_num_connect_attempts": 1000})
CONNECT_TIMEOUT_S = float(os.environ.get("XDIT_CLUSTER_CONNECT_TIMEOUT_S", "60"))
TOKEN_FILE = "auth_token"

_PROBE = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, **({"_node_ip_address": sys.argv[2]} if sys.argv[2] else {}))
print("gpus", int(ray.cluster_resources().get("GPU", 0)))
"""


class ClusterUnreachable(ConnectionError):
    """An operator-named cluster did not answer in time (the current connection is unchanged)."""


class ClusterConnectCancelled(ConnectionError):
    """The user cancelled while a cluster was being probed (the current connection is unchanged)."""


class RayClosed(ConnectionError):
    """This process is ending (close_ray ran): no cluster is started or joined any more."""


# This process's Ray connection (process-global by Ray's design): which target, the private cluster's temp dir and
# the environment entries its processes got (private_env).
_connection: dict[str, object] = {}
# Where a private cluster started from now on gets the environment entries it gives its processes (set_private_cluster_env).
_private_env_source: list[Callable[[], Mapping[str, str]]] = []
# Reentrant: close_ray may run in a signal handler on the main thread while that thread is inside ensure_ray.
_connect_lock = threading.RLock()
CLOSE_WAIT_S = 60.0  # how long close_ray waits for a connection under way (ray.init takes 2-5 s here) to finish
REAP_GRACE_S = 5.0  # how long the private cluster's processes get to end by themselves before they are killed
# The operator's own Ray auth settings, restored whenever we leave the private cluster.
_operator_auth_env: dict[str, str | None] = {}


def _import_ray():
    # Any Ray call made while this process is connected to no cluster (e.g. a thread's call just after we left one)
    # would otherwise run a bare ray.init(): join RAY_ADDRESS's cluster or start one on the machine's address without
    # our token. The variable reaches the processes Ray starts; the flag, Ray's copy of it, covers an earlier import.
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    try:
        import ray
        from ray._private import auto_init_hook
    except ImportError as error:
        raise RuntimeError("the XDiT nodes need Ray in ComfyUI's Python environment: "
                           "run `pip install -r requirements.txt` from the comfyui-xdit folder") from error
    auto_init_hook.enable_auto_connect = False
    return ray


def _auth_env_for(target: ClusterTarget, private_token: Path | None = None) -> dict[str, str | None]:
    """Ray's auth variables for `target`: our private token, the configured token file, else the operator's own."""
    if not _operator_auth_env:
        _operator_auth_env.update({key: os.environ.get(key) for key in AUTH_ENV_KEYS})
    token_path = str(private_token) if private_token is not None else target.token_path
    if token_path is None:
        return dict(_operator_auth_env)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": token_path}


def _set_auth_env(values: dict[str, str | None]) -> None:
    """Ray reads its auth mode and token from the environment (for this process and the processes it starts)."""
    for key in AUTH_ENV_KEYS:
        value = values.get(key)
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # Ray caches its config and token per process: make it read the environment again.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _write_private_token(temp_dir: Path) -> Path:
    import secrets

    path = temp_dir / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by other users
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    return path


def _driver_node_ip(address: str) -> str | None:
    """The node address this process joins a cluster with: for a head on a loopback address, that address (a driver
    must sit on a node of the cluster, and on one machine that is the head's); else Ray's own choice (None)."""
    host = address.rsplit("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host if host in ("localhost", "::1") or host.startswith("127.") else None


def _tcp_reachable(address: str, timeout_s: float) -> str | None:
    """None if HOST:PORT accepts a TCP connection, else why not."""
    target = address.rsplit("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return f"{address!r} is not HOST:PORT"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as error:
        return str(error) or type(error).__name__


def probe_cluster(target: ClusterTarget, should_interrupt: Callable[[], bool] | None = None,
                  timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Check, from a throwaway process, that `target` is a Ray cluster this process can join; raise otherwise."""
    unreachable = _tcp_reachable(target.address, min(10.0, timeout_s))
    if unreachable is not None:
        raise ClusterUnreachable(f"Ray cluster {target.name!r} at {target.address} cannot be reached ({unreachable}); "
                                 f"start it, or correct its address in the cluster configuration")
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV_KEYS}
    env.update({k: v for k, v in _auth_env_for(target).items() if v is not None})
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, target.address, _driver_node_ip(target.address) or ""],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while probe.poll() is None:
            if should_interrupt is not None and should_interrupt():
                raise ClusterConnectCancelled(f"connecting to Ray cluster {target.name!r} was cancelled")
            if time.monotonic() > deadline:
                raise ClusterUnreachable(f"Ray cluster {target.name!r} at {target.address} did not answer within "
                                         f"{timeout_s:.0f} s (XDIT_CLUSTER_CONNECT_TIMEOUT_S); check that it is a Ray head "
                                         f"and that its auth token is configured")
            time.sleep(0.1)
    finally:
        if probe.poll() is None:
            probe.kill()
        _, stderr = probe.communicate()
    if probe.returncode != 0:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {probe.returncode}"
        raise ClusterUnreachable(f"Ray cluster {target.name!r} at {target.address} refused this ComfyUI: {tail}")


def ensure_ray(target: ClusterTarget = LOCAL_TARGET, should_interrupt: Callable[[], bool] | None = None) -> None:
    """Connect this process to `target`; connecting again to the same one does nothing.

    Switching to another cluster happens only after it answered a probe, so a failed attempt changes nothing.
    """
    ray = _import_ray()
    with _connect_lock:  # a prompt's connection waits for the one the pool's start with ComfyUI began (pool_client)
        _refuse_if_closed()
        if ray.is_initialized() and _connection.get("target") == target:
            return
        started = time.perf_counter()
        if not target.is_local:
            probe_cluster(target, should_interrupt)
        shutdown_ray()
        if target.is_local:
            _start_private_cluster(ray)
        else:
            _set_auth_env(_auth_env_for(target))
            # A driver finds its own node by IP: on a loopback cluster that must be the head's loopback address.
            driver_ip = _driver_node_ip(target.address)
            ray.init(address=target.address, log_to_driver=True, **({"_node_ip_address": driver_ip} if driver_ip else {}))
        _connection["target"] = target
        _connection["connect_s"] = time.perf_counter() - started


def start_private_cluster_if_unconnected() -> bool:
    """Start the private local cluster if this process is connected to no cluster at all; True when it is then
    connected to it. Never leaves a cluster (whichever prompt or pool uses it), so a background start cannot
    disturb one."""
    ray = _import_ray()
    with _connect_lock:
        _refuse_if_closed()
        if ray.is_initialized():
            return _connection.get("target") == LOCAL_TARGET
        started = time.perf_counter()
        _start_private_cluster(ray)
        _connection["target"] = LOCAL_TARGET
        _connection["connect_s"] = time.perf_counter() - started
        return True


def _refuse_if_closed() -> None:
    if _connection.get("closed"):
        raise RayClosed("this ComfyUI is shutting down: no Ray cluster is started or joined any more")


def take_connect_seconds() -> float:
    """How long the last connection took (starting the private cluster, or probing and joining one), once: the
    first pool on a connection reports it, later ones 0."""
    return float(_connection.pop("connect_s", 0.0))


def set_private_cluster_env(source: Callable[[], Mapping[str, str]]) -> None:
    """Name what a private cluster started from now on puts in its processes' environment, and so in that of the
    workers its raylet starts. A pool whose workers need exactly these entries then starts them without a
    runtime_env: Ray starts a worker with one only after its runtime-env agent (a Python process the raylet starts
    with the cluster) is up and answered, ~0.5 s into a cold start on 2 busy cores."""
    _private_env_source[:] = [source]


def private_cluster_env() -> dict[str, str] | None:
    """The entries the running private cluster's processes got in their environment; None when this process is not
    connected to its private cluster."""
    target = _connection.get("target")
    return dict(_connection["private_env"]) if target is not None and target.is_local and "private_env" in _connection else None  # type: ignore[arg-type]


def _start_private_cluster(ray) -> None:
    # A 0700 folder (mkdtemp) holds the token and Ray's own temp dir, which Ray makes world-writable: other users can
    # then neither read nor swap anything of ours. Short, under /tmp: Ray's unix socket paths have a length limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="xdit-", dir="/tmp"))
    _connection["temp_dir"] = temp_dir
    token_path = _write_private_token(temp_dir)
    _set_auth_env(_auth_env_for(LOCAL_TARGET, token_path))
    # address="local": always a new cluster, never one found through RAY_ADDRESS or /tmp/ray/ray_current_cluster.
    # num_cpus=cpu_count: CPU workers reserve no CPU (they are sized by threads), GPU workers ask for one GPU.
    try:
        private_env = {key: str(value) for key, value in (_private_env_source[0]() if _private_env_source else {}).items()}
    except ImportError:  # a process without ComfyUI (its compute arguments): pools then pass theirs as a runtime_env
        private_env = {}
    # The raylet and every process it starts inherit the environment ray.init starts them with; this process's stays as it was.
    with _loopback_only(), _environment(private_env), prompt_node_lookup(), without_unused_head_services():
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=str(temp_dir / "ray"), log_to_driver=True, _system_config=dict(PRIVATE_CLUSTER_CONFIG))
    _connection["private_env"] = private_env


@contextlib.contextmanager
def _environment(values: Mapping[str, str]):
    """`values` in os.environ while the block runs; what was there before comes back after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _loopback_only():
    """Ray decides at import whether its processes listen on every interface (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER).
    If another node pack imported Ray before us, that decision was made without us: hold it to loopback while
    our private cluster starts (its processes read the environment we set, so they keep to loopback after)."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environment(LOCAL_RAY_ENV):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def private_cluster_folder() -> Path | None:
    """The private cluster's own 0700 folder while this process runs it, else None."""
    target = _connection.get("target")
    return _connection.get("temp_dir") if target is not None and target.is_local else None  # type: ignore[return-value]


def private_cluster_info() -> dict[str, str] | None:
    """The private cluster's GCS address and token file, while this process runs one (tests and operators)."""
    target, temp_dir = _connection.get("target"), _connection.get("temp_dir")
    if target is None or not target.is_local or temp_dir is None:
        return None
    import ray

    return {"gcs_address": ray.get_runtime_context().gcs_address, "token_path": str(temp_dir / TOKEN_FILE),
            "temp_dir": str(temp_dir)}


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_memory_bytes() -> int:
    """Memory Ray may give to workers on the connected cluster (every node)."""
    import ray

    return int(ray.cluster_resources().get("memory", 0))


def live_nodes(timeout_s: float = 3.0) -> list[dict]:
    """`ray.nodes()` entries of the nodes Ray lists alive whose raylet answers a TCP connection now: Ray's own health
    checks take 15-30 s to notice a lost node, and a pool planned onto one would wait for it."""
    import ray
    from concurrent.futures import ThreadPoolExecutor

    listed = [n for n in ray.nodes() if n.get("Alive")]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(listed)))) as executor:
        answers = list(executor.map(lambda n: _tcp_reachable(f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}", timeout_s), listed))
    return [node for node, unreachable in zip(listed, answers) if unreachable is None]


def connected_target() -> ClusterTarget | None:
    return _connection.get("target")  # type: ignore[return-value]


def _private_cluster_tree() -> list:
    """The private cluster's processes: those Ray started for its node (GCS, raylet, log monitor) and everything they
    started (dashboard and runtime-env agents, workers). Read before ray.shutdown(), which stops the first kind; the
    others notice their raylet's end only by polling it (not while they still start), so what is left gets killed."""
    import psutil
    from ray._private import worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    tree = []
    for infos in (node.all_processes.values() if node is not None else ()):
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    return tree


def shutdown_ray(ending: bool = False) -> None:
    """Leave the current cluster (stopping it, every process of it, if it is our private one) and forget its token
    and temp dir. `ending` (close_ray): a detached reaper does the stopping and the removal too, because when another
    thread calls Ray while ray.shutdown() runs, Ray's core worker ends this process at once (the node's own processes
    die with it; the agents, started by the raylet, would not)."""
    from .reaper import reap, reap_detached

    temp_dir = _connection.get("temp_dir")
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            target = _connection.get("target")
            tree = _private_cluster_tree() if target is not None and target.is_local else []
            if ending and tree:
                reap_detached(tree, REAP_GRACE_S, temp_dir)
            ray.shutdown()
            reap(tree, REAP_GRACE_S)
    _connection.pop("temp_dir", None)
    _connection.pop("target", None)
    _connection.pop("private_env", None)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if _operator_auth_env:
        _set_auth_env(dict(_operator_auth_env))


def close_ray() -> None:
    """Leave Ray for good, as this process ends (ComfyUI's exit or SIGTERM): stop the private cluster, and refuse
    every later connection (RayClosed), since a prompt's thread would otherwise start a cluster the exit orphans.
    A connection under way (another thread inside ray.init) finishes first, so its processes are stopped too."""
    locked = _connect_lock.acquire(timeout=CLOSE_WAIT_S)
    try:
        _connection["closed"] = True
        shutdown_ray(ending=True)
    finally:
        if locked:
            _connect_lock.release()
