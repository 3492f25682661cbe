"""XDiT VAE nodes through a real ComfyUI server: XDiTVAELoader + XDiTVAEDecode + XDiTVAEEncode on a local Ray pool
vs VAELoader + VAEDecode + VAEEncode in one prompt, on tiny Flux (16-channel), SDXL (4-channel) and Wan 2.1 (causal
video) VAEs with latents whose rows do not divide the pool (5 rows over 2 workers).

The decoded image is compared before quantisation through its encoding (decode -> encode -> SaveLatent, floats),
and after it as the saved 8-bit PNGs. The full-width Wan 2.2 VAE (2.8 GB per process in fp32) runs stock and on pools
of 2 and 4 in prompts of their own, with a clip encoded as well, and is released afterwards."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from server_graphs import drop_cached_outputs, flux_graph, link_wan22_vae, release_pool_vae

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, set_input, stock_twin
from comfyui_xdit.workflow_tools import OFFLINE_VAE_NAME as VAE_NAME  # the session server writes it (conftest.py)

pytestmark = pytest.mark.server

LATENT_NAME = "xdit_vae_test.latent"
FP32_TOL = 1e-5


@dataclass(frozen=True)
class ServerVae:
    file: str  # in models/vae
    tiny: tuple[str, str | None] | None  # tiny_models family and variant that write it; None: the session server has it
    latent: tuple[int, ...]  # the latent decoded (and its decoding encoded back)
    images: int  # images (or video frames) VAEDecode makes of it


# Flux/SD3's 16-channel and SDXL's 4-channel image VAEs (5 latent rows over 2 workers), Wan 2.1's causal video VAE
# (2 latent frames decode into 5, the causal cache carried per rank).
SERVER_VAES = {
    "flux": ServerVae(VAE_NAME, None, (2, 16, 5, 6), 2),
    "sdxl": ServerVae("tiny-sdxl-vae.safetensors", ("kl_vae", "sdxl"), (1, 4, 5, 6), 1),
    "wan21": ServerVae("tiny-wan21-vae.safetensors", ("wan_vae", None), (1, 16, 2, 5, 6), 5),
}


@pytest.fixture(scope="module")
def client(comfy_server) -> ComfyClient:
    latent = torch.randn((2, 16, 5, 6), generator=torch.Generator().manual_seed(7))
    inputs = comfy_server.base / "input"
    inputs.mkdir(exist_ok=True)
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(inputs / LATENT_NAME))
    return ComfyClient(comfy_server.url)


def _chain(graph: dict, first: int, loader: dict, decode: str, encode: str, prefix: str) -> None:
    ids = [str(first + i) for i in range(5)]
    graph[ids[0]] = loader
    graph[ids[1]] = {"class_type": decode, "inputs": {"samples": ["1", 0], "vae": [ids[0], 0]}}
    graph[ids[2]] = {"class_type": encode, "inputs": {"pixels": [ids[1], 0], "vae": [ids[0], 0]}}
    graph[ids[3]] = {"class_type": "SaveLatent", "inputs": {"samples": [ids[2], 0], "filename_prefix": f"{prefix}_latent"}}
    graph[ids[4]] = {"class_type": "SaveImage", "inputs": {"images": [ids[1], 0], "filename_prefix": f"{prefix}_image"}}


def _graph(vae: ServerVae, latent_name: str) -> dict:
    graph = {"1": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}}}
    _chain(graph, 10, {"class_type": "VAELoader", "inputs": {"vae_name": vae.file}}, "VAEDecode", "VAEEncode", "vae_stock")
    _chain(graph, 20, {"class_type": "XDiTVAELoader", "inputs": {"vae_name": vae.file, "world_size": 2, "ray_address": "local"}},
           "XDiTVAEDecode", "XDiTVAEEncode", "vae_xdit")
    # The XDiT decode node given a stock VAE runs the stock code.
    graph["30"] = {"class_type": "XDiTVAEDecode", "inputs": {"samples": ["1", 0], "vae": ["10", 0]}}
    graph["31"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": "vae_fallback_image"}}
    return graph


def _server_vae(comfy_server, tmp_path_factory, name: str) -> ServerVae:
    """SERVER_VAES[name], its file in models/vae (written on first use)."""
    from comfyui_xdit.testing.tiny_models import write_tiny_model

    vae = SERVER_VAES[name]
    if vae.tiny is not None and not (comfy_server.models_dir("vae") / vae.file).exists():
        family, variant = vae.tiny
        path = write_tiny_model(family, tmp_path_factory.mktemp(name) / vae.file, variant)
        (comfy_server.models_dir("vae") / vae.file).symlink_to(path)
    return vae


@pytest.mark.parametrize("name", sorted(SERVER_VAES))
def test_xdit_vae_nodes_match_stock(comfy_server, client, tmp_path_factory, name) -> None:
    """Decode on a 2-worker pool, and its encoding back, against VAEDecode/VAEEncode in the same prompt: the decoded
    image compared before quantisation through its encoding (floats), and after it as the saved 8-bit PNGs."""
    vae = _server_vae(comfy_server, tmp_path_factory, name)
    latent_name = f"xdit_vae_test_{name}.latent"
    latent = torch.randn(vae.latent, generator=torch.Generator().manual_seed(7))
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(comfy_server.base / "input" / latent_name))
    result = client.run(_graph(vae, latent_name), timeout=600)

    def saved_latent(node_id: str) -> torch.Tensor:
        (file,) = [f for f in result.files if f.node_id == node_id]
        return load_file(str(comfy_server.output_dir / file.subfolder / file.filename))["latent_tensor"]

    def images(node_id: str) -> list[np.ndarray]:
        files = sorted((f for f in result.files if f.node_id == node_id), key=lambda f: f.filename)
        return [np.asarray(Image.open(comfy_server.output_dir / f.subfolder / f.filename)).astype(np.int16) for f in files]

    stock, xdit = saved_latent("13"), saved_latent("23")
    assert xdit.shape == stock.shape == vae.latent
    assert stock.abs().max() > 0.1
    error = (xdit - stock).abs().max().item()
    print(f"{name}: decode->encode roundtrip max abs error {error:.3g} (latent max {stock.abs().max().item():.3g})")
    assert error <= FP32_TOL * max(1.0, stock.abs().max().item())
    stock_images, xdit_images, fallback = images("14"), images("24"), images("31")
    assert len(stock_images) == len(xdit_images) == len(fallback) == vae.images
    for ours, theirs, plain in zip(xdit_images, stock_images, fallback):
        assert ours.shape == theirs.shape == (40, 48, 3)
        # fp32 rounding may move a pixel sitting on a rounding boundary by one level, never more.
        assert np.abs(ours - theirs).max() <= 1
        assert np.array_equal(plain, theirs)
    status = comfy_server.get_json("/xdit/status")["pool"]
    assert status["world_size"] == 2
    assert all(rank["vae_loads"] >= 1 for rank in status["ranks"])


def test_the_model_and_the_vae_share_the_pool(comfy_server, client) -> None:
    """Sampling on the pool, then its latent decoded (and encoded back) on the same pool and in ComfyUI."""
    graph = flux_graph(True, size=80, steps=2, prefix="vae_flux_sampled", world_size=2)
    _chain(graph, 40, {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}}, "VAEDecode", "VAEEncode", "vae_flux_stock")
    _chain(graph, 50, {"class_type": "XDiTVAELoader", "inputs": {"vae_name": VAE_NAME, "world_size": 2}},
           "XDiTVAEDecode", "XDiTVAEEncode", "vae_flux_xdit")
    for first in (40, 50):
        graph[str(first + 1)]["inputs"]["samples"] = ["11", 0]
    result = client.run(graph, timeout=600)

    def latent(node_id: str) -> torch.Tensor:
        (file,) = [f for f in result.files if f.node_id == node_id]
        return load_file(str(comfy_server.output_dir / file.subfolder / file.filename))["latent_tensor"]

    stock, xdit = latent("43"), latent("53")
    assert xdit.shape == stock.shape == (1, 16, 10, 10)
    assert (xdit - stock).abs().max().item() <= FP32_TOL * max(1.0, stock.abs().max().item())
    ranks = comfy_server.get_json("/xdit/status")["pool"]["ranks"]
    assert all(rank["resident"] and rank["vae_loads"] >= 1 for rank in ranks), ranks


def test_a_shipped_workflow_decodes_on_the_pool_its_model_runs_on(comfy_server, client) -> None:
    """The shipped Flux dev workflow (XDiT VAE nodes, world_size 0 on the VAE loader) with its model loader at world 4:
    the decode follows the model's pool instead of resizing it to the auto world, and equals the stock twin."""
    workflow = make_offline(load_api_workflow(REPO_ROOT / "workflows" / "api" / "flux_dev_xdit_api.json"), TINY_UNET_NAMES["dev"],
                            size=64, steps=2)
    assert workflow["12"]["class_type"] == "XDiTVAELoader" and workflow["12"]["inputs"]["world_size"] == 0
    set_input(workflow, "1", "world_size", 4)
    ours, stock = (client.run(graph, timeout=900) for graph in (workflow, stock_twin(workflow)))

    def image(result) -> np.ndarray:
        (file,) = [f for f in result.files if f.node_id == "14"]
        return np.asarray(Image.open(comfy_server.output_dir / file.subfolder / file.filename)).astype(np.int16)

    assert image(ours).shape == (64, 64, 3)
    assert np.abs(image(ours) - image(stock)).max() <= 1
    status = comfy_server.get_json("/xdit/status")["pool"]
    assert status["world_size"] == 4
    assert all(rank["vae_loads"] >= 1 for rank in status["ranks"]), status["ranks"]


