"""Rank-side sampling for the exactness tests of every family: stock ComfyUI nodes, stock vs parallel model.

Every rank imports the real ComfyUI, loads a tiny model with ComfyUI's own loader, and drives the sampling path
SamplerCustomAdvanced takes ([ModelSamplingFlux for Flux-type models, ModelSamplingSD3 for SD3, HiDream and Wan, ModelSamplingAuraFlow
for Qwen-Image and Lumina 2, none for Chroma] -> BasicGuider/CFGGuider -> BasicScheduler, KSamplerSelect, RandomNoise -> SamplerCustomAdvanced)
through the stock node classes. Rank 0 also runs the unpatched model. Latent channels and the text width come from
the loaded model, so one case fits every family (Qwen-Image's 4-D empty latent becomes its 5-D (B, C, 1, H, W) one
inside ComfyUI's sampler, as in its workflows); video cases give the latent a frame axis (B, C, T, H, W).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from comfyui_xdit.comfy_runtime import init_worker
from comfyui_xdit.testing.tiny_models import IN_PROCESS_PREFIX, conditioning_widths, load_tiny_model, stand_in_conditioning
from comfyui_xdit.testing.tiny_quant import MIXED_FORMATS, block_weights, quantize_file

TEXT_TOKENS = 7
LLAMA_TOKENS = 5  # HiDream's Llama stand-in: a length other than the T5 text's, so a mix-up changes shapes


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
    frames: int | None = None  # latent frames of a video latent (B, C, frames, rows, cols); None: an image latent
    start_image: bool = False  # a seeded stand-in start image, given the way the family's image-to-video node gives it
    padded_text: bool = False  # the positive prompt's last text tokens are padding, masked (attention_mask) as a text encoder masks them


CASES: tuple[SamplingCase, ...] = (
    SamplingCase("basic-euler"),
    SamplingCase("cfg-euler", guider="cfg"),
    SamplingCase("cfg-dpmpp2m-18x22", guider="cfg", sampler="dpmpp_2m", height=18, width=22, seed=1),
    SamplingCase("basic-dpmpp2m-18x22-batch2", sampler="dpmpp_2m", height=18, width=22, batch=2, seed=2),
    SamplingCase("cfg-euler-10x12-batch2", guider="cfg", cfg=5.0, height=10, width=12, batch=2, seed=3),
    SamplingCase("edit-cfg-euler-18x22-ref12x14", guider="cfg", height=18, width=22, seed=4, reference=(12, 14)),
    # Video: 3 frames of 5x7 tokens (105, divisible by neither 2 nor 4).
    SamplingCase("video-basic-euler-3x10x14", frames=3, height=10, width=14, seed=5),
    SamplingCase("video-cfg-dpmpp2m-3x10x14", guider="cfg", cfg=5.0, sampler="dpmpp_2m", frames=3, height=10, width=14, seed=6),
    SamplingCase("video-basic-euler-3x10x14-batch2", frames=3, height=10, width=14, batch=2, seed=7),
    SamplingCase("video-image-cfg-euler-3x10x14", guider="cfg", cfg=5.0, frames=3, height=10, width=14, seed=8, start_image=True),
    SamplingCase("video-basic-dpmpp2m-3x10x14-batch2", sampler="dpmpp_2m", frames=3, height=10, width=14, batch=2, seed=9),
    SamplingCase("video-cfg-dpmpp2m-3x10x14-padded-text", guider="cfg", cfg=5.0, sampler="dpmpp_2m", frames=3, height=10,
                 width=14, seed=10, padded_text=True),
    # Video models with 1x1 patches: 3 frames of 5x7 tokens.
    SamplingCase("video-image-cfg-euler-3x5x7", guider="cfg", cfg=5.0, frames=3, height=5, width=7, seed=11, start_image=True),
    SamplingCase("video-basic-dpmpp2m-3x5x7-batch2", sampler="dpmpp_2m", frames=3, height=5, width=7, batch=2, seed=12),
    SamplingCase("video-cfg-dpmpp2m-3x5x7-padded-text", guider="cfg", cfg=5.0, sampler="dpmpp_2m", frames=3, height=5,
                 width=7, seed=13, padded_text=True),
)
CASE_BY_NAME = {case.name: case for case in CASES}
# Which cases each tiny family runs: Flux all but the U-Net-sized one; Flux.2 (512 padded text tokens, slower) its
# uneven CFG case; the SD1.5 U-Net (CFG and data parallel only) one case that exercises both.
FAMILY_CASES: dict[str, tuple[str, ...]] = {
    "flux": tuple(c.name for c in CASES[:4]),
    "flux2": ("cfg-dpmpp2m-18x22",),
    "sd15": ("cfg-euler-10x12-batch2",),
    # SDXL's U-Net (cfg and data parallel only): the same case, its conds carrying a pooled vector and size conds.
    "sdxl": ("cfg-euler-10x12-batch2",),
    # SD3 (MMDiT) and SD3.5's dual-attention blocks: even and uneven grids, both guiders, both samplers, a batch.
    "sd3": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    "sd35": ("cfg-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    # Qwen-Image (hidden 3072 fixed by detection, ~0.4 s a forward here): euler and dpmpp_2m, basic and CFG, one
    # even and two uneven token grids (9x11 rows), batch 2 for data parallel.
    "qwen_image": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    # Qwen-Image's class built in-process with two blocks (PipeFusion stages), for the stale methods: the same cases.
    "qwen_image_stages": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    # Qwen-Image-Edit is Qwen-Image's model class given reference images: 99 image + 42 reference tokens.
    "qwen_image_edit": ("edit-cfg-euler-18x22-ref12x14",),
    # HiDream I1 (built in-process): basic and CFG, euler and dpmpp_2m, an even and an uneven grid (9x11 tokens), batch 2.
    "hidream": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    # Wan: odd frames and uneven token counts, both guiders, both samplers, a batch for data parallel; I2V and the
    # 2.2 TI2V 5B (per-frame timesteps) with their start image.
    "wan21": ("video-basic-euler-3x10x14", "video-cfg-dpmpp2m-3x10x14", "video-basic-euler-3x10x14-batch2"),
    "wan21_i2v": ("video-image-cfg-euler-3x10x14",),
    "wan22_5b": ("video-image-cfg-euler-3x10x14", "video-basic-dpmpp2m-3x10x14-batch2"),
    # Z-Image (built in-process; caption and image padded to multiples of 32 tokens): even and uneven grids (9x11
    # rows), both guiders, both samplers, batch 2 for data parallel. Lumina 2 (same class and hooks; width 2304 fixed
    # by detection, ~1 s a forward here; no padding, 8 key/value heads for 24 query heads): its uneven CFG case, whose
    # batched cond/uncond call data parallel splits too.
    "zimage": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    "lumina2": ("cfg-dpmpp2m-18x22",),
    # Flux.1 Kontext: the Flux dev model given a reference latent (ReferenceLatent), appended to the image tokens
    # with its own positions: 99 image + 42 reference tokens.
    "flux_kontext": ("edit-cfg-euler-18x22-ref12x14",),
    # Chroma (in-process, Flux-tiny width) and Chroma Radiance (pixels, 2 x 2 patches: 9 x 11 tokens at 18 x 22).
    "chroma": ("basic-euler", "cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    "chroma_radiance": ("cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2"),
    # HunyuanVideo 1.0 T2V (105 image tokens): both guiders and samplers, a padded (masked) prompt, batch 2 for data
    # parallel, and a start image the "v2 (replace)" way (guiding frame: per-token modulation of the first frame).
    # HunyuanVideo 1.5 (105 tokens at 1x1 patches; double blocks only): a start image with CLIP-vision tokens and ByT5
    # glyph tokens in front of the text, and batch 2 (stock 0.30.0 fails on a text mask beside glyph or vision tokens).
    "hunyuan_video": ("video-cfg-dpmpp2m-3x10x14-padded-text", "video-basic-euler-3x10x14-batch2", "video-image-cfg-euler-3x10x14"),
    "hunyuan_video15": ("video-image-cfg-euler-3x5x7", "video-basic-dpmpp2m-3x5x7-batch2"),
    # LTX-Video (105 tokens at 1x1x1 patches, 32 heads): a start image the LTXVImgToVideo way (per-token timesteps),
    # a padded (masked) prompt in cross-attention; cond and uncond share each call, which data parallel splits.
    "ltxv": ("video-image-cfg-euler-3x5x7", "video-cfg-dpmpp2m-3x5x7-padded-text"),
    # Mochi (built in-process; 105 tokens at 2x2 patches): a padded prompt (its text cropped to the unpadded tokens),
    # both guiders and samplers, batch 2.
    "mochi": ("video-cfg-dpmpp2m-3x10x14-padded-text", "video-basic-euler-3x10x14-batch2"),
    # CogVideoX 1.0 with RoPE (105 tokens at 2x2 patches; a v-prediction model): both guiders and samplers, batch 2.
    "cogvideox": ("video-cfg-dpmpp2m-3x10x14", "video-basic-euler-3x10x14-batch2"),
}
# The tiny file each entry runs (default: the one of its own name), or tiny_models.IN_PROCESS_PREFIX + a name for
# families built in-process (their detection fixes billions of parameters).
MODEL_FILE: dict[str, str] = {"qwen_image_edit": "qwen_image", "flux_kontext": "flux"}
MODEL_FILE["hidream"] = IN_PROCESS_PREFIX + "hidream"
MODEL_FILE["zimage"] = IN_PROCESS_PREFIX + "zimage"
MODEL_FILE["chroma"] = IN_PROCESS_PREFIX + "chroma"
MODEL_FILE["chroma_radiance"] = IN_PROCESS_PREFIX + "chroma_radiance"
MODEL_FILE["mochi"] = IN_PROCESS_PREFIX + "mochi"
MODEL_FILE["qwen_image_stages"] = IN_PROCESS_PREFIX + "qwen_image_stages"
# Quantized checkpoints (tiny_quant.py): the tiny Flux dev written in each quant format ComfyUI 0.30.0 loads (the
# older scaled-fp8 layout, every mixed-precision format with per-layer configs, one with its layer list in the file's
# header), and the tiny Flux dev loaded with each fp8 weight_dtype UNETLoader offers. They run Flux's hooks, so two
# cases (uneven grid with CFG, batch 2) cover them; they share one launch per world (SHARED_LAUNCH). Not here:
# int8_tensorwise and convrot_w4a4 (quantized.ACTIVATION_LAYOUT_DEPENDENT), whose stock results depend on the batch
# and memory layout of each layer's input, which no split of the work keeps.
QUANT_FILE: dict[str, str] = {"flux_scaled_fp8": "scaled_fp8",
                              **{f"flux_{f}": f for f in MIXED_FORMATS if f not in ("int8_tensorwise", "convrot_w4a4")},
                              "flux_header_mxfp8": "metadata:mxfp8"}
WEIGHT_DTYPE: dict[str, str] = {f"flux_{d}": d for d in ("fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")}
SHARED_LAUNCH: dict[str, str] = {variant: "flux_quantized" for variant in (*QUANT_FILE, *WEIGHT_DTYPE)}
for _variant in SHARED_LAUNCH:
    FAMILY_CASES[_variant] = ("cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2")
    MODEL_FILE.setdefault(_variant, "flux")
# Another family's hooks on a quantized file: SD3.5 Medium's layout (MMDiT, dual attention) in scaled fp8.
QUANT_FILE["sd35_scaled_fp8"] = "scaled_fp8"
MODEL_FILE["sd35_scaled_fp8"] = "sd35"
FAMILY_CASES["sd35_scaled_fp8"] = ("cfg-dpmpp2m-18x22", "basic-dpmpp2m-18x22-batch2")
# The stale-activation methods run every step synchronously in these tests: that is where they are exact. Each
# also samples its family's first case at the sampler's defaults (one warmup step, then stale keys/values) once:
# approximate, its error against stock is reported.
FULL_WARMUP = {"warmup_steps": 10_000}
DEFAULT_STALE_OPTIONS: dict = {}


def model_spec(family: str, tiny_flux_paths: dict, tiny_model_path) -> str:
    """What family_rank loads for `family`: its tiny file (written by the session fixtures) or its in-process name."""
    name = MODEL_FILE.get(family, family)
    if family in QUANT_FILE:  # written from the session's tiny file of its family, beside it
        source = tiny_flux_paths["dev"] if name == "flux" else tiny_model_path(name)
        path = source.with_name(f"{family}.safetensors")
        return str(path if path.exists() else quantize_file(source, path, QUANT_FILE[family]))
    if name.startswith(IN_PROCESS_PREFIX):
        return name
    # The session's tiny Flux dev file (tiny_flux_paths) serves every entry that runs Flux.1.
    return str(tiny_flux_paths["dev"] if name == "flux" else tiny_model_path(name))


def with_stale_options(model_patcher, options: dict):
    """A clone of `model_patcher` carrying the sampler node's stale options (stale_steps.OPTIONS_KEY), as a worker's does."""
    from comfyui_xdit.stale_steps import OPTIONS_KEY

    model = model_patcher.clone()
    model.model_options["transformer_options"] = {**model.model_options.get("transformer_options", {}), OPTIONS_KEY: dict(options)}
    return model


def _conditioning(seed: int, widths: tuple[int, int] = (64, 32), reference: torch.Tensor | None = None, extra: dict | None = None):
    """Seeded stand-in conditioning of these (text, pooled) widths (the tiny Flux's by default), with `extra` keys."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    context_dim, pooled_dim = widths
    conditioning = stand_in_conditioning(seed, TEXT_TOKENS, context_dim=context_dim, pooled_dim=pooled_dim)
    conditioning[0][1].update(extra or {})
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


def _extra_conditioning(base_model, seed: int) -> dict:
    """Conditioning keys a family's text encoders add beyond text and pooled vector: HiDream's per-layer Llama
    hidden states (batch, layers, tokens, width), as many layers as its llama_layers reads."""
    import comfy.model_base

    if isinstance(base_model, comfy.model_base.GenmoMochi):  # T5's padding mask: its forward needs one
        return {"attention_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long)}
    if isinstance(base_model, comfy.model_base.LTXV):  # T5's padding mask (its forward needs one) and LTXVConditioning's
        return {"attention_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long), "frame_rate": 24.0}  # frame rate
    if isinstance(base_model, comfy.model_base.HunyuanVideo15):  # ByT5 glyph tokens (a length of their own)
        return {"conditioning_byt5small": torch.randn(1, 3, 1472, generator=torch.Generator().manual_seed(seed + 1))}
    if not isinstance(base_model, comfy.model_base.HiDream):
        return {}
    unet_config = base_model.model_config.unet_config
    shape = (1, max(unet_config["llama_layers"]) + 1, LLAMA_TOKENS, unet_config["caption_channels"][1])
    return {"conditioning_llama3": torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))}


def _with_start_image(base_model, case: SamplingCase, latent: dict, positive, negative):
    """Latent and conds as the family's image-to-video node leaves them for a start image (seeded stand-ins of its
    VAE-encoded first frame and CLIP-vision output): Wan 2.2's Wan22ImageToVideoLatent puts the frame into the latent
    and masks it from denoising; Wan 2.1's WanImageToVideo gives it to every cond as a concat latent with a mask."""
    import comfy.clip_vision
    import comfy.model_base
    import node_helpers

    generator = torch.Generator().manual_seed(400 + case.seed)
    samples = latent["samples"]
    first = torch.randn(1, samples.shape[1], 1, *samples.shape[-2:], generator=generator)
    mask = torch.ones(samples.shape[0], 1, *samples.shape[2:])
    mask[:, :, :1] = 0.0
    if isinstance(base_model, comfy.model_base.LTXV):  # LTXVImgToVideo at strength 0.85: a per-frame denoise mask
        image = samples.clone()
        image[:, :, :1] = first
        frames_mask = torch.ones(samples.shape[0], 1, samples.shape[2], 1, 1)
        frames_mask[:, :, :1] = 1.0 - 0.85
        return {"samples": image, "noise_mask": frames_mask}, positive, negative
    if isinstance(base_model, comfy.model_base.HunyuanVideo15):  # HunyuanVideo15ImageToVideo with a CLIP-vision output
        clip_vision_output = comfy.clip_vision.Output()
        clip_vision_output.last_hidden_state = torch.randn(1, 9, 1152, generator=generator)
        concat = torch.zeros(samples.shape[0], samples.shape[1], *samples.shape[2:])
        concat[:, :, :1] = first
        values = {"concat_latent_image": concat, "concat_mask": mask[:1], "clip_vision_output": clip_vision_output}
        return latent, *(node_helpers.conditioning_set_values(c, values) if c is not None else None for c in (positive, negative))
    if isinstance(base_model, comfy.model_base.HunyuanVideo):  # HunyuanImageToVideo "v2 (replace)": a guiding frame
        image = samples.clone()
        image[:, :, :1] = first
        return {"samples": image, "noise_mask": mask[:1]}, node_helpers.conditioning_set_values(positive, {"guiding_frame_index": 0}), negative
    if isinstance(base_model, comfy.model_base.WAN22):
        image = samples.clone()
        image[:, :, :1] = first
        image = base_model.latent_format.process_out(image) * mask + image * (1.0 - mask)
        return {"samples": image, "noise_mask": mask}, positive, negative
    concat = torch.cat([first, torch.randn(1, samples.shape[1], samples.shape[2] - 1, *samples.shape[-2:], generator=generator)], dim=2)
    values = {"concat_latent_image": concat, "concat_mask": mask[:1]}
    if base_model.diffusion_model.img_emb is not None:
        clip_vision_output = comfy.clip_vision.Output()
        clip_vision_output.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=generator)
        values["clip_vision_output"] = clip_vision_output
    return latent, *(node_helpers.conditioning_set_values(c, values) if c is not None else None for c in (positive, negative))


