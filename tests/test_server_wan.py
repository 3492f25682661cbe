"""The shipped Wan 2.1 text-to-video workflow through a real ComfyUI server on tiny Wan 2.1 weights and VAE: XDiT
loader, KSampler and VAE decode on a local Ray pool vs the same graph with the stock nodes, on a video latent of odd
frames whose token count (3 frames x 5 x 7) divides neither degree, down to the animated WEBP it saves and the live
previews; bad input refused by name with the server staying up; the shipped Wan 2.2 A14B graph, whose two
experts stay resident on the pool across prompts; the shipped Wan 2.2 A14B image-to-video graph (start image
through WanImageToVideo, both experts), refused before any work when its start image is missing; and the shipped
Wan 2.2 5B TI2V graph on the tiny 5B with the full-width Wan 2.2 VAE decoding on the pool."""
from __future__ import annotations

import functools
import io
import time

import numpy as np
import pytest
from PIL import Image, ImageSequence

from server_graphs import drop_cached_outputs, link_tiny_model, link_wan22_vae, release_pool_vae, saved_latent

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

WORKFLOW = REPO_ROOT / "workflows" / "api" / "wan21_t2v_xdit_api.json"
TINY_NAME = "tiny-wan21.safetensors"
VAE_NAME = "tiny-wan21-vae.safetensors"
STEPS = 3
LATENT2RGB = {"preview_method": "latent2rgb"}
UMT5_WIDTH = 4096  # Wan's text embedding takes umT5-XXL's width
FP32_TOL = 1e-5
RELATIVE_TOL = 2e-6  # CFG amplifies rounding: relative to the latent's size where that is larger


@pytest.fixture(scope="module")
def client(comfy_server, tiny_model_path, tmp_path_factory) -> ComfyClient:
    from comfyui_xdit.testing.tiny_models import write_tiny_model

    link_tiny_model(comfy_server, tiny_model_path("wan21"), TINY_NAME)
    vae = comfy_server.models_dir("vae") / VAE_NAME
    if not vae.exists():
        vae.symlink_to(write_tiny_model("wan_vae", tmp_path_factory.mktemp("wan_vae") / VAE_NAME))
    return ComfyClient(comfy_server.url)


def _graph(prefix: str, xdit: bool, width: int = 112, height: int = 80, length: int = 9, **loader_inputs) -> dict:
    """The shipped graph offline (seeded stand-in text, tiny weights and VAE, 3 steps), also saving the sampled latent;
    the clip is saved losslessly so stock's and the pool's frames compare. 9 frames of 112 x 80 px are a 3 x 10 x 14
    latent."""
    workflow = make_offline(load_api_workflow(WORKFLOW), TINY_NAME, vae_name=VAE_NAME, steps=STEPS, context_dim=UMT5_WIDTH)
    workflow["10"]["inputs"].update(lossless=True, filename_prefix=f"{prefix}_clip")
    workflow["6"]["inputs"].update(width=width, height=height, length=length)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


def _clip(comfy_server, result) -> list[np.ndarray]:
    (file,) = [f for f in result.files if f.node_id == "10"]
    with Image.open(comfy_server.output_dir / file.subfolder / file.filename) as clip:
        return [np.asarray(frame.convert("RGB"), dtype=np.int16) for frame in ImageSequence.Iterator(clip)]


@pytest.mark.parametrize("degrees", [{"world_size": 2}, {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1}],
                         ids=["shipped-auto-2", "ulysses2-ring2"])
