"""Rank-side sampling for the exactness tests of every family: stock ComfyUI nodes, stock vs parallel model.

Every rank imports the real ComfyUI, loads a tiny model with ComfyUI's own loader, and drives the sampling path
SamplerCustomAdvanced takes ([ModelSamplingFlux for Flux-type models, ModelSamplingSD3 for SD3, ModelSamplingAuraFlow
for Qwen-Image, none for Chroma] -> BasicGuider/CFGGuider -> BasicScheduler, KSamplerSelect, RandomNoise -> SamplerCustomAdvanced)
through the stock node classes. Rank 0 also runs the unpatched model. Latent channels and the text width come from
the loaded model, so one case fits every family (Qwen-Image's 4-D empty latent becomes its 5-D (B, C, 1, H, W) one
inside ComfyUI's sampler, as in its workflows).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from comfyui_xdit.comfy_runtime import init_worker
from comfyui_xdit.testing.tiny_models import IN_PROCESS_PREFIX, load_tiny_model, stand_in_conditioning

TEXT_TOKENS = 7


@dataclass(frozen=True)
class SamplingCase:
    name: str
    guider: str = "basic"  # "basic" or "cfg"
    cfg: float = 3.5
    sampler: str = "euler"
    steps: int = 3
    height: int = 16  # latent rows
    width: int = 16
    batch: int = 1
    seed: int = 0
    reference: tuple[int, int] | None = None  # rows, cols of a seeded reference latent given to every cond (ReferenceLatent)


CASES: tuple[SamplingCase, ...] = (
    SamplingCase("basic-euler"),
    SamplingCase("cfg-euler", guider="cfg"),
    SamplingCase("cfg-dpmpp2m-18x22", guider="cfg", sampler="dpmpp_2m", height=18, width=22, seed=1),
    SamplingCase("basic-dpmpp2m-18x22-batch2", sampler="dpmpp_2m", height=18, width=22, batch=2, seed=2),
    SamplingCase("cfg-euler-10x12-batch2", guider="cfg", cfg=5.0, height=10, width=12, batch=2, seed=3),
    SamplingCase("edit-cfg-euler-18x22-ref12x14", guider="cfg", height=18, width=22, seed=4, reference=(12, 14)),
)
CASE_BY_NAME = {case.name: case for case in CASES}
# Which cases each tiny family runs: Flux all but the U-Net-sized one; Flux.2 (512 padded text tokens, slower) its
# uneven CFG case; the SD1.5 U-Net (CFG and data parallel only) one case that exercises both.
FAMILY_CASES: dict[str, tuple[str, ...]] = {
    "flux": tuple(c.name for c in CASES[:4]),
    "flux2": ("cfg-dpmpp2m-18x22",),
    "sd15": ("cfg-euler-10x12-batch2",),
    # SD3 (MMDiT) and SD3.5's dual-attention blocks: even and uneven grids, both guiders, both samplers, a batch.
    "sd3": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    "sd35": ("cfg-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    # Qwen-Image (hidden 3072 fixed by detection, ~0.4 s a forward here): euler and dpmpp_2m, basic and CFG, one
    # even and two uneven token grids (9x11 rows), batch 2 for data parallel.
    "qwen_image": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    # Qwen-Image-Edit is Qwen-Image's model class given reference images: 99 image + 42 reference tokens.
    "qwen_image_edit": ("edit-cfg-euler-18x22-ref12x14",),
    # Chroma (in-process, Flux-tiny width) and Chroma Radiance (pixels, 2 x 2 patches: 9 x 11 tokens at 18 x 22).
    "chroma": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    "chroma_radiance": ("cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
}
# The tiny file each entry runs (default: the one of its own name), or tiny_models.IN_PROCESS_PREFIX + a name for
# families built in-process (their detection fixes billions of parameters).
MODEL_FILE: dict[str, str] = {"qwen_image_edit": "qwen_image", "chroma": IN_PROCESS_PREFIX + "chroma",
                              "chroma_radiance": IN_PROCESS_PREFIX + "chroma_radiance"}



def model_spec(family: str, tiny_flux_paths: dict, tiny_model_path) -> str:
    """What family_rank loads for `family`: its tiny file (written by the session fixtures) or its in-process name."""
    name = MODEL_FILE.get(family, family)
    if name.startswith(IN_PROCESS_PREFIX):
        return name
    return str(tiny_flux_paths["dev"] if family == "flux" else tiny_model_path(name))

def _conditioning(seed: int, context_dim: int = 64, reference: torch.Tensor | None = None):
    from comfy_extras.nodes_edit_model import ReferenceLatent

    conditioning = stand_in_conditioning(seed, TEXT_TOKENS, context_dim=context_dim)
    if reference is None:
        return conditioning
    return _first(ReferenceLatent.execute(conditioning, {"samples": reference}))


def _reference_latent(base_model, case: SamplingCase) -> torch.Tensor | None:
    """A seeded stand-in for a VAE-encoded reference image, shaped like the model's latents (5-D for image models
    with video-style latents)."""
    if case.reference is None:
        return None
    latent_format = base_model.latent_format
    frames = (1,) if latent_format.latent_dimensions == 3 else ()
    shape = (1, latent_format.latent_channels, *frames, *case.reference)
    return torch.randn(shape, generator=torch.Generator().manual_seed(300 + case.seed))


def _text_width(base_model) -> int:
    # Flux names it context_in_dim and U-Nets context_dim; MMDiT records the input of its context embedder; Qwen-Image's
    # is its class default (not in the detected config): read it off the text input layer.
    unet_config = base_model.model_config.unet_config
    if "context_embedder_config" in unet_config:
        return unet_config["context_embedder_config"]["params"]["in_features"]
    return unet_config.get("context_in_dim", unet_config.get("context_dim")) or base_model.diffusion_model.txt_in.in_features


def _first(node_output):
    return node_output.result[0] if hasattr(node_output, "result") else node_output[0]


def sample(model_patcher, case: SamplingCase) -> torch.Tensor:
    """The latent SamplerCustomAdvanced returns for `case`, built with ComfyUI's stock nodes."""
    import comfy.model_base
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow, ModelSamplingFlux, ModelSamplingSD3

    base_model = model_patcher.model
    context_dim = _text_width(base_model)
    model = model_patcher
    if isinstance(base_model, comfy.model_base.QwenImage):  # ComfyUI's Qwen-Image workflows shift with this node
        model = ModelSamplingAuraFlow().patch_aura(model_patcher, 3.1)[0]
    elif isinstance(base_model, comfy.model_base.Chroma):  # ComfyUI's Chroma graphs sample with the model's own shift
        pass
    elif base_model.model_type == comfy.model_base.ModelType.FLUX:
        model = ModelSamplingFlux().patch(model_patcher, 1.15, 0.5, case.width * 8, case.height * 8)[0]
    elif isinstance(base_model, comfy.model_base.SD3):  # a shift other than the config's 3.0, as SD3.5 graphs set it
        model = ModelSamplingSD3().patch(model_patcher, 2.5)[0]
    reference = _reference_latent(base_model, case)
    positive = _conditioning(100, context_dim, reference)
    if case.guider == "cfg":
        guider = _first(custom.CFGGuider.execute(model, positive, _conditioning(200, context_dim, reference), case.cfg))
    else:
        guider = _first(custom.BasicGuider.execute(model, positive))
    sigmas = _first(custom.BasicScheduler.execute(model, "simple", case.steps, 1.0))
    sampler = _first(custom.KSamplerSelect.execute(case.sampler))
    noise = _first(custom.RandomNoise.execute(case.seed))
    latent = {"samples": torch.zeros(case.batch, base_model.latent_format.latent_channels, case.height, case.width)}
    return _first(custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent))["samples"]


