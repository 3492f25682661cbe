"""Quantized checkpoints in one process (no pool): the shell model is detected as stock detects the file, each
PipeFusion stage reads its blocks' quantized weights, LoRAs merge into quantized weights as stock merges them, and a
format this ComfyUI does not know is refused before any work, naming the file and the format.

The exactness of sampling on the pool is in test_flux_parallel.py (sequence, CFG and data parallel, every format and
fp8 weight_dtype) and test_flux_pipefusion.py (PipeFusion on stage-loaded quantized files).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.errors import UnsupportedByXDiT
from comfyui_xdit.testing.tiny_quant import MIXED_FORMATS, config_tensor, quantize_file

STRENGTH = 0.7


@pytest.fixture(scope="module")
def pipeline_source(comfy_root, tmp_path_factory):
    """The tiny Flux dev with 4 double + 10 single blocks (PipeFusion's test layout)."""
    from comfyui_xdit.testing.tiny_models import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("quantized") / "flux-pipeline.safetensors", "dev", "pipeline")


@pytest.fixture(scope="module")
def quantized(pipeline_source):
    """fmt -> the pipeline-sized tiny Flux written in that quant format, written once."""
    written = {}

    def path_for(fmt: str):
        if fmt not in written:
            written[fmt] = quantize_file(pipeline_source, pipeline_source.with_name(f"{fmt.replace(':', '-')}.safetensors"), fmt)
        return written[fmt]

    return path_for


def _plain(weights: dict) -> dict[str, torch.Tensor]:
    """A state dict with quantized weights as their stored data and scales (bit patterns, comparable with equal)."""
    out = {}
    for key, value in weights.items():
        if hasattr(value, "layout_cls"):
            for suffix, tensor in value.state_dict(key).items():
                out[suffix] = tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor
        else:
            out[key] = value.view(torch.uint8) if value.element_size() == 1 else value
    return out


def test_the_formats_are_those_this_comfyui_knows(comfy_root):
    from comfy.quant_ops import QUANT_ALGOS

    assert set(MIXED_FORMATS) == set(QUANT_ALGOS)


@pytest.mark.parametrize("fmt", ["scaled_fp8", "nvfp4", "metadata:int8_tensorwise"])
def test_the_shell_is_detected_as_stock_detects_the_file(quantized, fmt):
    import comfy.sd

    from comfyui_xdit.shell_model import build_shell

    path = quantized(fmt)
    shell, stock = build_shell(path, "default").model, comfy.sd.load_diffusion_model(str(path)).model
    assert shell.model_config.quant_config == stock.model_config.quant_config == {"mixed_ops": True}
    assert (shell.get_dtype(), shell.manual_cast_dtype) == (stock.get_dtype(), stock.manual_cast_dtype)
    ours, theirs = (type(model.diffusion_model.single_blocks[0].linear1) for model in (shell, stock))  # a class per load
    assert (ours.__qualname__, ours._disabled_formats) == (theirs.__qualname__, theirs._disabled_formats)
    assert "mixed_precision_ops" in ours.__qualname__


@pytest.fixture(scope="module")
def plain_held(pipeline_source):
    """Block parameters each of 2 stages holds for the full-precision file."""
    from comfyui_xdit.stage_loading import held_block_parameters, load_stage

    return [held_block_parameters(load_stage(pipeline_source, "default", 2, stage).model) for stage in range(2)]


@pytest.mark.parametrize("fmt", ["scaled_fp8", *MIXED_FORMATS, "metadata:nvfp4"])
def test_each_stage_holds_stocks_quantized_weights_for_its_blocks(quantized, plain_held, fmt):
    """Stage 0 and 1 of 2: every tensor a stage holds equals stock's load of the file (quantized data, scales and
    configs, bit for bit); the stages split the blocks as the full-precision file's, and hold no other stage's."""
    import comfy.sd

    from comfyui_xdit.stage_loading import held_block_parameters, load_stage

    path = quantized(fmt)
    stock = _plain(comfy.sd.load_diffusion_model(str(path)).model.diffusion_model.state_dict())
    held = []
    for stage in range(2):
        model = load_stage(path, "default", 2, stage).model
        ours = _plain(model.diffusion_model.state_dict())
        assert ours and all(torch.equal(ours[k], stock[k]) for k in ours), f"stage {stage}: weights differ from stock's"
        assert any(k.endswith(".comfy_quant") for k in ours), "no quantized layer in the stage"
        held.append(held_block_parameters(model))
    assert held == plain_held


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_each_stage_holds_stocks_weights_in_an_fp8_weight_dtype(pipeline_source, weight_dtype):
    import comfy.sd

    from comfyui_xdit.shell_model import model_options_for
    from comfyui_xdit.stage_loading import load_stage

    stock = comfy.sd.load_diffusion_model(str(pipeline_source), model_options=model_options_for(weight_dtype)).model.diffusion_model.state_dict()
    for stage in range(2):
        ours = load_stage(pipeline_source, weight_dtype, 2, stage).model.diffusion_model.state_dict()
        assert {v.dtype for k, v in ours.items() if "blocks." in k and v.ndim == 2} == {stock["single_blocks.0.linear1.weight"].dtype}
        assert all(v.dtype == stock[k].dtype and torch.equal(v.float(), stock[k].float()) for k, v in ours.items()), f"stage {stage}"