def _first(node_output):
    return node_output.result[0] if hasattr(node_output, "result") else node_output[0]


def sample(model_patcher, case: SamplingCase) -> torch.Tensor:
    """The latent SamplerCustomAdvanced returns for `case`, built with ComfyUI's stock nodes."""
    import comfy.model_base
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_lt import ModelSamplingLTXV
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow, ModelSamplingFlux, ModelSamplingSD3

    base_model = model_patcher.model
    widths = conditioning_widths(base_model)
    model = model_patcher
    if isinstance(base_model, comfy.model_base.QwenImage):  # ComfyUI's Qwen-Image workflows shift with this node
        model = ModelSamplingAuraFlow().patch_aura(model_patcher, 3.1)[0]
    elif isinstance(base_model, comfy.model_base.Lumina2):  # as ComfyUI's Z-Image Turbo template (Lumina 2's config says 6)
        model = ModelSamplingAuraFlow().patch_aura(model_patcher, 3.0)[0]
    elif isinstance(base_model, comfy.model_base.LTXV):  # ComfyUI's LTXV templates shift by token count (default latent)
        model = _first(ModelSamplingLTXV.execute(model_patcher, 2.05, 0.95))
    elif isinstance(base_model, comfy.model_base.Chroma):  # ComfyUI's Chroma graphs sample with the model's own shift
        pass
    elif base_model.model_type == comfy.model_base.ModelType.FLUX:
        model = ModelSamplingFlux().patch(model_patcher, 1.15, 0.5, case.width * 8, case.height * 8)[0]
    elif isinstance(base_model, comfy.model_base.SD3):  # a shift other than the config's 3.0, as SD3.5 graphs set it
        model = ModelSamplingSD3().patch(model_patcher, 2.5)[0]
    elif isinstance(base_model, comfy.model_base.HiDream):  # ComfyUI's HiDream I1 workflows (Full, Fast) shift by 3.0
        model = ModelSamplingSD3().patch(model_patcher, 3.0)[0]
    elif isinstance(base_model, comfy.model_base.WAN21):  # ComfyUI's Wan templates: shift 8 (2.1), 5 (2.2 5B)
        model = ModelSamplingSD3().patch(model_patcher, 5.0 if isinstance(base_model, comfy.model_base.WAN22) else 8.0)[0]
    reference = _reference_latent(base_model, case)
    positive = _conditioning(100, widths, reference, _extra_conditioning(base_model, 100))
    negative = _conditioning(200, widths, reference, _extra_conditioning(base_model, 200)) if case.guider == "cfg" else None
    frames = () if case.frames is None else (case.frames,)
    latent = {"samples": torch.zeros(case.batch, base_model.latent_format.latent_channels, *frames, case.height, case.width)}
    if case.start_image:
        latent, positive, negative = _with_start_image(base_model, case, latent, positive, negative)
    if case.padded_text:  # the text encoder's mask of a prompt whose last two tokens are padding
        import node_helpers

        mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
        mask[:, -2:] = 0
        positive = node_helpers.conditioning_set_values(positive, {"attention_mask": mask})
    if case.guider == "cfg":
        guider = _first(custom.CFGGuider.execute(model, positive, negative, case.cfg))
    else:
        guider = _first(custom.BasicGuider.execute(model, positive))
    sigmas = _first(custom.BasicScheduler.execute(model, "simple", case.steps, 1.0))
    sampler = _first(custom.KSamplerSelect.execute(case.sampler))
    noise = _first(custom.RandomNoise.execute(case.seed))
    return _first(custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent))["samples"]