def family_rank(rank: int, world_size: int, model_spec: str, configs: list[dict], case_dicts: list[dict],
                device: str = "cpu") -> dict:
    """Parallel latents of every (config, case) on this rank; rank 0 adds the stock latents and re-checks them.
    device "cuda": ComfyUI runs on this rank's CUDA device (local_launch sets it), for NCCL ranks."""
    init_worker(cpu=(device == "cpu"))
    from comfyui_xdit.parallel_model import parallelize
    from parallel_core import ParallelConfig, init_parallel

    cases = [SamplingCase(**c) for c in case_dicts]
    base = load_tiny_model(model_spec)
    result: dict = {"parallel": {}, "bytes": {}}
    if rank == 0:
        result["stock"] = {case.name: sample(base, case) for case in cases}
    for degrees in configs:
        state = init_parallel(ParallelConfig(**degrees))
        model = parallelize(base, state)
        for case in cases:
            state.comm.reset()
            result["parallel"][f"{tag(degrees)}/{case.name}"] = sample(model, case)
            result["bytes"][f"{tag(degrees)}/{case.name}"] = state.comm.snapshot()
    if rank == 0:
        # The unpatched ModelPatcher, used again after the parallel clones, is stock again, bit for bit.
        result["stock_again"] = {case.name: sample(base, case) for case in cases}
    return result


