"""The shipped text-to-video workflow of each video DiT family through a real ComfyUI server on that family's tiny
weights: XDiT loader and sampler on a local Ray pool vs the same graph with the stock nodes, on a video latent whose
token count divides no degree (odd frames, odd rows); PipeFusion refused by the family's name, the server staying up.
Wan has its own module (it decodes through the XDiT VAE nodes and runs two experts)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from server_graphs import link_tiny_model, saved_latent
from server_jobs import post_interrupt, run_in_background, wait_for_progress

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed, ExecutionInterrupted
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
DECODE_NODES = ("12", "13", "14")  # VAELoader, VAEDecode, SaveAnimatedWEBP: no tiny VAE of these families
LATENT_NODE, SAMPLER_NODE = "10", "11"


@dataclass(frozen=True)
class ShippedVideo:
    workflow: str  # in workflows/api
    tiny_family: str  # tiny_models family of the weights it runs on
    frames_size: tuple[int, int, int]  # (length, width, height) in pixels given to the empty-latent node
    text_width: int  # the stand-in conditioning's width: what the tiny model's text input takes
    latent_shape: tuple[int, ...]
    degrees: tuple[tuple[str, dict], ...]  # (test id, loader inputs) of each pool run
    refusal: str  # regex of the error a PipeFusion degree gets
    pooled_width: int = 32
    text_mask: bool = False  # the family's text encoder hands the model a text mask
    relative_tol: float = 0.0  # CFG amplifies rounding: relative to the latent's size where that is larger

    @property
    def tiny_name(self) -> str:
        return f"tiny-{self.tiny_family}.safetensors"


AUTO_2 = ("auto-2", {"world_size": 2})
VIDEOS = {
    # 9 frames of 112 x 80 px: a 3 x 10 x 14 latent, 105 tokens of 2 x 2 patches. CLIP-L's pooled width is fixed by
    # detection; FluxGuidance, no CFG.
    "hunyuan_video": ShippedVideo("hunyuan_video_t2v_xdit_api.json", "hunyuan_video", (9, 112, 80), 64, (1, 16, 3, 10, 14),
                                  (AUTO_2,), r"HunyuanVideo supports ulysses, ring, cfg and data parallel only .*"
                                             r"set pipefusion_degree to 1", pooled_width=768),
    # 1.5: 9 frames of 112 x 80 px: a 3 x 5 x 7 latent of 32 channels (16 x 16 px, 1 x 1 patches), 105 tokens; CFG 6,
    # shift 7, no ByT5 glyph text (stock 0.30.0 fails on a text mask beside ByT5 tokens).
    "hunyuan_video15": ShippedVideo("hunyuan_video15_t2v_xdit_api.json", "hunyuan_video15", (9, 112, 80), 64, (1, 32, 3, 5, 7),
                                    (AUTO_2,), r"HunyuanVideo 1.5 supports ulysses, ring, cfg and data parallel only .*"
                                               r"set pipefusion_degree to 1", relative_tol=2e-6),
    # 17 frames of 224 x 160 px: a 3 x 5 x 7 latent (128 channels, 1 x 1 patches), 105 tokens; T5's 4096-wide text.
    "ltxv": ShippedVideo("ltxv_t2v_xdit_api.json", "ltxv", (17, 224, 160), 4096, (1, 128, 3, 5, 7),
                         (AUTO_2, ("ring2", {"world_size": 2, "ring_degree": 2, "cfg_degree": 1})),
                         r"LTXV supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1",
                         relative_tol=2e-6, text_mask=True),
    # 9 frames of 112 x 80 px: a 3 x 10 x 14 latent, 105 tokens of 2 x 2 patches; CFG 6.
    "cogvideox": ShippedVideo("cogvideox_t2v_xdit_api.json", "cogvideox", (9, 112, 80), 64, (1, 16, 3, 10, 14),
                              (AUTO_2, ("ulysses2", {"world_size": 2, "ulysses_degree": 2, "cfg_degree": 1})),
                              r"CogVideoX supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1",
                              relative_tol=2e-6),
}
RUNS = [pytest.param(key, degrees, id=f"{key}-{run_id}") for key, spec in VIDEOS.items() for run_id, degrees in spec.degrees]


def _graph(spec: ShippedVideo, prefix: str, xdit: bool, steps: int = 3, **loader_inputs) -> dict:
    """The shipped graph offline (seeded stand-in text, tiny weights), saving the sampled latent."""
    workflow = make_offline(load_api_workflow(REPO_ROOT / "workflows" / "api" / spec.workflow), spec.tiny_name, steps=steps,
                            context_dim=spec.text_width, pooled_dim=spec.pooled_width, text_mask=spec.text_mask)
    for node_id in DECODE_NODES:
        del workflow[node_id]
    length, width, height = spec.frames_size
    workflow[LATENT_NODE]["inputs"].update(width=width, height=height, length=length)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER_NODE, 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


@pytest.fixture(scope="module")
def client(comfy_server, tiny_model_path):
    """client(key): a client of the server once the family's tiny file is linked into it (written on first use)."""
    def for_family(key: str) -> ComfyClient:
        link_tiny_model(comfy_server, tiny_model_path(VIDEOS[key].tiny_family), VIDEOS[key].tiny_name)
        return ComfyClient(comfy_server.url)

    return for_family