def test_xdit_vae_nodes_take_the_stock_inputs(client) -> None:
    info = client.object_info()
    assert info["XDiTVAEDecode"]["input"]["required"] == info["VAEDecode"]["input"]["required"]
    assert info["XDiTVAEEncode"]["input"]["required"] == info["VAEEncode"]["input"]["required"]
    assert list(info["XDiTVAELoader"]["input"]["required"]) == ["vae_name"]
    assert VAE_NAME in info["XDiTVAELoader"]["input"]["required"]["vae_name"][0]
    assert list(info["XDiTVAELoader"]["input"]["optional"]) == ["world_size", "ray_address"]
    assert info["XDiTVAELoader"]["output"] == info["VAELoader"]["output"] == ["VAE"]


def test_xdit_vae_loader_refuses_a_pickle(comfy_server, client) -> None:
    pickled = comfy_server.models_dir("vae") / "pickled.pt"
    pickled.write_bytes(b"not read")
    graph = {"1": {"class_type": "XDiTVAELoader", "inputs": {"vae_name": pickled.name, "world_size": 2}},
             "2": {"class_type": "XDiTVAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
             "3": {"class_type": "LoadLatent", "inputs": {"latent": LATENT_NAME}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(ExecutionFailed, match=r"vae_name 'pickled.pt' is not a .safetensors file"):
        client.run(graph, timeout=300)


def test_a_clip_the_video_vae_cannot_encode_is_refused_before_the_pool_runs(comfy_server, client, tmp_path_factory) -> None:
    """3 frames are no 1 + 4k clip: refused by name before the job leaves (stock VAEEncode would drop 2 frames); the
    pool stays up and the next prompt runs on it."""
    vae = _server_vae(comfy_server, tmp_path_factory, "wan21")
    latent_name = "xdit_vae_test_bad_frames.latent"
    latent = torch.randn(vae.latent, generator=torch.Generator().manual_seed(8))
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(comfy_server.base / "input" / latent_name))
    graph = {"1": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}},
             "2": {"class_type": "XDiTVAELoader", "inputs": {"vae_name": vae.file, "world_size": 2}},
             "3": {"class_type": "XDiTVAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
             "4": {"class_type": "ImageFromBatch", "inputs": {"image": ["3", 0], "batch_index": 0, "length": 3}},
             "5": {"class_type": "XDiTVAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["2", 0]}},
             "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "vae_bad_frames"}}}
    with pytest.raises(ExecutionFailed, match=r"XDiTVAEEncode: the Wan 2.1 VAE encodes clips of 1 \+ 4k frames \(1, 5, 9, ...\), "
                                              r"but pixels has 3: give it 1 or 5 frames \(stock VAE Encode would drop the last 2"):
        client.run(graph, timeout=600)
    pool = comfy_server.get_json("/xdit/status")["pool"]
    graph["4"]["inputs"]["length"] = 5
    result = client.run(graph, timeout=600)
    assert [f.node_id for f in result.files] == ["6"]
    after = comfy_server.get_json("/xdit/status")["pool"]
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in pool["workers"]], "the pool was restarted"
    assert after["jobs_run"] == pool["jobs_run"] + 1  # only the encode: ComfyUI kept the decode from the refused prompt


# Wan 2.2's VAE at full width (the width detection fixes; server_graphs.link_wan22_vae), on the smallest latent that
# still splits and carries the causal cache: 2 latent frames (5 video frames, decoded in two chunks) of 5 rows (uneven
# over 2 workers) x 2 columns; the clip encoded is 5 frames (a 1- and a 4-frame chunk) of the same 80 x 32 pixels.
WAN22_LATENT = (1, 48, 2, 5, 2)
WAN22_CLIP = (5, 80, 32, 3)


def _wan22_graph(loader: dict, decode: str, encode: str, prefix: str) -> dict:
    """The latent decoded (frames saved as PNGs) and encoded back, and the clip encoded: `decode`/`encode` on `loader`."""
    graph = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "xdit_vae_wan22.latent"}}}
    _chain(graph, 10, loader, decode, encode, prefix)
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "xdit_vae_wan22_clip.webp"}}
    graph["21"] = {"class_type": encode, "inputs": {"pixels": ["20", 0], "vae": ["10", 0]}}
    graph["22"] = {"class_type": "SaveLatent", "inputs": {"samples": ["21", 0], "filename_prefix": f"{prefix}_clip"}}
    return graph


