"""The family-adapter registry: which adapter a ComfyUI model gets, what it reads from the model, what it refuses,
and the loader inputs made from the one list of degrees."""
from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest

from comfyui_xdit.errors import UnsupportedByXDiT
from parallel_core import ParallelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shells(comfy_root, tiny_flux_paths, tiny_model_path):
    """Meta-weight models (as XDiTUNetLoader builds them) of every tiny family, by family."""
    from comfyui_xdit.shell_model import build_shell

    paths = {"flux": tiny_flux_paths["dev"], **{family: tiny_model_path(family) for family in ("flux2", "sd15", "sd3", "sd35", "qwen_image")}}
    return {family: build_shell(path, "default") for family, path in paths.items()}


def _bare(class_name: str):
    """An instance of comfy.model_base.<class_name> without running its constructor (only its type matters here)."""
    import comfy.model_base

    return object.__new__(getattr(comfy.model_base, class_name))


@pytest.mark.parametrize(("family", "name", "heads", "rows_of_18"), [
    ("flux", "Flux", 2, 9), ("flux2", "Flux.2", 2, 18), ("sd15", "SD15", None, 18), ("sd3", "SD3", 2, 9), ("sd35", "SD3", 2, 9),
    ("qwen_image", "Qwen-Image", 24, 9)])
def test_adapter_reads_heads_and_token_grid_from_the_model(shells, family, name, heads, rows_of_18):
    from comfyui_xdit.families import adapter_for

    model = shells[family].model
    adapter = adapter_for(model)
    assert adapter.family_name(model) == name
    assert adapter.num_heads(model.diffusion_model) == heads
    assert adapter.token_rows(model.diffusion_model, 18) == rows_of_18


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_heads_come_from_the_model_not_a_default(shells, family):
    from comfyui_xdit.families import adapter_for

    model = shells[family].model
    model.diffusion_model.num_heads = 3
    try:
        assert adapter_for(model).num_heads(model.diffusion_model) == 3
    finally:
        model.diffusion_model.num_heads = 2


def test_qwen_image_heads_come_from_its_blocks_attention(shells):
    from comfyui_xdit.families import adapter_for

    model = shells["qwen_image"].model
    attention = model.diffusion_model.transformer_blocks[0].attn
    attention.heads = 3
    try:
        assert adapter_for(model).num_heads(model.diffusion_model) == 3
    finally:
        attention.heads = 24


def test_refusals_name_the_family_and_what_it_supports(shells):
    from comfyui_xdit.parallel_model import validate_for_model

    with pytest.raises(UnsupportedByXDiT, match=r"^SD15 supports cfg and data parallel only \(.*\); set ulysses_degree/ring_degree to 1$"):
        validate_for_model(ParallelConfig(ulysses_degree=2, ring_degree=2), 4, shells["sd15"])
    with pytest.raises(UnsupportedByXDiT, match="SD15 supports cfg and data parallel only .*set pipefusion_degree to 1"):
        validate_for_model(ParallelConfig(pipefusion_degree=2), 2, shells["sd15"])
    validate_for_model(ParallelConfig(cfg_degree=2, data_degree=2), 4, shells["sd15"])
    validate_for_model(ParallelConfig(ulysses_degree=2, ring_degree=2), 4, shells["flux2"])
    validate_for_model(ParallelConfig(pipefusion_degree=2, ulysses_degree=2), 4, shells["flux2"])
    validate_for_model(ParallelConfig(patch_degree=2, cfg_degree=2), 4, shells["flux2"])
    validate_for_model(ParallelConfig(ulysses_degree=2, ring_degree=2), 4, shells["qwen_image"])
    validate_for_model(ParallelConfig(patch_degree=2, cfg_degree=2), 4, shells["qwen_image"])
    # Qwen-Image takes PipeFusion; the tiny file's one block cannot make two stages.
    with pytest.raises(ValueError, match="pipefusion_degree 2 is more stages than the model's 1 transformer blocks; use at most 1"):
        validate_for_model(ParallelConfig(pipefusion_degree=2), 2, shells["qwen_image"])


