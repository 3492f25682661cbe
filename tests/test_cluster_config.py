"""Operator-named clusters and pool-size bounds: pure logic, no Ray started."""
from __future__ import annotations

import json

import pytest

from ray_backend.capacity import CPU_WORKER_OVERHEAD_BYTES, check_world_fits
from ray_backend.clusters import (LOCAL, LOCAL_TARGET, ClusterNotConfigured, ClusterTarget, cluster_choices,
                                  configured_clusters, resolve_cluster)

pytestmark = pytest.mark.fast

GiB = 2**30


@pytest.fixture(autouse=True)
def no_operator_clusters(monkeypatch):
    monkeypatch.delenv("XDIT_RAY_CLUSTERS", raising=False)
    monkeypatch.delenv("XDIT_MAX_CPU_WORKERS", raising=False)


def test_local_and_the_legacy_empty_address_mean_the_private_cluster(tmp_path):
    assert resolve_cluster(LOCAL, None) == LOCAL_TARGET
    assert resolve_cluster("", tmp_path / "missing.json") == LOCAL_TARGET
    assert cluster_choices(None) == [LOCAL]


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "10.0.0.5:6379", "ray://evil.example:10001", "not-an-address", "auto"])
def test_a_workflow_cannot_name_an_address(address):
    with pytest.raises(ClusterNotConfigured, match="not a cluster configured on this ComfyUI .*XDIT_RAY_CLUSTERS='mycluster=HOST:PORT'"):
        resolve_cluster(address, None)


def test_clusters_come_from_the_environment_and_the_operator_file(tmp_path, monkeypatch):
    config = tmp_path / "clusters.json"
    config.write_text(json.dumps({"lab": {"address": "10.0.0.7:6379", "token_path": "/etc/ray/lab.token"}, "rack": "10.0.0.8:6379"}))
    monkeypatch.setenv("XDIT_RAY_CLUSTERS", "rack=10.0.0.9:6379; gpu=10.0.0.5:6379")
    clusters = configured_clusters(config)
    assert clusters["lab"] == ClusterTarget("lab", "10.0.0.7:6379", "/etc/ray/lab.token")
    assert clusters["rack"].address == "10.0.0.9:6379", "the environment wins over the file"
    assert cluster_choices(config) == [LOCAL, "gpu", "lab", "rack"]
    assert resolve_cluster("gpu", config) == ClusterTarget("gpu", "10.0.0.5:6379")
    with pytest.raises(ClusterNotConfigured, match="choose one of: local, gpu, lab, rack"):
        resolve_cluster("10.0.0.5:6379", config)


@pytest.mark.parametrize(("env", "file", "message"), [
    ("gpu", None, "entry 'gpu' is not NAME=HOST:PORT"),
    ("local=10.0.0.5:6379", None, "not 'local'"),
    ("bad name=10.0.0.5:6379", None, "cluster name 'bad name' is not allowed"),
    ("", "{not json", "is not readable JSON"),
    ("", '["10.0.0.5:6379"]', "must hold a JSON object"),
    ("", '{"lab": {"token_path": "/x"}}', "cluster 'lab' needs an .address."),
])
def test_a_broken_configuration_says_what_to_fix(tmp_path, monkeypatch, env, file, message):
    monkeypatch.setenv("XDIT_RAY_CLUSTERS", env)
    config = tmp_path / "clusters.json"
    if file is not None:
        config.write_text(file)
    with pytest.raises(ClusterNotConfigured, match=message):
        resolve_cluster("anything", config)
    assert cluster_choices(config) == [LOCAL], "a broken configuration still lists the private cluster"


def test_a_world_the_machine_cannot_host_is_refused_naming_the_limit(monkeypatch):
    memory = 16 * GiB
    check_world_fits(4, cluster_gpus=0, cluster_memory_bytes=memory, model_bytes=16 * 2**20)
    limit = memory // (CPU_WORKER_OVERHEAD_BYTES + 16 * 2**20)
    with pytest.raises(ValueError, match=rf"world_size 64 is more CPU workers than this machine can host \({limit}: 16.0 GiB"):
        check_world_fits(64, cluster_gpus=0, cluster_memory_bytes=memory, model_bytes=16 * 2**20)
    with pytest.raises(ValueError, match="world_size 4 needs 4 GPUs, but the Ray cluster has 2; set world_size to 2 or less"):
        check_world_fits(4, cluster_gpus=2, cluster_memory_bytes=memory, model_bytes=0)
    monkeypatch.setenv("XDIT_MAX_CPU_WORKERS", "64")
    check_world_fits(64, cluster_gpus=0, cluster_memory_bytes=memory, model_bytes=0)
    with pytest.raises(ValueError, match=r"\(64: XDIT_MAX_CPU_WORKERS=64\)"):
        check_world_fits(65, cluster_gpus=0, cluster_memory_bytes=memory, model_bytes=0)
    monkeypatch.setenv("XDIT_MAX_CPU_WORKERS", "lots")
    with pytest.raises(ValueError, match="XDIT_MAX_CPU_WORKERS='lots' must be a whole number"):
        check_world_fits(2, cluster_gpus=0, cluster_memory_bytes=memory, model_bytes=0)
