"""The family-adapter registry: which parallel methods each ComfyUI model class takes, and the code that does it.

An adapter is declared as data (name, capabilities, where the model keeps its head count and patch size, how text
joins image attention, which module lists hold its blocks) plus the import path of its `parallelize` hook (and,
where the module has one, its `refuse_inputs` check of a job's conditioning), imported only when a model of that
family is parallelised or sampled. Registrations name `comfy.model_base` classes as
strings, so a ComfyUI without one of them still loads the pack (the entry just never matches).

`adapter_for` walks the model's class hierarchy from the most derived class up: an exact registration wins; a
registration of a base class applies to subclasses only if it says so (Flux does not: Flux.2, LongCat-Image and
Chroma subclass it with different forwards). BaseModel's entry is the generic fallback every model reaches:
CFG and data parallel, which need nothing from the model's internals.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from parallel_core import ParallelConfig, ParallelState

from ..block_stages import RemoteBlock
from ..degrees import DEGREE_TOOLTIPS
from ..errors import UnsupportedByXDiT

JointLayout = Literal["front", "rear", "cross", "none"]


@dataclass(frozen=True)
class Capabilities:
    """Which parallel dimensions (degrees.DEGREE_TOOLTIPS, in its order) a family takes."""

    ulysses: bool = False
    ring: bool = False
    cfg: bool = True
    pipefusion: bool = False
    patch: bool = False
    data: bool = True

    def supported(self) -> tuple[str, ...]:
        return tuple(d for d in DIMENSIONS_IN_ORDER if getattr(self, d))

    def describe(self) -> str:
        names = self.supported()
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# Degrees are named in the loader's order, in messages as in its inputs (parallel_core's DIMENSIONS is the rank layout's).
DIMENSIONS_IN_ORDER: tuple[str, ...] = tuple(DEGREE_TOOLTIPS)
if tuple(f.name for f in fields(Capabilities)) != DIMENSIONS_IN_ORDER:
    raise ImportError(f"Capabilities must name the loader's degrees {DIMENSIONS_IN_ORDER}, in order")

@dataclass(frozen=True)
class BlockCompute:
    """How PipeFusion models the compute of a family's blocks to cut its stages (block_stages.py). The blocks' linear
    layers are read from their shapes; the adapter says which tokens each runs on and how wide the attention is."""

    # (name prefix of linear layers inside a block, the tokens they run on: "image", "text", or "one" per sample for
    # modulation), first match wins; the other linear layers run on every token (a joint stream).
    streams: tuple[tuple[str, str], ...] = ()
    width_attribute: str = "hidden_size"  # the diffusion model's attribute holding its attention width (heads x head dim)
    # Image and text tokens of a typical job (a 1024x1024 image): stages are cut when the model loads, before any
    # job's size is known.
    reference_tokens: tuple[int, int] = (4096, 512)


EVERY_METHOD = Capabilities(ulysses=True, ring=True, cfg=True, data=True, pipefusion=True, patch=True)
CFG_AND_DATA = Capabilities()


def _attribute_step(obj: Any, name: str) -> Any:
    if name != "*":
        return getattr(obj, name)
    return next(block for block in obj if not isinstance(block, RemoteBlock))


@dataclass(frozen=True)
class FamilyAdapter:
    """One model family: what it supports, read from data, and the module whose `parallelize` does the work."""

    name: str | None  # None: the name of the model's ComfyUI config class, e.g. SDXL (the generic fallback)
    capabilities: Capabilities
    hooks: str | None = None  # module with parallelize(model_patcher, state, adapter); None: nothing to patch
    # The diffusion model's attribute (a dotted path) holding its attention head count; a "*" step is the first block
    # of a module list that this rank holds (a PipeFusion stage holds stand-ins for the others' blocks).
    heads_attribute: str | None = None
    patch_attribute: str | None = None  # ... and its patch size (latent pixels per token, each way)
    joint_attention: JointLayout = "none"  # where text tokens sit in the image's attention
    block_containers: tuple[str, ...] = ()  # module lists holding the blocks, in execution order
    limits: str = ""  # why capabilities are narrower than the architecture would allow, for the refusal
    config_names: tuple[tuple[str, str], ...] = ()  # (supported_models config class, name): families sharing a model class
    block_compute: BlockCompute | None = None  # how PipeFusion models its blocks' compute; required with pipefusion

    def family_name(self, model: torch.nn.Module) -> str:
        # SD1.5 and many others share comfy.model_base.BaseModel; their supported_models config class names them.
        config = type(getattr(model, "model_config", model)).__name__
        return dict(self.config_names).get(config) or self.name or config

    def num_heads(self, diffusion_model: torch.nn.Module) -> int | None:
        """Attention heads as the model was built with them; None if the family shards no attention."""
        if self.heads_attribute is None:
            return None
        heads = functools.reduce(_attribute_step, self.heads_attribute.split("."), diffusion_model)
        if not isinstance(heads, int) or heads < 1:
            raise UnsupportedByXDiT(f"{type(diffusion_model).__name__}.{self.heads_attribute} is {heads!r}, not a head count")
        return heads

    def token_rows(self, diffusion_model: torch.nn.Module, latent_height: int) -> int:
        """Rows of image tokens for a latent this many rows high (the model pads to whole patches)."""
        patch = getattr(diffusion_model, self.patch_attribute) if self.patch_attribute else 1
        return -(-latent_height // patch)

    def parallelize(self, model_patcher: Any, state: ParallelState) -> Any:
        """A clone of `model_patcher` whose diffusion model computes over `state`'s sequence/patch/stage groups."""
        if self.hooks is None:
            return model_patcher.clone()
        return importlib.import_module(self.hooks).parallelize(model_patcher, state, self)

    def refuse_inputs(self, model: torch.nn.Module, conds: dict[str, list[dict]], model_name: str) -> None:
        """Raise before any work starts if the sampler's conditioning (a guider's original_conds) lacks an input this
        model needs: the hooks module's `refuse_inputs(model, conds, family, model_name)`, where it has one."""
        check = getattr(importlib.import_module(self.hooks), "refuse_inputs", None) if self.hooks else None
        if check is not None:
            check(model, conds, self.family_name(model), model_name)

    def refuse_unsupported(self, config: ParallelConfig, model: torch.nn.Module) -> None:
        """Raise, naming the family and what it takes, if `config` uses a dimension this family does not."""
        unsupported = [d for d in DIMENSIONS_IN_ORDER if config.degree(d) > 1 and not getattr(self.capabilities, d)]
        if unsupported:
            why = f" ({self.limits})" if self.limits else ""
            raise UnsupportedByXDiT(f"{self.family_name(model)} supports {self.capabilities.describe()} parallel only{why}; "
                                    f"set {'/'.join(f'{d}_degree' for d in unsupported)} to 1")


