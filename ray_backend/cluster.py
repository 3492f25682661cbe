"""Start a local Ray cluster (loopback only, no dashboard, no usage stats) or attach to the user's."""
from __future__ import annotations

import os

# Set before Ray starts: keep a local cluster on 127.0.0.1 and send nothing home.
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def resolve_address(ray_address: str) -> str:
    """The cluster to use: the node input, else RAY_ADDRESS, else "" for a local one."""
    return (ray_address or os.environ.get("RAY_ADDRESS", "")).strip()


# The address this process's Ray connection was made for ("" = the private local cluster). Ray's connection is
# process-global by Ray's design; this records which one it is, so a changed address reconnects.
_connected_for: dict[str, str] = {}


def ensure_ray(ray_address: str = "") -> None:
    """Connect this process to Ray: attach to `ray_address` (or RAY_ADDRESS), or start a private local cluster.

    Connecting again for the same address does nothing; another address drops the old connection first.
    """
    try:
        import ray
    except ImportError as error:
        raise RuntimeError("the XDiT nodes need Ray in ComfyUI's Python environment: "
                           "run `pip install -r requirements.txt` from the comfyui-xdit folder") from error

    address = resolve_address(ray_address)
    if ray.is_initialized():
        if _connected_for.get("address") == address:
            return
        ray.shutdown()
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if address:
        # A driver finds its own node by IP: on a loopback cluster that must be the loopback address.
        loopback = address.split(":")[0] in ("127.0.0.1", "localhost")
        ray.init(address=address, log_to_driver=True, **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
    else:
        # num_cpus=cpu_count: CPU workers reserve no CPU (they are sized by threads), GPU workers ask for one GPU.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    _connected_for["address"] = address


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def node_address(node_id: str) -> str:
    """The address a Ray node registered with (127.0.0.1 for our local cluster): where rank 0 serves rendezvous."""
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise RuntimeError(f"Ray node {node_id} is not in the cluster")


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _connected_for.clear()
