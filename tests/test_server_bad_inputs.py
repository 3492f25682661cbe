"""Bad inputs through the real server: a clear error naming the file or the limit, raised before any worker
starts, ComfyUI stays up and the next prompt runs."""
from __future__ import annotations

import pickle

import pytest

from server_graphs import flux_graph

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import TINY_UNET_NAMES

pytestmark = pytest.mark.server

DEGREES = {"world_size": 2, "ulysses_degree": 2, "ring_degree": 1, "cfg_degree": 1}


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="module")
def bad_models(comfy_server, tiny_flux_paths, tmp_path_factory):
    folder = comfy_server.models_dir("diffusion_models")
    marker = tmp_path_factory.mktemp("marker") / "unpickled"
    (folder / "cut.safetensors").write_bytes(tiny_flux_paths["dev"].read_bytes()[:-4096])
    (folder / "pickled.safetensors").write_bytes(pickle.dumps(_Marker(str(marker))))
    yield marker
    for name in ("cut.safetensors", "pickled.safetensors"):
        (folder / name).unlink(missing_ok=True)


def _graph(unet_name: str, prefix: str, **loader) -> dict:
    graph = flux_graph(True, prefix=prefix, **{**DEGREES, **loader})
    graph["1"]["inputs"]["unet_name"] = unet_name
    return graph


def _pool_pids(comfy_server) -> list[int] | None:
    pool = comfy_server.get_json("/xdit/status")["pool"]
    return [w["pid"] for w in pool["workers"]] if pool else None


@pytest.mark.parametrize(("name", "loader", "message"), [
    ("cut.safetensors", {}, r"diffusion model cut.safetensors cannot be read: its tensors need [\d,]+ bytes but the file holds [\d,]+: it is truncated"),
    ("pickled.safetensors", {}, r"diffusion model pickled.safetensors cannot be read: it is a Python pickle .* it was not opened"),
    (TINY_UNET_NAMES["dev"], {"world_size": 64, "ulysses_degree": 0}, r"world_size 64 is more CPU workers than this machine can host \(\d+: "),
])
def test_bad_input_fails_clearly_before_any_worker_starts_and_the_next_prompt_runs(comfy_server, client, bad_models, name, loader, message):
    client.run(flux_graph(True, seed=21, prefix="before_bad", **DEGREES), timeout=600)
    pids = _pool_pids(comfy_server)
    with pytest.raises(ExecutionFailed, match=message):
        client.run(_graph(name, f"bad_{name}", **loader), timeout=120)
    assert _pool_pids(comfy_server) == pids, "a refused prompt must not start, stop or replace workers"
    assert not bad_models.exists(), "the pickle was unpickled"
    client.run(flux_graph(True, seed=22, prefix="after_bad", **DEGREES), timeout=600)
    assert _pool_pids(comfy_server) == pids