def family_rank(rank: int, world_size: int, model_spec: str, configs: list[dict], case_dicts: list[dict],
                device: str = "cpu", weight_dtype: str = "default") -> dict:
    """Parallel latents of every (config, case) on this rank; rank 0 adds the stock latents and re-checks them.
    device "cuda": ComfyUI runs on this rank's CUDA device (local_launch sets it), for NCCL ranks."""
    init_worker(cpu=(device == "cpu"))
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.stale_forwards import LOOKAHEAD_ATTACHMENT
    from comfyui_xdit.weight_sharding import sharded_blocks
    from parallel_core import ParallelConfig, init_parallel
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cases = [SamplingCase(**c) for c in case_dicts]
    base = load_tiny_model(model_spec, weight_dtype)
    # On AVX2 CPUs oneDNN picks its convolution algorithm by batch size, so a U-Net whose batch CFG or data parallel
    # splits differs from stock by kernel choice alone: 2.6e-6 of the latent's max on the tiny SD1.5 U-Net on an AVX2
    # EPYC (over the 2e-6 bound; the machines this suite ran on before stayed under it). PyTorch's own convolution treats every sample alike
    # whatever the batch: with it on both sides the comparison sees what the parallel methods change (1.0e-6 there).
    unet = isinstance(base.model.diffusion_model, UNetModel)
    with torch.backends.mkldnn.flags(enabled=not unet):
        result: dict = {"parallel": {}, "bytes": {}, "after_warmup": {}, "lookahead": {}, "without_lookahead": {},
                        "block_weights": block_weights(base.model.diffusion_model)}
        if rank == 0:
            result["stock"] = {case.name: sample(base, case) for case in cases}
            if any(splits_the_batch(degrees) for degrees in configs):
                one_item = one_item_calls(base)
                result["stock_one_item_calls"] = {case.name: sample(one_item, case) for case in cases}
        sharded = None  # the model with weight_sharding "blocks", loaded once for every config that asks for it
        for degrees in configs:
            config = {k: v for k, v in degrees.items() if k != "weight_sharding"}
            state = init_parallel(ParallelConfig(**config))
            if degrees.get("weight_sharding", "none") == "blocks" and sharded is None:
                sharded = sharded_model(model_spec)
                result["sharded"] = {"resident": sharded_blocks(sharded).resident_bytes(), "whole": sharded_blocks(sharded).block_bytes()}
            model = parallelize(sharded if "weight_sharding" in degrees else base, state)
            if state.config.patch_degree > 1 or state.config.pipefusion_degree > 1:
                key = f"{tag(degrees)}/{cases[0].name}"
                lookahead = model.get_attachment(LOOKAHEAD_ATTACHMENT)
                result["after_warmup"][key] = sample(with_stale_options(model, DEFAULT_STALE_OPTIONS), cases[0])
                if lookahead is not None:  # PipeFusion: its lookahead (used, missed), and the same run without it
                    result["lookahead"][key] = (lookahead.used, lookahead.missed)
                    result["without_lookahead"][key] = sample(with_stale_options(model, {"lookahead": False}), cases[0])
                model = with_stale_options(model, FULL_WARMUP)
            for case in cases:
                state.comm.reset()
                result["parallel"][f"{tag(degrees)}/{case.name}"] = sample(model, case)
                result["bytes"][f"{tag(degrees)}/{case.name}"] = state.comm.snapshot()
        if rank == 0:
            # The unpatched ModelPatcher, used again after the parallel clones, is stock again, bit for bit.
            result["stock_again"] = {case.name: sample(base, case) for case in cases}
    return result


