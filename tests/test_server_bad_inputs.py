"""Bad inputs through the real server: a clear error naming the file or the limit, raised before any worker
starts (or any LoRA is merged), ComfyUI stays up and the next prompt runs; and the smallest latent a sequence split
takes (one token row), exact against stock."""
from __future__ import annotations

import pickle

import pytest

from server_graphs import flux_graph, saved_latent
from test_server_lora import lora_graph
from test_server_pool import FP32_TOL

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed, PromptRejected
from comfyui_xdit.testing.server_launcher import TINY_UNET_NAMES
from comfyui_xdit.testing.tiny_loras import flux_shapes, write_flux_lora

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


@pytest.fixture(scope="module")
def lora_files(comfy_server, tiny_flux_paths) -> dict[str, str]:
    """A LoRA for this tiny Flux and one made for a Flux twice as wide (every shape wrong)."""
    folder = comfy_server.models_dir("loras")
    folder.mkdir(parents=True, exist_ok=True)
    shapes = flux_shapes(tiny_flux_paths["dev"])
    wider = {key: tuple(2 * d if d == 256 else d for d in shape) for key, shape in shapes.items()}
    return {"fits": write_flux_lora(folder / "bad-inputs-fits.safetensors", shapes, "kohya", rank=4, seed=51).name,
            "wider": write_flux_lora(folder / "bad-inputs-wider.safetensors", wider, "kohya", rank=4, seed=52).name}


@pytest.mark.parametrize(("strength", "message"), [
    (float("nan"), r"strength_model must be a finite number from -100 to 100, got nan"),
    (float("inf"), r"strength_model must be a finite number from -100 to 100, got inf"),
    (1e30, r"strength_model 1e\+30 is outside -100 to 100; use a strength in that range"),
])
def test_a_non_finite_or_huge_lora_strength_is_refused_when_queued(comfy_server, client, lora_files, strength, message):
    with pytest.raises(PromptRejected, match=message):
        client.queue_prompt(lora_graph(True, [(lora_files["fits"], strength)], prefix="bad_strength", **DEGREES))
    assert comfy_server.get_json("/object_info/XDiTFluxLoraLoader")


def test_a_missing_or_misfit_lora_fails_clearly_and_the_next_prompt_runs(comfy_server, client, lora_files):
    with pytest.raises(PromptRejected, match=r"lora_name: 'gone.safetensors' not in"):  # ComfyUI's own check
        client.queue_prompt(lora_graph(True, [("gone.safetensors", 0.8)], prefix="bad_missing", **DEGREES))
    with pytest.raises(ExecutionFailed, match=r"LoRA bad-inputs-wider.safetensors: (\d+) of its \1 weight patches do not fit "
                                              r"this Flux model, e.g. .*is it a LoRA for another variant or size of it\?"):
        client.run(lora_graph(True, [(lora_files["wider"], 0.8)], prefix="bad_wider", **DEGREES), timeout=300)
    stock = saved_latent(comfy_server, client.run(lora_graph(False, [(lora_files["fits"], 0.8)], prefix="fits_stock"), timeout=300))
    xdit = saved_latent(comfy_server, client.run(lora_graph(True, [(lora_files["fits"], 0.8)], prefix="fits_xdit", **DEGREES), timeout=600))
    assert (xdit - stock).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("degrees", [DEGREES, {"world_size": 2, "ulysses_degree": 1, "ring_degree": 2, "cfg_degree": 1}], ids=["ulysses2", "ring2"])
def test_a_one_token_row_latent_is_exact(comfy_server, client, degrees):
    def one_row(graph: dict) -> dict:
        graph["10"]["inputs"]["height"] = graph["2"]["inputs"]["height"] = 16  # 2 latent rows: 1 row of 2x2 patches
        return graph

    stock = saved_latent(comfy_server, client.run(one_row(flux_graph(False, prefix="one_row_stock", size=64)), timeout=300))
    xdit = saved_latent(comfy_server, client.run(one_row(flux_graph(True, prefix="one_row_xdit", size=64, **degrees)), timeout=600))
    assert xdit.shape == stock.shape == (1, 16, 2, 8)
    assert (xdit - stock).abs().max().item() <= FP32_TOL
