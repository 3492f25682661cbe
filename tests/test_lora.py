"""LoRA in one process (no pool): every format ComfyUI maps, checks at the node, and the workers' key-by-key merge.

Files are written by comfyui_xdit.testing.tiny_loras in the trainers' own key formats. The stock side is ComfyUI itself:
comfy.sd.load_lora_for_models (what LoraLoaderModelOnly calls) and ModelPatcher.patch_model; the XDiT side is the
shell MODEL's checks (meta weights) and MergedLoras on a resident model, as a worker runs them.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import flux_cases
from comfyui_xdit.errors import UnsupportedByXDiT
from comfyui_xdit.job_spec import LoraRef, PoolModelRef
from comfyui_xdit.testing.tiny_loras import FORMATS, flux_lora, flux_shapes, write_flux_lora

STRENGTH = 0.7


@pytest.fixture(scope="module")
def full_flux(comfy_root, tmp_path_factory):
    """Flux's full block layout (19 double, 38 single blocks) at hidden 128: ComfyUI maps XLabs keys onto no other."""
    from comfyui_xdit.testing.tiny_models import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("full_flux") / "flux-full.safetensors", "dev", "tiny", seed=3,
                           hidden_size=128, depth=19, depth_single_blocks=38)


def _shell(path):
    from comfyui_xdit.shell_model import build_shell

    return build_shell(path, "default", PoolModelRef(str(path), "default", (("ulysses_degree", 1),), 1, "", 1))


@pytest.fixture(scope="module")
def full(full_flux):
    """The shell the node checks against, a resident model with its MergedLoras, and a stock-loaded model."""
    import comfy.sd

    from comfyui_xdit.lora_merge import MergedLoras

    resident = comfy.sd.load_diffusion_model(str(full_flux))
    return {"path": full_flux, "shapes": flux_shapes(full_flux), "shell": _shell(full_flux), "merged": MergedLoras(resident),
            "resident": resident, "stock": comfy.sd.load_diffusion_model(str(full_flux)), "base": load_file(str(full_flux))}


def _ref(path, strength=STRENGTH) -> LoraRef:
    stat = path.stat()
    return LoraRef(str(path), strength, (stat.st_size, stat.st_mtime_ns))


def _weights(model_patcher) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()}


def stock_weights(stock, stack: list[tuple]) -> dict[str, torch.Tensor]:
    """The weights stock LoraLoaderModelOnly nodes chained on `stock` sample with (ComfyUI patches, then restores)."""
    import comfy.sd
    import comfy.utils

    model = stock
    for path, strength in stack:
        model = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True), strength, 0)[0]
    model.patch_model(device_to=torch.device("cpu"))
    try:
        return _weights(model)
    finally:
        model.unpatch_model()