def bf16_lookahead_rank(rank: int, world_size: int, model_spec: str, case_dict: dict) -> dict:
    """PipeFusion over 2 stages, one case sampled with and without lookahead, the model held and run in bf16 as
    ComfyUI runs it on a GPU. Mock: ComfyUI computes in bf16 only on devices it trusts with it, never on a CPU, so
    its should_use_bf16 answers yes here; the choices after that (weights, inference dtype, casts) are ComfyUI's own
    (a model built in-process is built in bf16 likewise)."""
    init_worker(cpu=True)
    import comfy.model_management

    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.stale_forwards import LOOKAHEAD_ATTACHMENT
    from parallel_core import ParallelConfig, init_parallel

    comfy.model_management.should_use_bf16 = lambda *args, **kwargs: True
    base = load_tiny_model(model_spec, in_process_dtype=torch.bfloat16)
    model = parallelize(base, init_parallel(ParallelConfig(pipefusion_degree=2)))
    lookahead = model.get_attachment(LOOKAHEAD_ATTACHMENT)
    case = SamplingCase(**case_dict)
    with_lookahead = sample(with_stale_options(model, DEFAULT_STALE_OPTIONS), case)
    used_missed = (lookahead.used, lookahead.missed)
    without = sample(with_stale_options(model, {**DEFAULT_STALE_OPTIONS, "lookahead": False}), case)
    return {"inference_dtype": str(base.model.get_dtype_inference()), "with": with_lookahead, "without": without,
            "lookahead": used_missed}