@dataclass(frozen=True)
class _Registration:
    model_class: str  # a class name in comfy.model_base
    adapter: FamilyAdapter
    covers_subclasses: bool


_REGISTRY: dict[str, _Registration] = {}


def register(model_class: str, adapter: FamilyAdapter, covers_subclasses: bool = False) -> None:
    """Serve models of comfy.model_base.<model_class> with `adapter` (and its subclasses, if `covers_subclasses`)."""
    if model_class in _REGISTRY:
        raise ValueError(f"{model_class} already has an adapter ({_REGISTRY[model_class].adapter.name})")
    if adapter.capabilities.pipefusion and adapter.block_compute is None:
        raise ValueError(f"{adapter.name} takes PipeFusion but its adapter has no block_compute to cut stages by")
    _REGISTRY[model_class] = _Registration(model_class, adapter, covers_subclasses)


def registered(model_class: str) -> FamilyAdapter:
    """The adapter registered for comfy.model_base.<model_class> by name (for tools that build a bare diffusion model)."""
    return _REGISTRY[model_class].adapter


def adapter_for(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter of a ComfyUI model (comfy.model_base.BaseModel instance), most derived registration first."""
    import comfy.model_base

    for depth, cls in enumerate(type(model).__mro__):
        entry = _REGISTRY.get(cls.__name__)
        # By name, but only ComfyUI's own class of that name: a class that is missing from this ComfyUI is skipped.
        if entry is None or getattr(comfy.model_base, cls.__name__, None) is not cls:
            continue
        if depth == 0 or entry.covers_subclasses:
            return entry.adapter
    raise UnsupportedByXDiT(f"{type(model).__name__} is not a ComfyUI diffusion model (comfy.model_base.BaseModel); load it with UNETLoader")


# Flux-style blocks: double blocks keep image and text streams apart (img_*/txt_*), each with a modulation of the
# vector (Flux.1); single blocks run one joint stream with its modulation. T5 text: 512 tokens.
_FLUX_COMPUTE = BlockCompute(streams=(("img_mod", "one"), ("txt_mod", "one"), ("modulation", "one"), ("img_", "image"), ("txt_", "text")))
_FLUX_LAYOUT: dict[str, Any] = dict(
    hooks="comfyui_xdit.families.flux", heads_attribute="num_heads", patch_attribute="patch_size", joint_attention="front",
    block_containers=("double_blocks", "single_blocks"), block_compute=_FLUX_COMPUTE,
)
register("BaseModel", FamilyAdapter(None, CFG_AND_DATA, limits="no sequence-parallel adapter for this model yet"), covers_subclasses=True)
register("Flux", FamilyAdapter("Flux", EVERY_METHOD, **_FLUX_LAYOUT))
# Flux.2 runs Flux.1's model class with patch 1, 128 latent channels and global modulation: the same hooks apply
# (its positions have a fourth axis; rows are still axis 1, as PipeFusion's bands need).
register("Flux2", FamilyAdapter("Flux.2", EVERY_METHOD, **_FLUX_LAYOUT))
# Qwen-Image keeps its head count on each block's attention (the first block this PipeFusion stage holds); its joint
# attention puts text in front, as Flux's does. Its blocks are double-stream: img_*/txt_* layers and modulations, and
# an attention with image projections (to_q/k/v, to_out) and text ones (add_*_proj, to_add_out); a few hundred
# Qwen 2.5 VL text tokens.
register("QwenImage", FamilyAdapter(
    "Qwen-Image", EVERY_METHOD, hooks="comfyui_xdit.families.qwen_image",
    heads_attribute="transformer_blocks.*.attn.heads", patch_attribute="patch_size", joint_attention="front",
    block_containers=("transformer_blocks",),
    block_compute=BlockCompute(streams=(("img_mod", "one"), ("txt_mod", "one"), ("img_", "image"), ("txt_", "text"),
                                        ("attn.add_", "text"), ("attn.to_add_out", "text"), ("attn.to_", "image")),
                               width_attribute="inner_dim", reference_tokens=(4096, 256))))
register("LongCatImage", FamilyAdapter(
    "LongCat-Image", CFG_AND_DATA, limits="its shifted RoPE positions are not tested with sequence parallel yet"))
# SD3 and SD3.5 share one class (ComfyUI's MMDiT); SD3.5's dual-attention blocks run through the same hooks.
# PipeFusion and patch parallel: SD3 and SD3.5 Large; SD3.5 Medium's dual-attention blocks are refused by its hooks.
# Its joint blocks: an image stream (x_block) and a text stream (context_block, 77 CLIP + 77 T5 tokens), each modulated.
register("SD3", FamilyAdapter(
    "SD3", EVERY_METHOD, hooks="comfyui_xdit.families.sd3",
    heads_attribute="num_heads", patch_attribute="patch_size", joint_attention="front", block_containers=("joint_blocks",),
    block_compute=BlockCompute(streams=(("x_block.adaLN_modulation", "one"), ("context_block.adaLN_modulation", "one"),
                                        ("x_block", "image"), ("context_block", "text")), reference_tokens=(4096, 154))))
# HiDream I1 puts text (T5 and Llama pieces) behind the image in its joint attention; its hooks shard both.
register("HiDream", FamilyAdapter(
    "HiDream", Capabilities(ulysses=True, ring=True, cfg=True, data=True), hooks="comfyui_xdit.families.hidream",
    heads_attribute="num_attention_heads", patch_attribute="patch_size", joint_attention="rear",
    block_containers=("double_stream_blocks", "single_stream_blocks"),
    limits="PipeFusion and patch parallel have no HiDream hooks yet"))
# Wan 2.1 (T2V, I2V) and Wan 2.2 (TI2V 5B; the A14B experts load as Wan 2.1's class): tokens over frames x rows x cols,
# self-attention sequence parallel, cross-attention to text/image tokens local. Its variants with extra inputs
# (VACE, Camera, HuMo, S2V, Animate, causal AR) run their own forwards: CFG and data parallel only, named here.
_WAN_LAYOUT: dict[str, Any] = dict(
    hooks="comfyui_xdit.families.wan", heads_attribute="num_heads", joint_attention="cross", block_containers=("blocks",),
    limits="PipeFusion and patch parallel are not implemented for video yet")
register("WAN21", FamilyAdapter("Wan 2.1", Capabilities(ulysses=True, ring=True, cfg=True, data=True), **_WAN_LAYOUT))
register("WAN22", FamilyAdapter("Wan 2.2", Capabilities(ulysses=True, ring=True, cfg=True, data=True), **_WAN_LAYOUT))
for _class, _name in (("WAN21_Vace", "Wan 2.1 VACE"), ("WAN21_Camera", "Wan Camera"), ("WAN21_HuMo", "Wan HuMo"),
                      ("WAN22_S2V", "Wan 2.2 S2V"), ("WAN22_Animate", "Wan 2.2 Animate"), ("WAN21_CausalAR", "Wan 2.1 causal AR")):
    register(_class, FamilyAdapter(_name, CFG_AND_DATA, limits="its extra inputs are not sharded by the Wan sequence-parallel hooks yet"))
# Lumina 2 and Z-Image share one class (ComfyUI's NextDiT); the config class tells them apart in messages.
register("Lumina2", FamilyAdapter(
    "Lumina 2", Capabilities(ulysses=True, ring=True, cfg=True, data=True), hooks="comfyui_xdit.families.lumina2",
    heads_attribute="n_heads", patch_attribute="patch_size", joint_attention="front",
    block_containers=("context_refiner", "noise_refiner", "layers"), config_names=(("ZImage", "Z-Image"),),
    limits="PipeFusion and patch parallel are not implemented for its refiners and joint blocks yet"))
register("ZImagePixelSpace", FamilyAdapter(
    "Z-Image pixel space", CFG_AND_DATA, limits="its pixel decoder reads every image token; no sequence-parallel hooks for it yet"))
# Chroma is Flux's transformer with a distilled modulation approximator and no pooled vector; Chroma Radiance is its
# pixel-space subclass (patchified in forward_orig, a NeRF head after it). One hooks module serves both.
_CHROMA_LAYOUT: dict[str, Any] = dict(
    hooks="comfyui_xdit.families.chroma", heads_attribute="num_heads", patch_attribute="patch_size", joint_attention="front",
    block_containers=("double_blocks", "single_blocks"), block_compute=_FLUX_COMPUTE,
)
register("Chroma", FamilyAdapter("Chroma", EVERY_METHOD, **_CHROMA_LAYOUT))
register("ChromaRadiance", FamilyAdapter(
    "Chroma Radiance", Capabilities(ulysses=True, ring=True, cfg=True, data=True), **_CHROMA_LAYOUT,
    limits="PipeFusion and patch parallel cut the image into bands of tokens before the model runs, and Chroma Radiance's "
           "forward receives pixels, patchified inside it"))
# HunyuanVideo 1.0 (T2V; its I2V and SkyReels I2V subclasses add latent channels) and 1.5 (ByT5 glyph and CLIP-vision
# tokens in front of the text): Flux's double/single blocks over [text, image] tokens of (frames x rows x cols), text in
# front, the text encoder's padding mask honoured; the text refiner and head run whole. HunyuanImage 2.1 (a 2-D model
# of the same class) has its own model_base class and stays on the generic entry until it is tested.
_HUNYUAN_VIDEO_LAYOUT: dict[str, Any] = dict(
    capabilities=Capabilities(ulysses=True, ring=True, cfg=True, data=True), hooks="comfyui_xdit.families.hunyuan_video",
    heads_attribute="num_heads", joint_attention="front", block_containers=("double_blocks", "single_blocks"),
    limits="PipeFusion and patch parallel are not implemented for video yet")
register("HunyuanVideo", FamilyAdapter("HunyuanVideo", **_HUNYUAN_VIDEO_LAYOUT), covers_subclasses=True)
register("HunyuanVideo15", FamilyAdapter("HunyuanVideo 1.5", **_HUNYUAN_VIDEO_LAYOUT), covers_subclasses=True)
# LTX-Video: self-attention sequence parallel over (frames x rows x cols) tokens, per-token timesteps (image-to-video,
# keyframe guides) sharded with them, cross-attention to the (masked) text local. LTXAV (audio + video) runs its own
# forward over two streams: the generic entry.
register("LTXV", FamilyAdapter(
    "LTXV", Capabilities(ulysses=True, ring=True, cfg=True, data=True), hooks="comfyui_xdit.families.ltxv",
    heads_attribute="num_attention_heads", joint_attention="cross", block_containers=("transformer_blocks",),
    limits="PipeFusion and patch parallel are not implemented for video yet"))
# Mochi: asymmetric joint attention over [visual tokens, the unpadded T5 tokens] (text at the rear); visual tokens
# and text tokens sequence parallel (the text split into its valid and padded T5 tokens).
register("GenmoMochi", FamilyAdapter(
    "Mochi", Capabilities(ulysses=True, ring=True, cfg=True, data=True), hooks="comfyui_xdit.families.mochi",
    heads_attribute="num_heads", joint_attention="rear", block_containers=("blocks",),
    limits="PipeFusion and patch parallel are not implemented for video yet"))
# CogVideoX 1.0 and 1.5 (T2V, I2V, Fun inpainting: one model class): joint attention over [text, image], text in front;
# text and image rows both sharded.
register("CogVideoX", FamilyAdapter(
    "CogVideoX", Capabilities(ulysses=True, ring=True, cfg=True, data=True), hooks="comfyui_xdit.families.cogvideox",
    heads_attribute="num_attention_heads", joint_attention="front", block_containers=("blocks",),
    limits="PipeFusion and patch parallel are not implemented for video yet"))