def _diff_keys(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def chroma(comfy_root):
    """Chroma's layout (Flux's blocks without modulation layers), in-process at Flux-tiny width (its file is 2 GB): one
    copy as the shell the node checks, one resident with its MergedLoras, one as stock loads it."""
    from comfyui_xdit.lora_merge import MergedLoras
    from comfyui_xdit.testing.tiny_models import IN_PROCESS_PREFIX, load_tiny_model

    shell, resident, stock = (load_tiny_model(IN_PROCESS_PREFIX + "chroma") for _ in range(3))
    base = _weights(stock)
    return {"shapes": {k: tuple(v.shape) for k, v in base.items()}, "shell": shell, "merged": MergedLoras(resident),
            "resident": resident, "stock": stock, "base": base}


# (model fixture, format, how many weights the LoRA must change at least): Flux's full layout takes every format;
# Chroma (1 double, 1 single block) all but XLabs', whose keys ComfyUI maps for Flux's full layout only. A linear1_qkv
# file changes one weight per single block (38 and 1).
FORMAT_CASES = [("full", fmt, 38 if fmt == "linear1_qkv" else 100) for fmt in sorted(FORMATS)] + \
               [("chroma", fmt, 1 if fmt == "linear1_qkv" else 10) for fmt in sorted(FORMATS) if fmt != "xlabs"]


@pytest.mark.parametrize(("model", "fmt", "min_changed"), FORMAT_CASES)
def test_every_format_is_mapped_and_merged_exactly_like_stock(comfy_root, request, tmp_path, model, fmt, min_changed):
    from comfyui_xdit.lora import checked_lora, map_lora, read_shapes

    full = request.getfixturevalue(model)
    path = write_flux_lora(tmp_path / f"{fmt}.safetensors", full["shapes"], fmt, rank=4, seed=1)
    mapped = map_lora(full["shell"], read_shapes(path), path.name)
    assert mapped.unmatched == () and mapped.keys == len(load_file(str(path)))
    ref = checked_lora(full["shell"], str(path), STRENGTH)
    assert ref == _ref(path)

    full["merged"].apply((ref,))
    ours = _weights(full["resident"])
    stock = stock_weights(full["stock"], [(path, STRENGTH)])
    changed = _diff_keys(stock, {k: v for k, v in full["base"].items()})
    assert len(changed) >= min_changed, f"{fmt}: the LoRA changed only {len(changed)} weights"
    assert _diff_keys(ours, stock) == set(), f"{fmt}: merged weights differ from stock LoraLoaderModelOnly"
    assert full["merged"].last_keys_changed >= len(changed)
    full["merged"].apply(())
    assert _diff_keys(_weights(full["resident"]), full["base"]) == set(), "no LoRA gives the loaded weights back, bit for bit"


def test_a_switch_changes_only_the_weights_whose_loras_changed(full, tmp_path):
    a = write_flux_lora(tmp_path / "a.safetensors", full["shapes"], "kohya", rank=4, seed=1)
    single_only = {k: v for k, v in flux_lora(full["shapes"], "diffusers", rank=8, seed=2).items() if k.startswith("transformer.single_")}
    b = tmp_path / "b.safetensors"
    save_file(single_only, str(b))
    merged = full["merged"]

    merged.apply((_ref(a),))
    a_only = _weights(full["resident"])
    merged.apply((_ref(a), _ref(b, -0.6)))
    assert merged.last_keys_changed == 3 * 38, "adding B recomputes the single blocks' linear1, linear2, modulation only"
    assert _diff_keys(_weights(full["resident"]), stock_weights(full["stock"], [(a, STRENGTH), (b, -0.6)])) == set()
    merged.apply((_ref(a), _ref(b, 0.9)))
    assert merged.last_keys_changed == 3 * 38, "a strength change of B leaves A-only weights alone"
    assert _diff_keys(_weights(full["resident"]), stock_weights(full["stock"], [(a, STRENGTH), (b, 0.9)])) == set()
    merged.apply((_ref(a),))
    assert _diff_keys(_weights(full["resident"]), a_only) == set(), "A -> A+B -> A is A again, bit for bit"
    merged.apply((_ref(b, 0.9), _ref(a)))  # order matters to rounding, so it is part of what a weight holds
    assert _diff_keys(_weights(full["resident"]), stock_weights(full["stock"], [(b, 0.9), (a, STRENGTH)])) == set()
    merged.apply(())
    assert _diff_keys(_weights(full["resident"]), full["base"]) == set()


def test_keys_that_match_nothing_are_refused_with_counts_and_an_example(full, tmp_path):
    from comfyui_xdit.lora import checked_lora

    sdxl = {f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_{p}.lora_{d}.weight": torch.zeros(4, 4)
            for p in "qk" for d in ("up", "down")}
    path = tmp_path / "sdxl.safetensors"
    save_file(sdxl, str(path))
    with pytest.raises(UnsupportedByXDiT, match=r"none of its 4 keys match this Flux model \(0 of 4 matched; "
                                                r"e.g. 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight'\)"):
        checked_lora(full["shell"], str(path), 1.0)


def test_patches_that_do_not_fit_are_refused_with_the_weight_and_shapes(full, tmp_path):
    from comfyui_xdit.lora import checked_lora

    tensors = flux_lora(full["shapes"], "kohya", rank=4, seed=1)
    tensors["lora_unet_double_blocks_3_img_attn_proj.lora_down.weight"] = torch.zeros(4, 129)
    tensors["lora_unet_single_blocks_7_linear2.lora_up.weight"] = torch.zeros(130, 4)
    path = tmp_path / "misfit.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UnsupportedByXDiT, match=r"2 of its 304 weight patches do not fit this Flux model, e.g. "
                                                r"diffusion_model.double_blocks.3.img_attn.proj.weight of shape \(128, 128\) "
                                                r"cannot take lora tensors of shapes \[\(128, 4\), \(4, 129\)\]"):
        checked_lora(full["shell"], str(path), 1.0)


def test_a_partly_matching_lora_warns_and_keeps_what_matches(full, tmp_path, caplog):
    from comfyui_xdit.lora import checked_lora

    tensors = flux_lora(full["shapes"], "comfy", rank=4, seed=1)
    tensors["diffusion_model.double_blocks.42.img_attn.qkv.lora_up.weight"] = torch.zeros(384, 4)
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING):
        checked_lora(full["shell"], str(path), 1.0)
    assert f"{len(tensors) - 1} of {len(tensors)} keys match this Flux model; not applied, e.g. " \
           "'diffusion_model.double_blocks.42.img_attn.qkv.lora_up.weight'" in caplog.text


