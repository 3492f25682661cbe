"""Where a pool's ranks go on a multi-node cluster (pure planning over `ray.nodes()`-shaped records), which interface
gloo uses for a node address, and a rendezvous store served on a second loopback address (fast tier, no Ray)."""
from __future__ import annotations

import os
import socket

import psutil
import pytest

from parallel_core.rendezvous import connect_store, serve_store
from ray_backend.placement import WORKER_SLOT_RESOURCE, NodeSlots, node_slots, spread
from ray_backend.worker import GLOO_IFNAME_ENV, interface_of, pin_gloo_interface

pytestmark = pytest.mark.fast


def _node(node_id: str, address: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": address, "Alive": alive, "Resources": {"memory": 8 * 2**30, **resources}}


def _ranks(plan: list[NodeSlots]) -> list[str]:
    return [node.address for node in plan]


def test_workers_spread_evenly_in_contiguous_blocks_with_the_drivers_node_first():
    nodes = node_slots([_node("b", "10.0.0.9"), _node("a", "10.0.0.5"), _node("c", "10.0.0.7", alive=False)], False, 4)
    assert _ranks(spread(4, nodes)) == ["10.0.0.5", "10.0.0.5", "10.0.0.9", "10.0.0.9"]
    assert _ranks(spread(4, nodes, first_node_id="b")) == ["10.0.0.9", "10.0.0.9", "10.0.0.5", "10.0.0.5"]
    assert _ranks(spread(3, nodes)) == ["10.0.0.5", "10.0.0.5", "10.0.0.9"]
    assert _ranks(spread(2, nodes)) == ["10.0.0.5", "10.0.0.9"], "two PipeFusion stages: one per node"


def test_operator_slots_bound_each_node_and_a_node_without_slots_hosts_none():
    raw = [_node("h", "10.0.0.1"), _node("a", "10.0.0.2", **{WORKER_SLOT_RESOURCE: 3}), _node("b", "10.0.0.3", **{WORKER_SLOT_RESOURCE: 1})]
    nodes = node_slots(raw, False, 4)
    assert [n.slots for n in nodes] == [0, 3, 1]
    assert _ranks(spread(4, nodes, first_node_id="h")) == ["10.0.0.2"] * 3 + ["10.0.0.3"]


def test_gpu_pools_count_gpus_per_node():
    nodes = node_slots([_node("a", "10.0.0.2", GPU=2), _node("b", "10.0.0.3", GPU=1)], True, 3)
    assert _ranks(spread(3, nodes, use_gpus=True)) == ["10.0.0.2", "10.0.0.2", "10.0.0.3"]
    with pytest.raises(ValueError, match=r"world_size 4 needs 4 GPUs, but the Ray cluster 'rack' now has 3 on 2 nodes: "
                                         r"10.0.0.2 \(2 GPUs\), 10.0.0.3 \(1 GPU\); set world_size to 3 or less, or add GPU nodes"):
        spread(4, nodes, use_gpus=True, cluster_name="rack")


def test_missing_slots_are_named_before_anything_starts():
    nodes = node_slots([_node("a", "127.0.0.1", **{WORKER_SLOT_RESOURCE: 2}), _node("b", "127.0.0.2", alive=False, **{WORKER_SLOT_RESOURCE: 2})], False, 4)
    with pytest.raises(ValueError, match=r"world_size 4 needs 4 CPU worker slots, but the Ray cluster 'two' now has 2 on 1 node: "
                                         r"127.0.0.1 \(2 CPU worker slots\); set world_size to 2 or less, or add nodes, "
                                         r"or raise a node's 'xdit_worker' resource"):
        spread(4, nodes, cluster_name="two")
    with pytest.raises(ValueError, match=r"the Ray cluster 'two' has no live node whose raylet answers"):
        spread(2, [], cluster_name="two")


def test_gloo_interface_of_a_node_address():
    loopback = next(name for name, entries in psutil.net_if_addrs().items()
                    if any(e.family == socket.AF_INET and e.address == "127.0.0.1" for e in entries))
    assert interface_of("127.0.0.1") == loopback
    assert interface_of("127.0.0.2") == loopback, "a second loopback address belongs to the loopback interface"
    assert interface_of("not-an-ip") is None


def test_gloo_is_pinned_to_the_node_address_interface_or_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv(GLOO_IFNAME_ENV, "eth7")
    pin_gloo_interface("127.0.0.2")
    assert os.environ[GLOO_IFNAME_ENV] == "lo", "a loopback node's pool stays on loopback"
    monkeypatch.setenv(GLOO_IFNAME_ENV, "ib0")
    pin_gloo_interface("198.51.100.7")
    assert os.environ[GLOO_IFNAME_ENV] == "ib0", "the operator's interface wins on a real network"
    monkeypatch.delenv(GLOO_IFNAME_ENV)
    if interface_of("198.51.100.7") is None:
        with pytest.raises(RuntimeError, match=r"no network interface of this machine holds its Ray node address 198.51.100.7.*"
                                               r"set GLOO_SOCKET_IFNAME"):
            pin_gloo_interface("198.51.100.7")


def test_rendezvous_on_a_second_loopback_address_listens_there_only():
    store = serve_store("127.0.0.2", world_size=2)
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.2", store.port)]
    client = connect_store("127.0.0.2", store.port, world_size=2)
    client.set("hello", b"node-b")
    assert store.get("hello") == b"node-b"