@pytest.mark.parametrize("family", ["sd3", "sd35"])
def test_sd3_takes_every_method_and_sd35_dual_attention_refuses_the_stale_ones_by_name(shells, family):
    from comfyui_xdit.families.sd3 import refuse_stale_methods_on
    from comfyui_xdit.parallel_model import validate_for_model

    validate_for_model(ParallelConfig(ulysses_degree=2, ring_degree=2), 4, shells[family])
    validate_for_model(ParallelConfig(ulysses_degree=2, cfg_degree=2, data_degree=2), 8, shells[family])
    validate_for_model(ParallelConfig(pipefusion_degree=2, ulysses_degree=2), 4, shells[family])
    validate_for_model(ParallelConfig(patch_degree=2, cfg_degree=2), 4, shells[family])
    diffusion_model = shells[family].model.diffusion_model
    if family == "sd3":
        refuse_stale_methods_on(diffusion_model, "SD3")
        return
    with pytest.raises(UnsupportedByXDiT, match=r"^PipeFusion and patch parallel do not take SD3 models with dual-attention blocks "
                                                r"\(SD3.5 Medium's image-only second attention\); set pipefusion_degree and patch_degree to 1"):
        refuse_stale_methods_on(diffusion_model, "SD3")


@pytest.mark.fast  # needs ComfyUI's classes, no model file
@pytest.mark.parametrize(("class_name", "message"), [
    ("LongCatImage", r"LongCat-Image supports cfg and data parallel only \(its shifted RoPE positions are not tested"),
])
def test_flux_subclasses_without_a_tested_adapter_are_refused_sequence_parallel(class_name, message, comfy_root):
    from comfyui_xdit.parallel_model import validate_for_model

    patcher = SimpleNamespace(model=_bare(class_name))
    with pytest.raises(UnsupportedByXDiT, match=f"^{message}.*set ulysses_degree to 1"):
        validate_for_model(ParallelConfig(ulysses_degree=2), 2, patcher)


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_wan_variants_with_extra_inputs_are_refused_sequence_parallel_by_name(comfy_root):
    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.parallel_model import validate_for_model

    assert adapter_for(_bare("WAN21")).name == "Wan 2.1"
    assert adapter_for(_bare("WAN22")).name == "Wan 2.2"  # a WAN21 subclass, registered itself
    assert adapter_for(_bare("WAN21_FlowRVS")).name is None  # other subclasses are not covered by WAN21's entry
    for class_name, name in (("WAN21_Vace", "Wan 2.1 VACE"), ("WAN22_S2V", "Wan 2.2 S2V"), ("WAN22_Animate", "Wan 2.2 Animate")):
        with pytest.raises(UnsupportedByXDiT, match=f"^{name} supports cfg and data parallel only .*set ring_degree to 1"):
            validate_for_model(ParallelConfig(ring_degree=2), 2, SimpleNamespace(model=_bare(class_name)))
    with pytest.raises(UnsupportedByXDiT, match=r"^Wan 2\.2 supports ulysses, ring, cfg and data parallel only \(PipeFusion .*set patch_degree to 1"):
        adapter_for(_bare("WAN22")).refuse_unsupported(ParallelConfig(patch_degree=2), _bare("WAN22"))