def test_adapters_whose_math_reads_values_are_checked_on_zeros(full, tmp_path):
    """OFT tests its blocks' norm against alpha, which meta tensors cannot answer: checked again on zeros."""
    from comfyui_xdit.lora import checked_lora

    name = "lora_unet_double_blocks_0_img_attn_proj"
    good = tmp_path / "oft.safetensors"
    save_file({f"{name}.oft_blocks": torch.randn(8, 16, 16) * 0.01, f"{name}.alpha": torch.tensor(0.5)}, str(good))
    ref = checked_lora(full["shell"], str(good), 1.0)
    full["merged"].apply((ref,))
    assert _diff_keys(_weights(full["resident"]), stock_weights(full["stock"], [(good, 1.0)])) == set()
    full["merged"].apply(())
    bad = tmp_path / "oft-misfit.safetensors"
    save_file({f"{name}.oft_blocks": torch.randn(5, 16, 16) * 0.01, f"{name}.alpha": torch.tensor(0.5)}, str(bad))
    with pytest.raises(UnsupportedByXDiT, match=r"1 of its 1 weight patches do not fit .* oft tensors of shapes \[\(5, 16, 16\)\]"):
        checked_lora(full["shell"], str(bad), 1.0)


def test_only_safetensors_files_are_read(full, tmp_path):
    from comfyui_xdit.lora import checked_lora

    path = tmp_path / "old.pt"
    torch.save({}, path)
    with pytest.raises(UnsupportedByXDiT, match="reads .safetensors files only"):
        checked_lora(full["shell"], str(path), 1.0)


def _sampling_inputs(model):
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = ModelSamplingFlux().patch(model, 1.15, 0.5, 128, 128)[0]
    guider = flux_cases._first(custom.CFGGuider.execute(model, flux_cases._conditioning(100), flux_cases._conditioning(200), 3.5))
    sigmas = flux_cases._first(custom.BasicScheduler.execute(model, "simple", 3, 1.0))
    sampler = flux_cases._first(custom.KSamplerSelect.execute("euler"))
    noise = flux_cases._first(custom.RandomNoise.execute(7))
    return guider, sampler, sigmas, noise, {"samples": torch.zeros(1, 16, 16, 16)}


def test_the_job_carries_the_stack_and_a_worker_samples_like_stock(comfy_root, tiny_flux_paths, tmp_path):
    """Two stacked LoRAs through build_job and run_job on a resident model: stock sampling, bit for bit."""
    import comfy.sd
    import comfy.utils
    from comfy_extras import nodes_custom_sampler as custom

    from comfyui_xdit.job import build_job, run_job
    from comfyui_xdit.lora import checked_lora, lora_stack, with_lora
    from comfyui_xdit.lora_merge import MergedLoras

    model_path = tiny_flux_paths["dev"]
    shapes = flux_shapes(model_path)
    loras = [(write_flux_lora(tmp_path / "a.safetensors", shapes, "loha", rank=4, seed=1), 0.8),
             (write_flux_lora(tmp_path / "b.safetensors", shapes, "lokr", rank=4, seed=2), -0.5)]
    stock = comfy.sd.load_diffusion_model(str(model_path))
    for path, strength in loras:
        stock = comfy.sd.load_lora_for_models(stock, None, comfy.utils.load_torch_file(str(path), safe_load=True), strength, 0)[0]
    g, smp, sigmas, noise, latent = _sampling_inputs(stock)
    expected = custom.SamplerCustomAdvanced.execute(noise, g, smp, sigmas, latent).result[0]["samples"]

    shell = _shell(model_path)
    for path, strength in loras:
        shell = with_lora(shell, checked_lora(shell, str(path), strength))
    g, smp, sigmas, noise, latent = _sampling_inputs(shell)
    assert len(lora_stack(g.model_patcher)) == 2, "the stack survives stock nodes' clones (ModelSamplingFlux)"
    job = build_job(g, smp, sigmas, noise.generate_noise(latent), latent["samples"], None, noise.seed)
    assert job.loras == tuple(_ref(p, s) for p, s in loras)

    resident = comfy.sd.load_diffusion_model(str(model_path))
    MergedLoras(resident).apply(job.loras)
    assert torch.equal(run_job(resident, job, lambda *args: None), expected)
