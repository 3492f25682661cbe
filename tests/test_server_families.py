"""The shipped workflow of each DiT family, image and video, through a real ComfyUI server on that family's tiny
weights: XDiT loader and sampler on a local Ray pool vs the same graph with the stock nodes, on a latent whose token
count does not divide the degrees (odd rows; odd frames for video); what a family does not take is refused by the
family's name; and Cancel stops a video prompt mid-run. Qwen-Image and Wan have their own modules (a KSampler
workflow; Wan's XDiT VAE decode and two experts)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from server_graphs import link_tiny_model, saved_latent
from server_jobs import cancel_mid_run

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed
from comfyui_xdit.testing.server_launcher import REPO_ROOT
from comfyui_xdit.workflow_tools import load_api_workflow, make_offline, stock_twin

pytestmark = pytest.mark.server

FP32_TOL = 1e-5
DECODE_NODES = ("12", "13", "14")  # VAELoader, VAEDecode, SaveImage / SaveAnimatedWEBP in every shipped workflow here
LATENT_NODE = "10"  # the empty latent (image or video)
SAMPLER_NODE = "11"  # XDiTSamplerCustomAdvanced: a run's "warmup_steps" goes to it, its other inputs to the loader


@dataclass(frozen=True)
class ShippedFamily:
    workflow: str  # in workflows/api
    tiny_family: str  # tiny_models family of the weights it runs on
    size: int  # image pixels each way
    steps: int
    text_width: int  # the stand-in conditioning's width: what the tiny model's text input takes
    latent_shape: tuple[int, ...]
    degrees: tuple[tuple[str, dict], ...]  # (test id, loader inputs) of each pool run
    refusal: str | None  # regex of the error a PipeFusion degree gets; None: the family takes it (a run in `degrees`)
    relative_tol: float = 0.0  # CFG amplifies rounding: relative to the latent's size where that is larger
    decoded: bool = True  # False: the tiny VAE (taef1, Flux.1's 16 channels) cannot decode it; latents are compared
    height: int = 0  # pixels high when not square
    frames: int = 0  # a video's frames (0: an image)
    pooled_width: int = 32  # the stand-in conditioning's pooled vector
    text_mask: bool = False  # the family's text encoder hands the model a text mask (T5 for LTX-Video)

    @property
    def tiny_name(self) -> str:
        return f"tiny-{self.tiny_family}.safetensors"


AUTO_2 = ("shipped-auto-2", {"world_size": 2})
FAMILIES = {
    # An 18 x 18 latent: 81 tokens of 2 x 2 patches.
    "sd35": ShippedFamily("sd35_xdit_api.json", "sd35", 144, 3, 64, (1, 16, 18, 18),
                          (AUTO_2, ("ulysses2-ring2", {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1})),
                          # SD3 takes PipeFusion; this tiny SD3.5 has SD3.5 Medium's dual-attention blocks, which it refuses.
                          r"PipeFusion and patch parallel do not take SD3 models with dual-attention blocks .*"
                          r"set pipefusion_degree and patch_degree to 1"),
    # The smallest Chroma stock detection takes (width 3072, one double block; 2 GB): world 2 only, 2 steps (~10 s each).
    # Chroma takes PipeFusion and patch parallel (the exactness suite runs them in-process); this file's one block
    # cannot make two stages.
    "chroma": ShippedFamily("chroma_xdit_api.json", "chroma", 144, 2, 64, (1, 16, 18, 18),
                            (AUTO_2, ("ring2", {"world_size": 2, "ring_degree": 2, "cfg_degree": 1})), None, relative_tol=2e-6),
    # Captions 2304 wide (Gemma 2 2B). One prompt pair: auto degrees at world 2 give Lumina 2 ulysses 2 (its 24 heads
    # split); the 1.7 GB tiny file makes each prompt slow here, and the exactness suite covers ring, cfg and data.
    "lumina2": ShippedFamily("lumina2_xdit_api.json", "lumina2", 144, 3, 2304, (1, 16, 18, 18), (AUTO_2,),
                             r"Lumina 2 supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1"),
    # A 9 x 9 latent of 128 channels: 81 tokens of 1 x 1 patches.
    "flux2": ShippedFamily("flux2_dev_xdit_api.json", "flux2", 144, 3, 64, (1, 128, 9, 9),
                           (AUTO_2, ("ulysses2-ring2", {"world_size": 4, "ulysses_degree": 2, "ring_degree": 2, "cfg_degree": 1}),
                            ("pipefusion2-full-warmup", {"world_size": 2, "pipefusion_degree": 2, "cfg_degree": 1, "warmup_steps": 3})),
                           None, decoded=False),
    # Video (no tiny VAEs of these families: latents compared). HunyuanVideo: 9 frames of 112 x 80 px, a 3 x 10 x 14
    # latent, 105 tokens of 2 x 2 patches; CLIP-L's pooled width is fixed by detection; FluxGuidance, no CFG.
    "hunyuan_video": ShippedFamily("hunyuan_video_t2v_xdit_api.json", "hunyuan_video", 112, 3, 64, (1, 16, 3, 10, 14), (AUTO_2,),
                                   r"HunyuanVideo supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1",
                                   decoded=False, height=80, frames=9, pooled_width=768),
    # HunyuanVideo 1.5: a 3 x 5 x 7 latent of 32 channels (16 x 16 px, 1 x 1 patches); CFG 6, shift 7, no ByT5 glyph
    # text (stock 0.30.0 fails on a text mask beside ByT5 tokens).
    "hunyuan_video15": ShippedFamily("hunyuan_video15_t2v_xdit_api.json", "hunyuan_video15", 112, 3, 64, (1, 32, 3, 5, 7), (AUTO_2,),
                                     r"HunyuanVideo 1.5 supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1",
                                     relative_tol=2e-6, decoded=False, height=80, frames=9),
    # LTX-Video: 17 frames of 224 x 160 px, a 3 x 5 x 7 latent (128 channels, 1 x 1 patches); T5's 4096-wide text.
    "ltxv": ShippedFamily("ltxv_t2v_xdit_api.json", "ltxv", 224, 3, 4096, (1, 128, 3, 5, 7),
                          (AUTO_2, ("ring2", {"world_size": 2, "ring_degree": 2, "cfg_degree": 1})),
                          r"LTXV supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1",
                          relative_tol=2e-6, decoded=False, height=160, frames=17, text_mask=True),
    # CogVideoX: 9 frames of 112 x 80 px, a 3 x 10 x 14 latent, 105 tokens of 2 x 2 patches; CFG 6.
    "cogvideox": ShippedFamily("cogvideox_t2v_xdit_api.json", "cogvideox", 112, 3, 64, (1, 16, 3, 10, 14),
                               (AUTO_2, ("ulysses2", {"world_size": 2, "ulysses_degree": 2, "cfg_degree": 1})),
                               r"CogVideoX supports ulysses, ring, cfg and data parallel only .*set pipefusion_degree to 1",
                               relative_tol=2e-6, decoded=False, height=80, frames=9),
}
RUNS = [pytest.param(key, degrees, id=f"{key}-{run_id}") for key, spec in FAMILIES.items() for run_id, degrees in spec.degrees]


@pytest.fixture(scope="module")
def client(comfy_server, tiny_model_path):
    """client(key): a client of the server once the family's tiny file is linked into it (written on first use, so a
    -k selection pays only for its families' files; Chroma's and Lumina 2's are 2 and 1.7 GB)."""
    def for_family(key: str) -> ComfyClient:
        spec = FAMILIES[key]
        link_tiny_model(comfy_server, tiny_model_path(spec.tiny_family), spec.tiny_name)
        return ComfyClient(comfy_server.url)

    return for_family