def test_shipped_wan21_workflow_matches_the_stock_graph(comfy_server, client, degrees):
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    previews = LATENT2RGB if degrees["world_size"] == 2 else None
    stock_run = client.run(_graph(f"wan21_stock_{name}", False), timeout=300, extra_data=previews)
    xdit_run = client.run(_graph(f"wan21_xdit_{name}", True, **degrees), timeout=600, extra_data=previews)
    stock, xdit = saved_latent(comfy_server, stock_run), saved_latent(comfy_server, xdit_run)
    assert xdit.shape == stock.shape == (1, 16, 3, 10, 14)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= max(FP32_TOL, RELATIVE_TOL * stock.abs().max().item())
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == degrees["world_size"]
    # The clip, decoded on the pool (XDiTVAEDecode follows the model's pool) and saved by the stock node.
    stock_frames, xdit_frames = _clip(comfy_server, stock_run), _clip(comfy_server, xdit_run)
    assert len(xdit_frames) == len(stock_frames) == 9
    assert all(a.shape == b.shape == (80, 112, 3) and np.abs(a - b).max() <= 1 for a, b in zip(xdit_frames, stock_frames))
    if previews:
        # Live previews of the video latent, as the stock sampler sends them: at most one a step, the last one x0's.
        assert len(stock_run.previews) == STEPS and 1 <= len(xdit_run.previews) <= STEPS
        with Image.open(io.BytesIO(stock_run.previews[-1])) as a, Image.open(io.BytesIO(xdit_run.previews[-1])) as b:
            last_stock, last_xdit = (np.asarray(i.convert("RGB"), dtype=np.int16) for i in (a, b))
        assert last_xdit.shape == last_stock.shape and np.abs(last_xdit - last_stock).mean() < 1.0


def test_wan21_refuses_more_ranks_than_tokens_and_pipefusion_by_name(comfy_server, client):
    # One frame of 2 x 2 latent pixels is a single token: two sequence-parallel ranks cannot share it.
    with pytest.raises(ExecutionFailed, match=r"Wan 2\.1: this latent makes 1 tokens .* fewer than the 2 sequence-parallel ranks"):
        client.run(_graph("wan21_too_few_tokens", True, width=16, height=16, length=1, world_size=2, ulysses_degree=2, cfg_degree=1),
                   timeout=600)
    with pytest.raises(ExecutionFailed, match=r"Wan 2\.1 supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1"):
        client.run(_graph("wan21_refused", True, world_size=2, pipefusion_degree=2), timeout=300)
    # The server and the pool are still up: the next prompt runs.
    latent = saved_latent(comfy_server, client.run(_graph("wan21_after_refusals", True, world_size=2, ulysses_degree=2, cfg_degree=1),
                                                   timeout=600))
    assert latent.shape == (1, 16, 3, 10, 14)


A14B_WORKFLOW = REPO_ROOT / "workflows" / "api" / "wan22_a14b_t2v_xdit_api.json"
TINY_LOW_NOISE_NAME = "tiny-wan21-low-noise.safetensors"  # a second tiny Wan (seed 1) as the low-noise expert


def _a14b_graph(prefix: str, xdit: bool, seed: int, **loader_inputs) -> dict:
    """The shipped Wan 2.2 A14B graph offline: the high-noise expert (tiny seed 0) takes steps 0-2 of 4 and hands its
    leftover noise to the low-noise expert (tiny seed 1) for steps 2-4, as ComfyUI's template chains them."""
    workflow = make_offline(load_api_workflow(A14B_WORKFLOW), TINY_NAME, steps=4, context_dim=UMT5_WIDTH)
    workflow["11"]["inputs"]["unet_name"] = TINY_LOW_NOISE_NAME
    for node_id in ("8", "9", "10"):  # VAELoader, VAEDecode, SaveAnimatedWEBP
        del workflow[node_id]
    workflow["6"]["inputs"].update(width=112, height=80, length=9)
    workflow["7"]["inputs"].update(end_at_step=2, noise_seed=seed)
    workflow["13"]["inputs"].update(start_at_step=2)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    for loader in ("1", "11"):
        workflow[loader]["inputs"].update(loader_inputs)
    return workflow