def one_item_calls(model_patcher):
    """A clone of the stock model whose every model call runs stock's own code on one batch item at a time.

    CPU BLAS and oneDNN choose kernels by shape (MKL's sgemm by row count, oneDNN's convolution by batch size), so
    stock ComfyUI itself rounds differently when a call's batch is smaller, as it is on every rank of CFG and data
    parallel. Sampling with this clone measures how much on this CPU (0 where the kernels are batch-invariant)."""
    import torch

    def item_of(value, i: int, batch: int):
        # Model inputs batched like x: tensors, lists of them (Qwen-Image-Edit's ref_latents) and the per-item sigmas
        # in transformer_options; anything else (one row shared by every item, flags) is passed as it is.
        if isinstance(value, torch.Tensor):
            return value[i:i + 1] if value.shape[:1] == (batch,) else value
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(item_of(v, i, batch) for v in value)
        if isinstance(value, dict) and isinstance(value.get("sigmas"), torch.Tensor):
            return {**value, "sigmas": item_of(value["sigmas"], i, batch)}
        return value

    def per_item(apply_model, args):
        x, timestep, c = args["input"], args["timestep"], args["c"]
        items = [apply_model(x[i:i + 1], timestep[i:i + 1], **{k: item_of(v, i, x.shape[0]) for k, v in c.items()})
                 for i in range(x.shape[0])]
        return torch.cat(items)

    clone = model_patcher.clone()
    clone.set_model_unet_function_wrapper(per_item)
    return clone