@pytest.mark.fast  # needs ComfyUI's classes, no model file
@pytest.mark.parametrize(("class_name", "name"), [("Chroma", "Chroma"), ("ChromaRadiance", "Chroma Radiance")])
def test_chroma_takes_the_stale_methods_and_radiance_refuses_them_by_name(class_name, name, comfy_root):
    import torch

    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.families.flux import refuse_unsupported

    model = _bare(class_name)
    adapter = adapter_for(model)
    for degree in ("pipefusion", "patch"):
        config = ParallelConfig(**{f"{degree}_degree": 2})
        if class_name == "Chroma":
            adapter.refuse_unsupported(config, model)
            continue
        with pytest.raises(UnsupportedByXDiT, match=rf"^Chroma Radiance supports ulysses, ring, cfg and data parallel only "
                                                    rf"\(PipeFusion and patch parallel cut .* receives pixels, .*\); set {degree}_degree to 1$"):
            adapter.refuse_unsupported(config, model)
    # A style model's attention bias is the one way stock hands Chroma an attention mask: refused by name.
    with pytest.raises(UnsupportedByXDiT, match=f"an attention mask on {name} .*remove it or use UNETLoader"):
        refuse_unsupported(None, None, torch.ones(1, 1, 8, 8), {}, name)


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_matching_is_on_comfyui_own_classes_most_derived_first(comfy_root):
    import comfy.model_base

    from comfyui_xdit.families import adapter_for

    assert adapter_for(_bare("Flux2")).name == "Flux.2"
    assert adapter_for(_bare("Flux")).name == "Flux"
    assert adapter_for(_bare("SD3")).name == "SD3"
    assert adapter_for(_bare("Chroma")).name == "Chroma"  # a Flux subclass: Flux's entry does not cover it
    assert adapter_for(_bare("ChromaRadiance")).name == "Chroma Radiance"
    assert adapter_for(_bare("LongCatImage")).name == "LongCat-Image"
    assert adapter_for(_bare("QwenImage")).name == "Qwen-Image"
    assert adapter_for(_bare("MageFlow")).name is None  # a QwenImage subclass with its own model class
    # A class that only shares a registered name (as a node pack's own "Flux" might) is not taken for ComfyUI's.
    impostor = type("Flux", (comfy.model_base.BaseModel,), {})
    assert adapter_for(object.__new__(impostor)).name is None
    with pytest.raises(UnsupportedByXDiT, match="Linear is not a ComfyUI diffusion model"):
        import torch

        adapter_for(torch.nn.Linear(1, 1))


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_registering_a_class_twice_is_refused_and_a_missing_class_is_harmless(comfy_root):
    from comfyui_xdit import families

    with pytest.raises(ValueError, match="Flux already has an adapter"):
        families.register("Flux", families.FamilyAdapter("Flux again", families.CFG_AND_DATA))
    # PipeFusion cuts stages by the blocks' modelled compute: an adapter taking it must say how (block_compute).
    with pytest.raises(ValueError, match="Future takes PipeFusion but its adapter has no block_compute"):
        families.register("NotInThisComfyUI", families.FamilyAdapter("Future", families.EVERY_METHOD))
    # A registration for a class this ComfyUI does not have (newer ComfyUI) loads and never matches.
    families.register("NotInThisComfyUI", families.FamilyAdapter("Future", families.EVERY_METHOD, block_compute=families.BlockCompute()))
    try:
        assert families.adapter_for(_bare("SDXL")).name is None
    finally:
        del families._REGISTRY["NotInThisComfyUI"]


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_loader_inputs_and_validation_come_from_one_list(comfy_root):
    import importlib.util

    from comfyui_xdit.degrees import DEGREE_INPUTS, DEGREE_TOOLTIPS

    # By file: inside ComfyUI the pack's folder is the package, and `nodes` here is ComfyUI's own nodes.py.
    spec = importlib.util.spec_from_file_location("xdit_unet_loader", REPO_ROOT / "nodes" / "unet_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    XDiTUNetLoader = module.XDiTUNetLoader

    optional = XDiTUNetLoader.INPUT_TYPES()["optional"]
    # Widget order is what saved workflows depend on: data_degree is appended after patch_degree.
    assert list(optional) == ["world_size", "ulysses_degree", "ring_degree", "cfg_degree", "pipefusion_degree", "ray_address",
                              "patch_degree", "data_degree", "weight_sharding", "pipefusion_balance"]
    assert optional["weight_sharding"][0] == ["none", "blocks"] and optional["weight_sharding"][1]["default"] == "none"
    assert optional["pipefusion_balance"][0] == ["balanced", "memory", "speed"] and optional["pipefusion_balance"][1]["default"] == "balanced"
    assert [n for n in optional if n.endswith("_degree")] == list(DEGREE_INPUTS)
    for name, tooltip in DEGREE_TOOLTIPS.items():
        assert optional[f"{name}_degree"][1]["tooltip"] == tooltip
    assert list(inspect.signature(XDiTUNetLoader.VALIDATE_INPUTS).parameters) == ["world_size", *DEGREE_INPUTS, "ray_address", "weight_sharding",
                                                                                  "pipefusion_balance"]
    assert XDiTUNetLoader.VALIDATE_INPUTS(world_size=4, ulysses_degree=2, data_degree=2, weight_sharding="blocks") is True
    assert "weight_sharding must be one of none, blocks, got 'layers'" in XDiTUNetLoader.VALIDATE_INPUTS(weight_sharding="layers")
    assert XDiTUNetLoader.VALIDATE_INPUTS(world_size=2, pipefusion_degree=2, pipefusion_balance="speed") is True
    assert XDiTUNetLoader.VALIDATE_INPUTS(world_size=2, pipefusion_balance="fast") == \
        "pipefusion_balance must be one of balanced, memory, speed, got 'fast'"
    refusal = XDiTUNetLoader.VALIDATE_INPUTS(world_size=2, pipefusion_degree=2, weight_sharding="blocks")
    assert "cannot be combined with pipefusion_degree 2" in refusal and "set weight_sharding to none or pipefusion_degree to 1" in refusal
    assert XDiTUNetLoader.VALIDATE_INPUTS(world_size=2, data_degree=2) is True
    assert "data_degree must be 0 (auto)" in XDiTUNetLoader.VALIDATE_INPUTS(data_degree=-1)
    assert "does not divide world_size 2" in XDiTUNetLoader.VALIDATE_INPUTS(world_size=2, data_degree=4)


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_qwen_image_refuses_the_inputs_its_sequence_parallel_path_does_not_shard(comfy_root):
    import torch

    from comfyui_xdit.families.qwen_image import refuse_unsupported

    refuse_unsupported(None, None, {}, {})
    refuse_unsupported("index", None, {}, {})  # Qwen-Image-Edit's reference tokens are split with the image's
    with pytest.raises(UnsupportedByXDiT, match="'index_timestep_zero' .* set ulysses_degree and ring_degree to 1"):
        refuse_unsupported("index_timestep_zero", None, {}, {})
    with pytest.raises(UnsupportedByXDiT, match="text attention mask on Qwen-Image"):
        refuse_unsupported(None, torch.ones(1, 7), {}, {})
    with pytest.raises(UnsupportedByXDiT, match="ControlNet on Qwen-Image"):
        refuse_unsupported(None, None, {"control": {"input": []}}, {})
    with pytest.raises(UnsupportedByXDiT, match="already overrides attention"):
        refuse_unsupported(None, None, {}, {"optimized_attention_override": print})
    refuse_unsupported(None, None, {}, {"patches": {"attn1_patch": [print], "double_block": []}})
    with pytest.raises(UnsupportedByXDiT, match=r"a model patch on Qwen-Image's double_block \(e.g. a DiffSynth"):
        refuse_unsupported(None, None, {}, {"patches": {"double_block": [print]}})


@pytest.mark.fast  # the two-block Qwen-Image is built in-process (~0.3 M parameters); no model file
def test_qwen_image_token_level_call_is_stocks_forward_and_refuses_reference_images(comfy_root):
    """The stale methods' token-level call on every token (as world 1 runs it) gives stock's forward bit for bit, on
    even and odd latents; reference images are refused by name; a PipeFusion stage reads its heads off a block it holds."""
    import functools

    import comfy.patcher_extension
    import torch

    from comfyui_xdit.block_stages import RemoteBlock
    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.families.qwen_image import _stale_forward
    from comfyui_xdit.testing.tiny_models import IN_PROCESS

    patcher = IN_PROCESS["qwen_image_stages"](0)
    model = patcher.model.diffusion_model

    def whole(call, img, img_ids, txt, txt_ids, options, family_call=None):
        return call(img, img_ids, txt, txt_ids, options)

    wrappers = {"wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"k": [functools.partial(_stale_forward, whole, "Qwen-Image")]}}}
    generator = torch.Generator().manual_seed(0)
    for rows, columns in ((16, 16), (18, 22), (17, 23)):
        x, context = torch.randn(2, 16, 1, rows, columns, generator=generator), torch.randn(2, 7, 64, generator=generator)
        timestep = torch.tensor([0.5, 0.7])
        stock = model(x, timestep, context, transformer_options={})
        assert stock.abs().max() > 0.1
        assert torch.equal(model(x, timestep, context, transformer_options=dict(wrappers)), stock), (rows, columns)
    with pytest.raises(UnsupportedByXDiT, match=r"^PipeFusion and patch parallel on Qwen-Image do not take reference images .*"
                                                r"set pipefusion_degree and patch_degree to 1"):
        model(x, timestep, context, ref_latents=[torch.randn(2, 16, 1, 6, 6)], transformer_options=dict(wrappers))
    first = model.transformer_blocks[0]
    model.transformer_blocks[0] = RemoteBlock(1)
    try:
        assert adapter_for(patcher.model).num_heads(model) == 2
    finally:
        model.transformer_blocks[0] = first


@pytest.mark.fast  # the tiny HiDream is built in-process (~0.3 M parameters); no model file
def test_hidream_reads_its_layout_from_the_model_and_refuses_what_it_does_not_shard(comfy_root):
    import torch

    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.families.hidream import _sequence_parallel_forward
    from comfyui_xdit.parallel_glue import text_rear_attention_override
    from comfyui_xdit.parallel_model import validate_for_model
    from comfyui_xdit.testing.tiny_models import IN_PROCESS

    patcher = IN_PROCESS["hidream"](0)
    adapter = adapter_for(patcher.model)
    assert (adapter.family_name(patcher.model), adapter.joint_attention) == ("HiDream", "rear")
    assert adapter.num_heads(patcher.model.diffusion_model) == 2
    assert adapter.token_rows(patcher.model.diffusion_model, 18) == 9
    validate_for_model(ParallelConfig(ulysses_degree=2, ring_degree=2), 4, patcher)
    validate_for_model(ParallelConfig(ulysses_degree=2, cfg_degree=2, data_degree=2), 8, patcher)
    for degree in ("pipefusion", "patch"):
        with pytest.raises(UnsupportedByXDiT, match=r"^HiDream supports ulysses, ring, cfg and data parallel only "
                                                    rf"\(PipeFusion and patch parallel have no HiDream hooks yet\); set {degree}_degree to 1$"):
            validate_for_model(ParallelConfig(**{f"{degree}_degree": 2}), 2, patcher)
    with pytest.raises(UnsupportedByXDiT, match="another node pack already overrides attention"):
        _sequence_parallel_forward(None, None, None, None, transformer_options={"optimized_attention_override": print})
    q = torch.zeros(1, 4, 32)
    with pytest.raises(UnsupportedByXDiT, match="an attention mask on HiDream .* remove it or use UNETLoader"):
        text_rear_attention_override("HiDream", None, (2,), None, q, q, q, 2, mask=torch.ones(1, 4, 4))


@pytest.mark.fast  # needs ComfyUI's classes and the in-process tiny Z-Image (13 M parameters), no model file
def test_lumina2_and_zimage_share_an_adapter_named_by_their_config(comfy_root):
    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.parallel_model import validate_for_model
    from comfyui_xdit.testing.tiny_models import IN_PROCESS_PREFIX, load_tiny_model

    zimage = load_tiny_model(IN_PROCESS_PREFIX + "zimage")
    adapter = adapter_for(zimage.model)
    assert adapter is adapter_for(_bare("Lumina2"))  # one model class (NextDiT) for both
    assert (adapter.family_name(zimage.model), adapter.family_name(_bare("Lumina2"))) == ("Z-Image", "Lumina 2")
    assert adapter.num_heads(zimage.model.diffusion_model) == 4
    assert adapter.token_rows(zimage.model.diffusion_model, 18) == 9
    validate_for_model(ParallelConfig(ulysses_degree=2, ring_degree=2), 4, zimage)
    for degree in ("pipefusion", "patch"):
        with pytest.raises(UnsupportedByXDiT, match=rf"^Z-Image supports ulysses, ring, cfg and data parallel only "
                                                    rf"\(PipeFusion and patch parallel are not implemented .*\); set {degree}_degree to 1$"):
            validate_for_model(ParallelConfig(**{f"{degree}_degree": 2}), 2, zimage)


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_zimage_pixel_space_takes_cfg_and_data_only(comfy_root):
    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.parallel_model import validate_for_model

    patcher = SimpleNamespace(model=_bare("ZImagePixelSpace"))
    with pytest.raises(UnsupportedByXDiT, match=r"^Z-Image pixel space supports cfg and data parallel only "
                                                r"\(its pixel decoder reads every image token.*\); set ulysses_degree/ring_degree to 1$"):
        validate_for_model(ParallelConfig(ulysses_degree=2, ring_degree=2), 4, patcher)
    assert adapter_for(patcher.model).capabilities.supported() == ("cfg", "data")


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_lumina2_refuses_the_inputs_its_sequence_parallel_path_does_not_shard(comfy_root):
    import torch

    from comfyui_xdit.families.lumina2 import _attention, refuse_unsupported

    refuse_unsupported("Lumina 2", {"ref_latents": [], "clip_text_pooled": torch.ones(1, 4)}, {"patches": {"double_block": []}})
    with pytest.raises(UnsupportedByXDiT, match=r"reference images \(Z-Image omni\) on Z-Image .* set ulysses_degree and ring_degree to 1"):
        refuse_unsupported("Z-Image", {"ref_latents": [torch.zeros(1, 16, 4, 4)]}, {})
    with pytest.raises(UnsupportedByXDiT, match=r"a model patch on Lumina 2's noise_refiner and double_block"):
        refuse_unsupported("Lumina 2", {}, {"patches": {"noise_refiner": [print], "double_block": [print]}})
    with pytest.raises(UnsupportedByXDiT, match="already overrides attention"):
        refuse_unsupported("Lumina 2", {}, {"optimized_attention_override": print})
    # ComfyUI's NextDiT drops the caption mask before attention; one that reached attention would be refused.
    q = torch.zeros(1, 2, 5, 8)
    with pytest.raises(UnsupportedByXDiT, match="an attention mask on Z-Image is not supported with sequence parallel"):
        _attention("Z-Image", None, None, q, q, q, 2, torch.ones(1, 5, 5), skip_reshape=True, transformer_options={})


@pytest.mark.fast  # needs ComfyUI's classes, no model file
def test_video_families_take_the_exact_methods_and_refuse_the_stale_ones_by_name(comfy_root):
    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.parallel_model import validate_for_model

    names = {"HunyuanVideo": "HunyuanVideo", "HunyuanVideoI2V": "HunyuanVideo", "HunyuanVideoSkyreelsI2V": "HunyuanVideo",
             "HunyuanVideo15": "HunyuanVideo 1.5", "HunyuanVideo15_SR_Distilled": "HunyuanVideo 1.5", "LTXV": "LTXV",
             "GenmoMochi": "Mochi", "CogVideoX": "CogVideoX"}
    for class_name, name in names.items():
        patcher = SimpleNamespace(model=_bare(class_name))
        assert adapter_for(patcher.model).capabilities.supported() == ("ulysses", "ring", "cfg", "data"), class_name
        with pytest.raises(UnsupportedByXDiT, match=rf"^{name} supports ulysses, ring, cfg and data parallel only \(PipeFusion "
                                                    r"and patch parallel are not implemented for video yet\); set pipefusion_degree to 1$"):
            validate_for_model(ParallelConfig(pipefusion_degree=2), 2, patcher)
    # Classes with other forwards over the same model code stay on the generic entry until tested.
    for class_name in ("LTXAV", "HunyuanImage21"):
        assert adapter_for(_bare(class_name)).capabilities.supported() == ("cfg", "data"), class_name


@pytest.mark.fast  # pure logic on tensors
def test_hunyuan_video_maps_masks_and_modulation_ranges_onto_a_ranks_rows():
    import torch

    from comfyui_xdit.families.hunyuan_video import _kept_text, _local_dims, _refuse_unsupported

    big = -torch.finfo(torch.float32).max
    mask = torch.zeros(1, 1, 9)  # 4 text tokens (the last padded), 5 image tokens
    mask[0, 0, 3] = big
    assert _kept_text("HunyuanVideo", mask, 4).tolist() == [0, 1, 2]
    assert _kept_text("HunyuanVideo", None, 4) is None
    mask[0, 0, 1] = -1.0  # a bias, not padding: dropping that key would change the result
    with pytest.raises(UnsupportedByXDiT, match="HunyuanVideo: an attention mask with values other than the text padding mask's"):
        _kept_text("HunyuanVideo", mask, 4)
    with pytest.raises(UnsupportedByXDiT, match="HunyuanVideo: an attention mask of shape"):
        _kept_text("HunyuanVideo", torch.zeros(2, 9, 9), 4)
    # The guiding frame's ranges over the whole sequence, on a rank holding global rows 30..37 and two padding rows.
    positions = torch.tensor([30, 31, 32, 33, 34, 35, 36, 37, -1, -1])
    assert _local_dims([(0, 35, 0), (35, None, 1)], positions) == [(0, 5, 0), (5, 8, 1)]
    assert _local_dims(None, positions) is None
    with pytest.raises(UnsupportedByXDiT, match="ControlNet on HunyuanVideo is not supported in parallel; remove the ControlNet"):
        _refuse_unsupported("HunyuanVideo", object(), {})
    with pytest.raises(UnsupportedByXDiT, match="a model patch on HunyuanVideo's attn1_patch .*set ulysses_degree and ring_degree to 1"):
        _refuse_unsupported("HunyuanVideo", None, {"patches": {"attn1_patch": [print]}})


@pytest.mark.fast  # pure logic
def test_ltxv_and_mochi_refuse_what_their_hooks_do_not_shard():
    import torch

    from comfyui_xdit.families import ltxv, mochi
    from parallel_core import init_parallel

    state = init_parallel(ParallelConfig())
    with pytest.raises(UnsupportedByXDiT, match=r"LTXV: guide attention attenuation \(LTXVAddGuide strength other than 1.0"):
        ltxv._refuse_unsupported("LTXV", state, 105, torch.zeros(1, 1, 1, 105), {})
    with pytest.raises(UnsupportedByXDiT, match="a model patch on LTXV's attn2_patch"):
        ltxv._refuse_unsupported("LTXV", state, 105, None, {"patches": {"attn2_patch": [print]}})
    with pytest.raises(UnsupportedByXDiT, match="a dit block replacement on Mochi"):
        mochi._refuse_unsupported("Mochi", state, 105, {"patches_replace": {"dit": {("double_block", 0): print}}})


@pytest.mark.fast  # needs ComfyUI's classes, no model file
@pytest.mark.parametrize("parts", [2, 4])
def test_wan_embeds_only_each_ranks_tokens(parts, comfy_root):
    """Each rank's Wan patch embedding and RoPE table are its pieces of stock's for the whole grid (padding rows
    aside), and nothing more: no rank holds the grid's embedded tokens or RoPE rows. 105 tokens (3 frames x 5 x 7
    patches) divide neither degree."""
    import comfy.ops
    import torch
    from comfy.ldm.flux.layers import EmbedND

    from comfyui_xdit.families.wan import _local_embedding, _local_rope
    from parallel_core.sharding import chunk_length, padded_piece

    torch.manual_seed(0)
    embedding = comfy.ops.disable_weight_init.Conv3d(16, 24, kernel_size=(1, 2, 2), stride=(1, 2, 2))  # as WanModel builds it
    torch.nn.init.normal_(embedding.weight)
    torch.nn.init.normal_(embedding.bias)
    latent = torch.randn(2, 16, 3, 10, 14)
    stock = embedding(latent).flatten(2).transpose(1, 2)  # what forward_orig makes of the whole grid: (2, 105, 24)
    rope = EmbedND(dim=128, theta=10000.0, axes_dim=[44, 42, 42])  # Wan's RoPE at heads of 128 channels
    ids = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (3, 5, 7)), indexing="ij"), -1).reshape(1, 105, 3)
    stock_rope = rope(ids)  # (1, 1, 105, 64, 2, 2): rows in token order
    local_tokens = chunk_length(105, parts)
    for rank in range(parts):
        state, grid = SimpleNamespace(sequence=SimpleNamespace(size=parts, rank=rank), lengths={}), {}
        local = _local_embedding(embedding.forward, state, grid, (1, 2, 2), latent)
        assert local.shape == (2, 24, 1, 1, local_tokens)
        assert grid["sizes"] == (3, 5, 7) and state.lengths["sequence"] == 105
        real = min(local_tokens, 105 - rank * local_tokens)  # the last rank's padding rows embed zero patches
        torch.testing.assert_close(local.flatten(2).transpose(1, 2)[:, :real], padded_piece(stock, 1, parts, rank)[:, :real],
                                   rtol=0, atol=1e-5)
        local_rope = _local_rope(rope.forward, state, grid, ids)
        assert grid["tokens"] == 105 and local_rope.shape[2] == local_tokens
        assert torch.equal(local_rope[:, :, :real], stock_rope[:, :, rank * local_tokens:rank * local_tokens + real])