def test_wan22_a14b_experts_stay_resident_and_match_the_stock_graph(comfy_server, client, run_cli, tmp_path_factory):
    low_noise = tmp_path_factory.mktemp("wan_experts") / "low_noise.safetensors"
    made = run_cli("make-tiny-model", "--family", "wan21", "--seed", "1", "--out", str(low_noise))
    assert made.returncode == 0, made.stderr
    link_tiny_model(comfy_server, low_noise, TINY_LOW_NOISE_NAME)
    degrees = {"world_size": 2, "ulysses_degree": 2, "cfg_degree": 1}
    loads = None
    for seed in (42, 43):  # a second prompt runs both experts again, in the same order
        stock = saved_latent(comfy_server, client.run(_a14b_graph(f"a14b_stock_{seed}", False, seed), timeout=300))
        xdit = saved_latent(comfy_server, client.run(_a14b_graph(f"a14b_xdit_{seed}", True, seed, **degrees), timeout=600))
        assert xdit.shape == stock.shape == (1, 16, 3, 10, 14)
        assert stock.abs().max() > 0.1
        assert (xdit - stock).abs().max().item() <= max(FP32_TOL, RELATIVE_TOL * stock.abs().max().item())
        ranks = comfy_server.get_json("/xdit/status")["pool"]["ranks"]
        for rank in ranks:
            assert sorted(key[0].rsplit("/", 1)[-1] for key in rank["resident"]) == sorted([TINY_NAME, TINY_LOW_NOISE_NAME])
        if loads is None:
            loads = [(rank["model_loads"], rank["parallel_builds"]) for rank in ranks]
        else:
            assert [(rank["model_loads"], rank["parallel_builds"]) for rank in ranks] == loads, "a second prompt reloaded an expert"


I2V_WORKFLOW = REPO_ROOT / "workflows" / "api" / "wan22_a14b_i2v_xdit_api.json"
I2V_HIGH_NOISE_NAME = "tiny-wan22-a14b-i2v-high-noise.safetensors"
I2V_LOW_NOISE_NAME = "tiny-wan22-a14b-i2v-low-noise.safetensors"
START_IMAGE = "xdit-test-start-image.png"
WAN21_I2V_NAME = "tiny-wan21-i2v.safetensors"


@pytest.fixture(scope="module")
def start_image(comfy_server, client) -> None:
    """A seeded start image in the server's input folder (what LoadImage offers)."""
    inputs = comfy_server.base / "input"
    inputs.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 112, 3), dtype=np.uint8)).save(inputs / START_IMAGE)


@pytest.fixture(scope="module")
def i2v_experts(comfy_server, start_image, tmp_path_factory) -> None:
    """Two tiny Wan 2.2 A14B I2V experts (seeds 0 and 1: high and low noise) on the server, written in this process
    (ComfyUI is imported here already; the CLI that writes them is tested elsewhere)."""
    from comfyui_xdit.testing.tiny_models import write_tiny_model

    folder = tmp_path_factory.mktemp("wan_i2v_experts")
    for seed, name in enumerate((I2V_HIGH_NOISE_NAME, I2V_LOW_NOISE_NAME)):
        link_tiny_model(comfy_server, write_tiny_model("wan22_a14b_i2v", folder / name, seed=seed), name)


def _i2v_graph(prefix: str, xdit: bool, seed: int = 42, start_image: bool = True, experts=(I2V_HIGH_NOISE_NAME, I2V_LOW_NOISE_NAME),
               clip_vision_seed: int | None = None, **loader_inputs) -> dict:
    """The shipped Wan 2.2 A14B I2V graph offline: the start image through WanImageToVideo (tiny Wan VAE) into a
    9-frame 112 x 80 clip (a 3 x 10 x 14 latent: 105 tokens, 5 token rows), the high-noise expert for steps 0-2 of 4,
    the low-noise one for 2-4, the clip decoded and saved losslessly, and the sampled latent saved. With
    `clip_vision_seed`, WanImageToVideo also gets a seeded stand-in CLIP vision output (XDiTTestClipVisionOutput)."""
    workflow = make_offline(load_api_workflow(I2V_WORKFLOW), experts[0], vae_name=VAE_NAME, steps=4,
                            context_dim=UMT5_WIDTH, image=START_IMAGE)
    workflow["11"]["inputs"]["unet_name"] = experts[1]
    if clip_vision_seed is not None:
        workflow["16"] = {"class_type": "XDiTTestClipVisionOutput", "inputs": {"seed": clip_vision_seed, "tokens": 257, "width": 1280}}
        workflow["6"]["inputs"]["clip_vision_output"] = ["16", 0]
    workflow["6"]["inputs"].update(width=112, height=80, length=9)
    workflow["7"]["inputs"].update(end_at_step=2, noise_seed=seed)
    workflow["13"]["inputs"].update(start_at_step=2)
    workflow["10"]["inputs"].update(lossless=True, filename_prefix=f"{prefix}_clip")
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": prefix}}
    if not start_image:
        del workflow["14"], workflow["6"]["inputs"]["start_image"]
    if not xdit:
        return stock_twin(workflow)
    for loader in ("1", "11"):
        workflow[loader]["inputs"].update(loader_inputs)
    return workflow


