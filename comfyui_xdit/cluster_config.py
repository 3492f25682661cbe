"""Where the operator's Ray cluster names live for this ComfyUI (see ray_backend/clusters.py)."""
from __future__ import annotations

from pathlib import Path

from ray_backend.clusters import ClusterTarget, cluster_choices, resolve_cluster

SYSTEM_USER = "comfyui_xdit"
CLUSTERS_FILE = "clusters.json"


def clusters_file() -> Path | None:
    """<ComfyUI user directory>/__comfyui_xdit/clusters.json: a ComfyUI "system user" folder, which no HTTP endpoint
    reads or writes (a user's own folder can be written through /userdata, and a web client must not add clusters)."""
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI: only the environment variable names clusters
        return None
    return Path(folder_paths.get_system_user_directory(SYSTEM_USER)) / CLUSTERS_FILE


def choices() -> list[str]:
    return cluster_choices(clusters_file())


def target_for(choice: str) -> ClusterTarget:
    return resolve_cluster(choice, clusters_file())
