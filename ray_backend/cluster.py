"""Start a local Ray cluster (loopback only, no dashboard, no usage stats) or attach to the user's."""
from __future__ import annotations

import os

# Set before Ray starts: keep a local cluster on 127.0.0.1 and send nothing home.
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def resolve_address(ray_address: str) -> str:
    """The cluster to use: the node input, else RAY_ADDRESS, else "" for a local one."""
    return (ray_address or os.environ.get("RAY_ADDRESS", "")).strip()


def ensure_ray(ray_address: str = "") -> None:
    """Connect this process to Ray once: attach to `ray_address` (or RAY_ADDRESS), or start a private local cluster."""
    import ray

    address = resolve_address(ray_address)
    if ray.is_initialized():
        return
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # num_cpus=cpu_count: CPU workers reserve no CPU (they are sized by threads), GPU workers ask for one GPU.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)


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