# The exact methods each family is checked with, by world size.
CONFIGS: dict[str, dict[int, list[dict]]] = {
    "flux": {
        2: [
            {"ulysses_degree": 2},
            {"ring_degree": 2},
            {"cfg_degree": 2},
            {"data_degree": 2},
        ],
        4: [
            {"ulysses_degree": 4},
            {"ulysses_degree": 2, "ring_degree": 2},
            {"ring_degree": 4},
            {"ulysses_degree": 2, "cfg_degree": 2},
            {"ring_degree": 2, "cfg_degree": 2},
            {"cfg_degree": 4},
            {"ulysses_degree": 2, "data_degree": 2},
            {"cfg_degree": 2, "data_degree": 2},
        ],
    },
    "flux2": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}],
    },
    "sd15": {2: [{"cfg_degree": 2}, {"data_degree": 2}]},
    "sd3": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}],
    },
    "qwen_image": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ring_degree": 2, "cfg_degree": 2}],
    },
    # Data parallel refuses per-sample reference lists (parallel_glue), so it is not among these.
    "qwen_image_edit": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}],
    },
}
CONFIGS["sd35"] = CONFIGS["sd3"]
CONFIGS["chroma"] = CONFIGS["chroma_radiance"] = CONFIGS["qwen_image"]
FP32_TOL = 1e-5
# CFG multiplies the difference of two predictions by the guidance scale, and EPS models' latents reach ~15: there
# the bound is relative to the latent's size.
RELATIVE_TOL = 2e-6


def tag(degrees: dict) -> str:
    return "-".join(f"{k.split('_')[0]}{v}" for k, v in degrees.items())


def differences_from_stock(per_rank: list[dict], family: str, world_size: int) -> list[str]:
    """One line per (config, case, rank) whose latent is not stock's to fp32 rounding; empty when all match."""
    stock = per_rank[0]["stock"]
    failures = []
    for degrees in CONFIGS[family][world_size]:
        for name in FAMILY_CASES[family]:
            key = f"{tag(degrees)}/{name}"
            reference = stock[name]
            if not reference.abs().max() > 0.1:
                failures.append(f"{name}: stock latent is trivial; the comparison would prove nothing")
            tolerance = max(FP32_TOL, RELATIVE_TOL * reference.abs().max().item())
            for rank, result in enumerate(per_rank):
                latent = result["parallel"][key]
                if latent.shape != reference.shape:
                    failures.append(f"{key} rank {rank}: shape {tuple(latent.shape)} != {tuple(reference.shape)}")
                    continue
                err = (latent - reference).abs().max().item()
                if not err <= tolerance:
                    failures.append(f"{key} rank {rank}: max abs error {err:.3e} vs stock (tolerance {tolerance:.1e})")
    return failures


def case_dicts(family: str) -> list[dict]:
    return [asdict(CASE_BY_NAME[name]) for name in FAMILY_CASES[family]]