def _graph(spec: ShippedFamily, prefix: str, xdit: bool, steps: int = 0, **loader_inputs) -> dict:
    workflow = make_offline(load_api_workflow(REPO_ROOT / "workflows" / "api" / spec.workflow), spec.tiny_name,
                            size=spec.size, steps=steps or spec.steps, context_dim=spec.text_width,
                            pooled_dim=spec.pooled_width, text_mask=spec.text_mask)
    if spec.frames:  # video latents are not among make_offline's square ones
        workflow[LATENT_NODE]["inputs"].update(width=spec.size, height=spec.height or spec.size, length=spec.frames)
    if not spec.decoded:
        for node_id in DECODE_NODES:
            del workflow[node_id]
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}}
    if not xdit:
        return stock_twin(workflow)
    sampler_inputs = {key: loader_inputs.pop(key) for key in ("warmup_steps",) if key in loader_inputs}
    workflow[SAMPLER_NODE]["inputs"].update(sampler_inputs)
    workflow["1"]["inputs"].update(loader_inputs)
    return workflow


@pytest.fixture(scope="module")
def stock(comfy_server, client):
    """stock(key): the stock graph's latent, computed once per family."""
    latents = {}

    def for_family(key: str):
        if key not in latents:
            result = client(key).run(_graph(FAMILIES[key], f"{key}_stock", False), timeout=600)
            latents[key] = saved_latent(comfy_server, result)
        return latents[key]

    return for_family


@pytest.mark.parametrize(("key", "degrees"), RUNS)
def test_shipped_workflow_matches_the_stock_graph(comfy_server, client, stock, key, degrees):
    spec = FAMILIES[key]
    name = "-".join(f"{k}{v}" for k, v in degrees.items())
    expected = stock(key)
    xdit = saved_latent(comfy_server, client(key).run(_graph(spec, f"{key}_xdit_{name}", True, **dict(degrees)), timeout=900))
    assert xdit.shape == expected.shape == spec.latent_shape
    assert expected.abs().max() > 0.1
    assert (xdit - expected).abs().max().item() <= max(FP32_TOL, spec.relative_tol * expected.abs().max().item())
    assert comfy_server.get_json("/xdit/status")["pool"]["world_size"] == degrees["world_size"]


@pytest.mark.parametrize("key", [key for key, spec in FAMILIES.items() if spec.refusal])
def test_pipefusion_is_refused_by_the_family_name(client, key):
    with pytest.raises(ExecutionFailed, match=FAMILIES[key].refusal):
        client(key).run(_graph(FAMILIES[key], f"{key}_refused", True, world_size=2, pipefusion_degree=2), timeout=300)


def test_a_video_prompt_reports_progress_and_cancel_stops_it(comfy_server, client, stock):
    """Cancel (POST /interrupt) mid-video stops every rank within seconds; the pool stays up and the next prompt is exact."""
    spec, degrees = FAMILIES["cogvideox"], {"world_size": 2, "ulysses_degree": 2, "cfg_degree": 1}
    client("cogvideox")  # links the tiny file
    steps = cancel_mid_run(comfy_server.url, _graph(spec, "cogvideox_cancelled", True, steps=400, **degrees))
    assert steps == sorted(steps) and 3 <= steps[-1] < 400
    assert comfy_server.get_json("/xdit/status")["pool"] is not None, "a cancel leaves the pool running"
    after = saved_latent(comfy_server, client("cogvideox").run(_graph(spec, "cogvideox_after_cancel", True, **degrees), timeout=600))
    expected = stock("cogvideox")
    assert (after - expected).abs().max().item() <= max(FP32_TOL, spec.relative_tol * expected.abs().max().item())