def _rss_gb(pid: int, field: str = "VmHWM") -> float:
    """A process's peak (VmHWM) or current (VmRSS) resident memory, in GiB."""
    with open(f"/proc/{pid}/status") as status:
        return round(next(int(line.split()[1]) for line in status if line.startswith(field)) / 2**20, 2)


def test_wan22_vae_on_the_pool_matches_stock(comfy_server, client, tiny_model_path) -> None:
    """The full-width Wan 2.2 VAE decoding and encoding on a pool of 2 workers against VAEDecode/VAEEncode.

    One prompt per graph (stock, then the pool) so ComfyUI holds one 2.8 GB copy at a time besides the workers' (a
    one-node prompt between them lets its cache drop the last one), and the tiny Flux VAE replaces it on the pool at
    the end. Only world 2 here: every process holds the VAE in fp32 (~3.5 GB), so world 4 would need ~18 GB of RAM
    at once; the row split itself is checked at world 2 and 4 in-process (tests/test_vae_parallel.py's wan22 cases)."""
    started = time.perf_counter()
    name = link_wan22_vae(comfy_server, tiny_model_path)
    inputs = comfy_server.base / "input"
    latent = torch.randn(WAN22_LATENT, generator=torch.Generator().manual_seed(7))
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(inputs / "xdit_vae_wan22.latent"))
    pixels = np.random.default_rng(3).integers(0, 256, WAN22_CLIP, dtype=np.uint8)
    frames = [Image.fromarray(frame) for frame in pixels]
    frames[0].save(inputs / "xdit_vae_wan22_clip.webp", save_all=True, append_images=frames[1:], lossless=True)
    written = time.perf_counter()

    def outputs(result) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        def latent_of(node_id: str) -> torch.Tensor:
            (file,) = [f for f in result.files if f.node_id == node_id]
            return load_file(str(comfy_server.output_dir / file.subfolder / file.filename))["latent_tensor"]

        files = sorted((f for f in result.files if f.node_id == "14"), key=lambda f: f.filename)
        images = [np.asarray(Image.open(comfy_server.output_dir / f.subfolder / f.filename)).astype(np.int16) for f in files]
        return latent_of("13"), latent_of("22"), images

    try:
        stock_started = time.perf_counter()
        stock = outputs(client.run(_wan22_graph({"class_type": "VAELoader", "inputs": {"vae_name": name}}, "VAEDecode", "VAEEncode",
                                                "wan22_stock"), timeout=900))
        times = {"stock": time.perf_counter() - stock_started}
        roundtrip, clip, images = stock
        assert roundtrip.shape == clip.shape == WAN22_LATENT  # 48 channels: detected as Wan 2.2
        assert len(images) == 5 and all(image.shape == WAN22_CLIP[1:] for image in images)
        assert np.std(images) > 20  # a picture, not a flat field
        world = 2
        drop_cached_outputs(comfy_server, client)
        server_before = _rss_gb(comfy_server.process.pid, "VmRSS")
        world_started = time.perf_counter()
        loader = {"class_type": "XDiTVAELoader", "inputs": {"vae_name": name, "world_size": world, "ray_address": "local"}}
        xdit = outputs(client.run(_wan22_graph(loader, "XDiTVAEDecode", "XDiTVAEEncode", f"wan22_xdit{world}"), timeout=900))
        times[f"world{world}"] = time.perf_counter() - world_started
        errors = {kind: (ours - theirs).abs().max().item() for kind, ours, theirs in zip(("roundtrip", "clip"), xdit[:2], stock[:2])}
        scales = {"roundtrip": max(1.0, roundtrip.abs().max().item()), "clip": max(1.0, clip.abs().max().item())}
        pixel_levels = max(np.abs(ours - theirs).max() for ours, theirs in zip(xdit[2], images))
        status = comfy_server.get_json("/xdit/status")["pool"]
        workers = [(_rss_gb(worker["pid"], "VmRSS"), _rss_gb(worker["pid"])) for worker in status["workers"]]
        print(f"wan22 world {world}: max abs error decode->encode {errors['roundtrip']:.3g}, encode {errors['clip']:.3g} "
              f"(latent max {scales['roundtrip']:.3g}, {scales['clip']:.3g}); frames within {pixel_levels} levels; "
              f"{times[f'world{world}']:.1f} s; server RSS {server_before} GB before, {_rss_gb(comfy_server.process.pid, 'VmRSS')} after; "
              f"workers' RSS (now, peak) {workers} GB")
        assert all(errors[kind] <= FP32_TOL * scales[kind] for kind in errors), errors
        assert pixel_levels <= 1
        assert status["world_size"] == world and all(rank["vae_loads"] >= 1 for rank in status["ranks"])
    finally:
        release_pool_vae(comfy_server, client)
    released = [_rss_gb(worker["pid"], "VmRSS") for worker in comfy_server.get_json("/xdit/status")["pool"]["workers"]]
    print(f"wan22: file written/linked in {written - started:.1f} s, stock {times['stock']:.1f} s; server peak RSS this "
          f"session {_rss_gb(comfy_server.process.pid)} GB; released: server RSS {_rss_gb(comfy_server.process.pid, 'VmRSS')} GB, "
          f"workers' {released} GB")