def _assert_i2v_runs_match(comfy_server, stock_run, xdit_run) -> None:
    stock, xdit = saved_latent(comfy_server, stock_run), saved_latent(comfy_server, xdit_run)
    assert xdit.shape == stock.shape == (1, 16, 3, 10, 14)
    assert stock.abs().max() > 0.1
    assert (xdit - stock).abs().max().item() <= max(FP32_TOL, RELATIVE_TOL * stock.abs().max().item())
    stock_frames, xdit_frames = _clip(comfy_server, stock_run), _clip(comfy_server, xdit_run)
    assert len(xdit_frames) == len(stock_frames) == 9
    assert all(a.shape == b.shape == (80, 112, 3) and np.abs(a - b).max() <= 1 for a, b in zip(xdit_frames, stock_frames))


@pytest.mark.parametrize("degrees", [{"world_size": 2}, {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1}],
                         ids=["shipped-auto-2", "ulysses2-ring2"])
def test_shipped_wan22_a14b_i2v_workflow_matches_the_stock_graph(comfy_server, client, i2v_experts, degrees):
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    stock_run = client.run(_i2v_graph(f"i2v_stock_{name}", False), timeout=300)
    xdit_run = client.run(_i2v_graph(f"i2v_xdit_{name}", True, **degrees), timeout=600)
    _assert_i2v_runs_match(comfy_server, stock_run, xdit_run)
    status = comfy_server.get_json("/xdit/status")["pool"]
    assert status["world_size"] == degrees["world_size"]
    for rank in status["ranks"]:  # both experts stay resident on every rank
        assert {I2V_HIGH_NOISE_NAME, I2V_LOW_NOISE_NAME} <= {key[0].rsplit("/", 1)[-1] for key in rank["resident"]}


def test_wan22_a14b_i2v_without_its_start_image_is_refused_before_work_starts(comfy_server, client, i2v_experts):
    def jobs_run() -> int:
        return (comfy_server.get_json("/xdit/status")["pool"] or {}).get("jobs_run", 0)

    before = jobs_run()
    with pytest.raises(ExecutionFailed, match=rf"XDiTKSamplerAdvanced: {I2V_HIGH_NOISE_NAME} is an image-to-video Wan 2\.1 model "
                                              r"\(its 36 input channels .*connect an image to WanImageToVideo's start_image input "
                                              r"\(stock ComfyUI would sample it from an all-zero image\)") as refused:
        client.run(_i2v_graph("i2v_no_image", True, start_image=False, world_size=2), timeout=300)
    assert refused.value.node_id == "7"
    assert jobs_run() == before, "the pool ran a job for a refused prompt"
    # The server and the pool are still up: the next prompt runs, as stock does.
    _assert_i2v_runs_match(comfy_server, client.run(_i2v_graph("i2v_after_refusal_stock", False, seed=7), timeout=300),
                           client.run(_i2v_graph("i2v_after_refusal_xdit", True, seed=7, world_size=2), timeout=600))


