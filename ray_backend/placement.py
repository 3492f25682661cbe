"""Which Ray node hosts which rank: spread over the cluster's nodes, ranks grouped per node.

Ranks are laid out data, cfg, pipefusion, patch, ring, ulysses from outermost to innermost (parallel_core), so a
contiguous block of ranks per node keeps the innermost groups (Ulysses' all-to-all every layer) inside a node and
sends only the outer, rarer traffic between nodes.

A node's worker slots: its GPUs for a GPU pool; for CPU workers the operator's `xdit_worker` resource when any node
declares one (`ray start --resources='{"xdit_worker": 2}'`: that node hosts at most 2 workers, a node without it
hosts none), else any number (the loader has bounded the pool by the cluster's Ray memory, ray_backend/capacity.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The custom Ray resource an operator gives a node to say how many CPU workers it hosts.
WORKER_SLOT_RESOURCE = "xdit_worker"


@dataclass(frozen=True)
class NodeSlots:
    node_id: str
    address: str
    slots: int


def uses_worker_slots(nodes: list[dict[str, Any]]) -> bool:
    """Whether the operator counts CPU worker slots: some live node of `ray.nodes()` has the slot resource."""
    return any(WORKER_SLOT_RESOURCE in n.get("Resources", {}) for n in nodes if n.get("Alive"))


def node_slots(nodes: list[dict[str, Any]], use_gpus: bool, world_size: int) -> list[NodeSlots]:
    """Every live node of `ray.nodes()` with how many of a `world_size` pool's workers it can host."""
    alive = [n for n in nodes if n.get("Alive")]
    by_slot_resource = uses_worker_slots(nodes)

    def slots(resources: dict[str, float]) -> int:
        if use_gpus:
            return int(resources.get("GPU", 0))
        if by_slot_resource:
            return int(resources.get(WORKER_SLOT_RESOURCE, 0))
        return world_size

    return [NodeSlots(n["NodeID"], n["NodeManagerAddress"], slots(n.get("Resources", {}))) for n in alive]


def _describe(nodes: list[NodeSlots], use_gpus: bool) -> str:
    unit = "GPU" if use_gpus else "CPU worker slot"
    listing = ", ".join(f"{n.address} ({n.slots} {unit}{'s' if n.slots != 1 else ''})" for n in nodes)
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {listing}"


def spread(world_size: int, nodes: list[NodeSlots], first_node_id: str | None = None, use_gpus: bool = False,
           cluster_name: str = "") -> list[NodeSlots]:
    """The node of each rank: as even as the slots allow, contiguous ranks per node, `first_node_id` (the driver's
    node: rank 0 returns every result and preview) first, the rest by address. Raises ValueError naming what is
    missing when the slots do not add up to `world_size`."""
    if not nodes:
        raise ValueError(f"the Ray cluster {cluster_name!r} has no live node whose raylet answers; start its nodes "
                         f"(`ray start`) or check the network between them and ComfyUI")
    order = sorted(nodes, key=lambda n: (n.node_id != first_node_id, n.address, n.node_id))
    total = sum(n.slots for n in order)
    if total < world_size:
        what = f"{world_size} GPUs" if use_gpus else f"{world_size} CPU worker slots"
        hint = ("add GPU nodes" if use_gpus else
                f"add nodes, or raise a node's '{WORKER_SLOT_RESOURCE}' resource (ray start --resources)")
        raise ValueError(f"world_size {world_size} needs {what}, but the Ray cluster {cluster_name!r} now has {total} on "
                         f"{_describe(order, use_gpus)}; set world_size to {total} or less, or {hint}")
    counts = [0] * len(order)
    for _ in range(world_size):  # one rank at a time to the least-loaded node that still has a free slot
        index = min((i for i, n in enumerate(order) if counts[i] < n.slots), key=lambda i: counts[i])
        counts[index] += 1
    return [node for node, count in zip(order, counts) for _ in range(count)]