def sharded_model(model_spec: str):
    """The tiny model with its blocks sharded over every rank: a file is read in pieces (as the pool loads it), a
    model built in-process is sharded after loading."""
    from comfyui_xdit.weight_sharding import load_sharded, shard_loaded, world_group

    if model_spec.startswith(IN_PROCESS_PREFIX):
        return shard_loaded(load_tiny_model(model_spec), world_group())
    return load_sharded(model_spec, "default", world_group())


def models_rank(rank: int, world_size: int, loads: list[tuple[str, str]], configs: list[dict], case_dicts: list[dict]) -> list[dict]:
    """family_rank for each (model spec, weight_dtype) of `loads` in turn, in one launch."""
    return [family_rank(rank, world_size, spec, configs, case_dicts, weight_dtype=weight_dtype) for spec, weight_dtype in loads]


# The exact methods each family is checked with, by world size. "weight_sharding": "blocks" in a config runs it on
# the model whose blocks are sharded over every rank (weight_sharding.py).
CONFIGS: dict[str, dict[int, list[dict]]] = {
    "flux": {
        2: [
            {"ulysses_degree": 2},
            {"ring_degree": 2},
            {"cfg_degree": 2},
            {"data_degree": 2},
            {"ulysses_degree": 2, "weight_sharding": "blocks"},
            {"ring_degree": 2, "weight_sharding": "blocks"},
            {"cfg_degree": 2, "weight_sharding": "blocks"},
            {"data_degree": 2, "weight_sharding": "blocks"},
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
            {"ulysses_degree": 2, "ring_degree": 2, "weight_sharding": "blocks"},
            {"cfg_degree": 2, "data_degree": 2, "weight_sharding": "blocks"},
            # Two of the four cfg ranks own no cond under CFGGuider: they still gather every block with the others.
            {"cfg_degree": 4, "weight_sharding": "blocks"},
        ],
    },
    "flux2": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"pipefusion_degree": 2}, {"patch_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}, {"patch_degree": 2, "cfg_degree": 2}],
    },
    "sd15": {2: [{"cfg_degree": 2}, {"data_degree": 2}]},
    "sdxl": {2: [{"cfg_degree": 2}, {"data_degree": 2}], 4: [{"cfg_degree": 2, "data_degree": 2}]},
    # SD3 at world 2 (also PipeFusion and patch parallel, which SD3.5's dual-attention blocks refuse; PipeFusion x
    # Ring at world 4); SD3.5 (the same hooks plus its dual-attention blocks) also at world 4.
    "sd3": {2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}, {"pipefusion_degree": 2},
                {"patch_degree": 2}],
            4: [{"pipefusion_degree": 2, "ring_degree": 2}]},
    "sd35": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}],
    },
    "qwen_image": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ring_degree": 2, "cfg_degree": 2}],
    },
    # PipeFusion (two stages of one block) and displaced patch parallel through Qwen-Image's token-level call
    # (families/qwen_image.py); PipeFusion x Ulysses at world 4. Reference images are refused for both (test_flux_parallel).
    "qwen_image_stages": {
        2: [{"pipefusion_degree": 2}, {"patch_degree": 2}],
        4: [{"pipefusion_degree": 2, "ulysses_degree": 2}],
    },
    # Data parallel refuses per-sample reference lists (parallel_glue), so it is not among these.
    "qwen_image_edit": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}],
    },
    # Displaced patch parallel shares the reference tokens out with the image rows (exact at full warmup);
    # PipeFusion refuses reference latents (test_flux_parallel).
    "flux_kontext": {
        2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"patch_degree": 2}],
        4: [{"ulysses_degree": 2, "ring_degree": 2}, {"patch_degree": 2, "cfg_degree": 2}],
    },
}
_VIDEO_CONFIGS: dict[int, list[dict]] = {
    2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}],
    4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}],
}
# One set of hooks serves every Wan: the world-4 combinations run on Wan 2.2's TI2V 5B (per-frame timesteps, start
# image), Wan 2.1 T2V and I2V at world 2 (CI time on two cores).
CONFIGS.update({"wan21": {2: _VIDEO_CONFIGS[2]}, "wan21_i2v": {2: _VIDEO_CONFIGS[2]}, "wan22_5b": _VIDEO_CONFIGS})
# One set of hooks serves HunyuanVideo 1.0 and 1.5: the world-4 combination on 1.0, 1.5 at world 2.
CONFIGS.update({"hunyuan_video": {2: _VIDEO_CONFIGS[2], 4: _VIDEO_CONFIGS[4][:1]}, "hunyuan_video15": {2: _VIDEO_CONFIGS[2]}})
# LTXV, Mochi and CogVideoX at world 2 (CI time on two cores): their hooks shard rows the way the HunyuanVideo and Wan
# hooks do, whose world-4 runs cover ulysses x ring and ulysses x cfg.
CONFIGS.update({"ltxv": {2: _VIDEO_CONFIGS[2]}, "mochi": {2: _VIDEO_CONFIGS[2]}, "cogvideox": {2: _VIDEO_CONFIGS[2]}})
# Mochi shards its text into [valid, T5 padding] pieces of its own (families/mochi.py): ulysses x ring, and Ulysses and
# Ring alone, at world 4, where its 5 valid prompt tokens leave one rank only padding.
CONFIGS["mochi"][4] = [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 4}, {"ring_degree": 4}]
# Weight sharding on another family's blocks (Wan's, read from the file in pieces) and on a model built in-process (Chroma).
CONFIGS["wan22_5b"] = {2: [*_VIDEO_CONFIGS[2], {"ulysses_degree": 2, "weight_sharding": "blocks"}],
                       4: [*_VIDEO_CONFIGS[4], {"ulysses_degree": 2, "cfg_degree": 2, "weight_sharding": "blocks"}]}