def test_wan21_i2v_with_clip_vision_matches_the_stock_graph(comfy_server, client, start_image, tiny_model_path):
    """Wan 2.1 I2V (detected as I2V: the start image's latent and mask concatenated to the noise, and CLIP vision
    tokens through img_emb into every block's cross-attention) as both experts of the shipped I2V graph, at world 2
    (auto: ulysses 2). Its CLIP_VISION_OUTPUT comes from the test node XDiTTestClipVisionOutput because no CLIP vision
    model can be made tiny (ComfyUI builds one at ViT-H's real size) and none can be downloaded here."""
    link_tiny_model(comfy_server, tiny_model_path("wan21_i2v"), WAN21_I2V_NAME)
    graph = functools.partial(_i2v_graph, experts=(WAN21_I2V_NAME, WAN21_I2V_NAME), clip_vision_seed=3)
    _assert_i2v_runs_match(comfy_server, client.run(graph("wan21_i2v_stock", False), timeout=300),
                           client.run(graph("wan21_i2v_xdit", True, world_size=2), timeout=600))


TI2V_5B_WORKFLOW = REPO_ROOT / "workflows" / "api" / "wan22_5b_ti2v_xdit_api.json"
TINY_5B_NAME = "tiny-wan22-5b.safetensors"


def _ti2v_5b_graph(prefix: str, xdit: bool, vae_name: str) -> dict:
    """The shipped Wan 2.2 5B graph offline on the tiny 5B and the full-width Wan 2.2 VAE, text to video (start_image
    left unconnected, as shipped), also saving the sampled latent: 9 frames of 32 x 80 px are a 48-channel latent of
    3 x 5 x 2, i.e. 3 x 3 x 1 = 9 tokens (uneven over 2 ranks), and 5 rows for the VAE (uneven over 2 workers)."""
    workflow = make_offline(load_api_workflow(TI2V_5B_WORKFLOW), TINY_5B_NAME, vae_name=vae_name, steps=STEPS, context_dim=UMT5_WIDTH)
    workflow["10"]["inputs"].update(lossless=True, filename_prefix=f"{prefix}_clip")
    workflow["6"]["inputs"].update(width=32, height=80, length=9)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}}
    return workflow if xdit else stock_twin(workflow)


def test_shipped_wan22_5b_workflow_matches_the_stock_graph(comfy_server, client, tiny_model_path):
    """Sampling (CFG 5, uni_pc, shift 8) and the Wan 2.2 VAE's decode on the shipped auto pool (2 CPU workers) against
    the stock twin; the VAE's copies are released afterwards (server_graphs.release_pool_vae)."""
    link_tiny_model(comfy_server, tiny_model_path("wan22_5b"), TINY_5B_NAME)
    vae_name = link_wan22_vae(comfy_server, tiny_model_path)
    try:
        started = time.perf_counter()
        stock_run = client.run(_ti2v_5b_graph("wan22_5b_stock", False, vae_name), timeout=600)
        stock_s = time.perf_counter() - started
        drop_cached_outputs(comfy_server, client)  # the stock VAE goes before the pool's is loaded
        started = time.perf_counter()
        xdit_run = client.run(_ti2v_5b_graph("wan22_5b_xdit", True, vae_name), timeout=900)
        xdit_s = time.perf_counter() - started
        stock, xdit = saved_latent(comfy_server, stock_run), saved_latent(comfy_server, xdit_run)
        assert xdit.shape == stock.shape == (1, 48, 3, 5, 2)
        assert stock.abs().max() > 0.1
        error = (xdit - stock).abs().max().item()
        stock_frames, xdit_frames = _clip(comfy_server, stock_run), _clip(comfy_server, xdit_run)
        levels = max(np.abs(a - b).max() for a, b in zip(xdit_frames, stock_frames))
        print(f"wan22 5B workflow: latent max abs error {error:.3g} (max {stock.abs().max().item():.3g}), frames within {levels} "
              f"levels; stock {stock_s:.1f} s, pool {xdit_s:.1f} s")
        assert error <= max(FP32_TOL, RELATIVE_TOL * stock.abs().max().item())
        assert len(xdit_frames) == len(stock_frames) == 9
        assert all(a.shape == b.shape == (80, 32, 3) for a, b in zip(xdit_frames, stock_frames)) and levels <= 1
        assert np.std(stock_frames) > 20  # a picture, not a flat field
        status = comfy_server.get_json("/xdit/status")["pool"]
        assert status["world_size"] == 2 and all(rank["vae_loads"] >= 1 for rank in status["ranks"])
    finally:
        release_pool_vae(comfy_server, client)