@pytest.fixture(scope="module")
def stock(comfy_server, client):
    """stock(key): the stock graph's latent, computed once per family."""
    latents = {}

    def for_family(key: str):
        if key not in latents:
            latents[key] = saved_latent(comfy_server, client(key).run(_graph(VIDEOS[key], f"{key}_stock", False), timeout=300))
        return latents[key]

    return for_family


@pytest.mark.parametrize(("key", "degrees"), RUNS)
def test_shipped_video_workflow_matches_the_stock_graph(comfy_server, client, stock, key, degrees):
    spec = VIDEOS[key]
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    expected = stock(key)
    xdit = saved_latent(comfy_server, client(key).run(_graph(spec, f"{key}_xdit_{name}", True, **dict(degrees)), timeout=600))
    assert xdit.shape == expected.shape == spec.latent_shape
    assert expected.abs().max() > 0.1
    assert (xdit - expected).abs().max().item() <= max(FP32_TOL, spec.relative_tol * expected.abs().max().item())
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == degrees["world_size"]


@pytest.mark.parametrize("key", VIDEOS)
def test_pipefusion_is_refused_by_the_video_family_name(client, key):
    with pytest.raises(ExecutionFailed, match=VIDEOS[key].refusal):
        client(key).run(_graph(VIDEOS[key], f"{key}_refused", True, world_size=2, pipefusion_degree=2), timeout=300)


def test_a_video_prompt_reports_progress_and_cancel_stops_it(comfy_server, client, stock):
    """Cancel (POST /interrupt) mid-video stops every rank within seconds; the pool stays up and the next prompt is exact."""
    spec, degrees = VIDEOS["cogvideox"], {"world_size": 2, "ulysses_degree": 2, "cfg_degree": 1}
    thread, outcome = run_in_background(client("cogvideox"), _graph(spec, "cogvideox_cancelled", True, steps=400, **degrees))
    wait_for_progress(outcome, 3)
    interrupted_at = time.monotonic()
    post_interrupt(comfy_server.url)
    thread.join(timeout=120)
    assert isinstance(outcome.get("error"), ExecutionInterrupted), outcome
    assert time.monotonic() - interrupted_at < 20
    steps = [d["value"] for kind, d in outcome["events"] if kind == "progress" and d.get("node") == SAMPLER_NODE]
    assert steps == sorted(steps) and 3 <= steps[-1] < 400
    assert comfy_server.get_json("/xdit/status")["pool"] is not None, "a cancel leaves the pool running"
    after = saved_latent(comfy_server, client("cogvideox").run(_graph(spec, "cogvideox_after_cancel", True, **degrees), timeout=600))
    assert (after - stock("cogvideox")).abs().max().item() <= max(FP32_TOL, spec.relative_tol * stock("cogvideox").abs().max().item())