CONFIGS["hidream"] = CONFIGS["zimage"] = {
    2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}],
    4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}],
}
# Lumina 2 runs Z-Image's hooks (one class) at the width detection fixes (1.7 GB, ~1 s a forward here): world 2 only;
# Z-Image covers the world-4 combinations of the same code.
CONFIGS["lumina2"] = {2: CONFIGS["zimage"][2]}
# Chroma Radiance runs Chroma's hooks plus its pixel patchifier: world 2 (Chroma covers world 4).
# Chroma also takes PipeFusion and displaced patch parallel (Flux's stale_forwards code on its own forward), and weight
# sharding on a model built in-process.
CONFIGS["chroma"] = {2: [*CONFIGS["qwen_image"][2], {"pipefusion_degree": 2}, {"patch_degree": 2}, {"ring_degree": 2, "weight_sharding": "blocks"}],
                     4: [*CONFIGS["qwen_image"][4], {"pipefusion_degree": 2, "ulysses_degree": 2}]}
CONFIGS["chroma_radiance"] = {2: CONFIGS["qwen_image"][2]}
for _variant in SHARED_LAUNCH:
    CONFIGS[_variant] = {2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}]}
CONFIGS["sd35_scaled_fp8"] = {2: CONFIGS["flux_scaled_fp8"][2]}
CONFIGS["flux_scaled_fp8"][4] = [{"ulysses_degree": 2, "ring_degree": 2}, {"ring_degree": 2, "cfg_degree": 2},
                                 {"cfg_degree": 2, "data_degree": 2}]
FP32_TOL = 1e-5
# CFG multiplies the difference of two predictions by the guidance scale, and EPS models' latents reach ~15: there
# the bound is relative to the latent's size.
RELATIVE_TOL = 2e-6
# The most that stock's own result may move, relative to the latent's max, when its model calls run one batch item at
# a time (one_item_calls): 2.6e-5 measured (CogVideoX, sigma_max 4519, AVX2 kernels); more means the split is wrong.
KERNEL_CHOICE_LIMIT = 1e-4


def splits_the_batch(degrees: dict) -> bool:
    """Whether a rank's model calls hold fewer batch items than stock's (CFG and data parallel)."""
    return degrees.get("cfg_degree", 1) > 1 or degrees.get("data_degree", 1) > 1


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
            if splits_the_batch(degrees):  # plus twice what stock itself moves by with smaller batches (one_item_calls)
                stock_moves = (per_rank[0]["stock_one_item_calls"][name] - reference).abs().max().item()
                if not stock_moves <= KERNEL_CHOICE_LIMIT * reference.abs().max().item():  # a broken reference, not rounding
                    failures.append(f"{name}: stock with one-item calls moves by {stock_moves:.2e}, more than kernel choice can")
                tolerance += 2 * stock_moves
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