@pytest.mark.parametrize("fmt", ["scaled_fp8", "nvfp4", "int8_tensorwise"])
def test_a_lora_merges_into_quantized_weights_as_stock_merges_it(quantized, pipeline_source, tmp_path, fmt):
    """Stock patches a quantized weight by dequantizing, adding the LoRA and quantizing again (seeded by the key);
    the workers' merge calls the same code, so the weights are stock's bit for bit, and no LoRA restores the loaded ones."""
    import comfy.sd
    import comfy.utils

    from comfyui_xdit.job_spec import LoraRef
    from comfyui_xdit.lora_merge import MergedLoras
    from comfyui_xdit.testing.tiny_loras import flux_shapes, write_flux_lora

    path = quantized(fmt)
    lora = write_flux_lora(tmp_path / "lora.safetensors", flux_shapes(pipeline_source), "kohya", rank=4, seed=1)
    stat = lora.stat()
    resident = comfy.sd.load_diffusion_model(str(path))
    loaded = _plain(resident.model.diffusion_model.state_dict())
    merged = MergedLoras(resident)
    merged.apply((LoraRef(str(lora), STRENGTH, (stat.st_size, stat.st_mtime_ns)),))
    ours = _plain(resident.model.diffusion_model.state_dict())

    stock = comfy.sd.load_lora_for_models(comfy.sd.load_diffusion_model(str(path)), None,
                                          comfy.utils.load_torch_file(str(lora), safe_load=True), STRENGTH, 0)[0]
    stock.patch_model(device_to=torch.device("cpu"))
    expected = _plain(stock.model.diffusion_model.state_dict())
    changed = [k for k in loaded if not torch.equal(loaded[k], expected[k])]
    assert len(changed) > 20, "the LoRA changed too little to prove anything"
    assert [k for k in expected if not torch.equal(ours[k], expected[k])] == []
    merged.apply(())
    assert all(torch.equal(v, loaded[k]) for k, v in _plain(resident.model.diffusion_model.state_dict()).items())


@pytest.mark.parametrize("in_header", [False, True])
def test_an_unknown_format_is_refused_naming_the_file_and_the_format(quantized, tmp_path, in_header):
    """A layer quantized in a format this ComfyUI has no layout for: refused when the shell is built (the loader
    node's first step), with the file, the layer, the format and what this ComfyUI reads."""
    from comfyui_xdit.shell_model import build_shell

    tensors = load_file(str(quantized("float8_e4m3fn")))
    layer = "double_blocks.0.img_attn.qkv"
    metadata = None
    if in_header:
        layers = {key[: -len(".comfy_quant")]: json.loads(bytes(value.tolist())) for key, value in tensors.items() if key.endswith(".comfy_quant")}
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".comfy_quant")}
        layers[layer] = {"format": "float3_e1m1"}
        metadata = {"_quantization_metadata": json.dumps({"layers": layers})}
    else:
        tensors[f"{layer}.comfy_quant"] = config_tensor({"format": "float3_e1m1"})
    path = tmp_path / "unknown-format.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(UnsupportedByXDiT, match=r"unknown-format.safetensors: layer double_blocks.0.img_attn.qkv is quantized as "
                                                r"'float3_e1m1', a format this ComfyUI does not know \(it knows float8_e4m3fn, .*nvfp4"):
        build_shell(path, "default")


def test_the_scaled_fp8_file_has_the_older_layout(quantized):
    header = load_file(str(quantized("scaled_fp8")))
    assert not any(key.endswith(".comfy_quant") for key in header)
    assert header["scaled_fp8"].dtype == torch.float8_e4m3fn and header["single_blocks.0.linear1.weight"].dtype == torch.float8_e4m3fn
    assert header["single_blocks.0.linear1.scale_weight"].shape == ()


def test_layout_dependent_formats_are_named_in_a_warning(quantized, caplog):
    from comfyui_xdit.shell_model import build_shell

    with caplog.at_level("WARNING"):
        build_shell(quantized("int8_tensorwise"), "default")
        build_shell(quantized("float8_e4m3fn"), "default")
    warnings = [r.getMessage() for r in caplog.records if "XDiT:" in r.getMessage()]
    assert len(warnings) == 1 and "int8_tensorwise.safetensors has layers quantized as int8_tensorwise" in warnings[0]
