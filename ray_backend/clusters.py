"""The Ray clusters a workflow may choose from: named by the operator, never by the workflow.

A workflow (possibly downloaded, possibly POSTed to an exposed ComfyUI) only picks a name; the addresses behind the
names come from the operator's environment (XDIT_RAY_CLUSTERS) or a small JSON file, so no prompt can make
ComfyUI join a cluster the operator did not name (a Ray driver unpickles what its cluster sends back).

    XDIT_RAY_CLUSTERS="gpu-rack=10.0.0.5:6379;lab=ray-head.lan:6379"
    clusters.json: {"gpu-rack": "10.0.0.5:6379", "lab": {"address": "ray-head.lan:6379", "token_path": "/etc/ray/lab.token"}}
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

LOCAL = "local"
CLUSTERS_ENV = "XDIT_RAY_CLUSTERS"
# Saved workflows from before cluster names carried a free-text address whose empty default meant "local".
LEGACY_LOCAL_VALUES = ("",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ClusterNotConfigured(ValueError):
    """A workflow named a cluster the operator did not configure (or the configuration itself is wrong)."""


@dataclass(frozen=True)
class ClusterTarget:
    """Where the pool runs: the private local cluster (address "") or an operator-named one."""

    name: str
    address: str = ""
    token_path: str | None = None  # the cluster's Ray auth token file, when it uses token authentication

    @property
    def is_local(self) -> bool:
        return not self.address


LOCAL_TARGET = ClusterTarget(LOCAL)


def _parse_env(text: str) -> dict[str, ClusterTarget]:
    clusters = {}
    for entry in filter(None, (part.strip() for part in re.split(r"[;,\n]", text))):
        name, sep, address = (s.strip() for s in entry.partition("="))
        if not sep or not address:
            raise ClusterNotConfigured(f"{CLUSTERS_ENV} entry {entry!r} is not NAME=HOST:PORT; "
                                       f"write it as e.g. {CLUSTERS_ENV}='mycluster=10.0.0.5:6379'")
        clusters[name] = ClusterTarget(name, address)
    return clusters


def _parse_file(path: Path) -> dict[str, ClusterTarget]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ClusterNotConfigured(f"{path} is not readable JSON ({error}); fix it or remove it") from error
    if not isinstance(data, dict):
        raise ClusterNotConfigured(f"{path} must hold a JSON object of name -> address (or {{\"address\", \"token_path\"}})")
    clusters = {}
    for name, value in data.items():
        if isinstance(value, str):
            value = {"address": value}
        if not isinstance(value, dict) or not isinstance(value.get("address"), str) or not value["address"].strip():
            raise ClusterNotConfigured(f"{path}: cluster {name!r} needs an \"address\" string (HOST:PORT)")
        token_path = value.get("token_path")
        if token_path is not None and not isinstance(token_path, str):
            raise ClusterNotConfigured(f"{path}: cluster {name!r} has a token_path that is not a string")
        clusters[name] = ClusterTarget(name, value["address"].strip(), token_path)
    return clusters


def configured_clusters(config_file: Path | None) -> dict[str, ClusterTarget]:
    """The operator's clusters by name: the config file's, then XDIT_RAY_CLUSTERS's (which wins on a clash)."""
    clusters: dict[str, ClusterTarget] = {}
    if config_file is not None and config_file.is_file():
        clusters.update(_parse_file(config_file))
    clusters.update(_parse_env(os.environ.get(CLUSTERS_ENV, "")))
    for name in clusters:
        if name == LOCAL or not _NAME.match(name):
            raise ClusterNotConfigured(f"cluster name {name!r} is not allowed: use letters, digits, '_', '.', '-' "
                                       f"(at most 64), and not {LOCAL!r}, which is the private local cluster")
    return clusters


def cluster_choices(config_file: Path | None) -> list[str]:
    """What the loader's cluster input offers: the private local cluster, then the operator's names."""
    try:
        return [LOCAL, *sorted(configured_clusters(config_file))]
    except ClusterNotConfigured:
        return [LOCAL]  # a broken configuration is reported when a workflow uses it, not in every node listing


def resolve_cluster(choice: str, config_file: Path | None) -> ClusterTarget:
    """The cluster a workflow's choice names; anything the operator did not name is refused, never connected."""
    choice = (choice or "").strip() if isinstance(choice, str) else choice
    if choice == LOCAL or choice in LEGACY_LOCAL_VALUES:
        return LOCAL_TARGET
    clusters = configured_clusters(config_file)
    if isinstance(choice, str) and choice in clusters:
        return clusters[choice]
    where = f"{CLUSTERS_ENV}" + (f" or {config_file}" if config_file is not None else "")
    known = ", ".join([LOCAL, *sorted(clusters)])
    raise ClusterNotConfigured(
        f"ray_address {choice!r} is not a cluster configured on this ComfyUI (choose one of: {known}). A workflow cannot "
        f"choose where ComfyUI connects: the operator names clusters in {where} "
        f"(e.g. {CLUSTERS_ENV}='mycluster=HOST:PORT'), and the workflow picks the name"
    )
