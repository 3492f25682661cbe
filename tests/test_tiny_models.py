"""Tiny Flux checkpoints: written by the CLI, loaded and detected by ComfyUI's own loader, seeded, non-trivial."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_xdit.testing.tiny_models import build_flux, check_flux_detectable, flux_config, write_tiny_flux

EXPECTED_CLASS = {"dev": "Flux", "schnell": "FluxSchnell"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path))


def _inputs(batch: int = 2, latent: int = 16, tokens: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    config = flux_config()
    return {
        "x": torch.randn(batch, config["in_channels"], latent, latent, generator=generator),
        "timestep": torch.full((batch,), 0.7),
        "context": torch.randn(batch, tokens, config["context_in_dim"], generator=generator),
        "y": torch.randn(batch, config["vec_in_dim"], generator=generator),
    }


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_cli_model_is_detected_as_flux(tiny_flux_paths: dict[str, Path], variant: str) -> None:
    import comfy.model_patcher

    patcher = _load(tiny_flux_paths[variant])
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    model_config = patcher.model.model_config
    assert type(model_config).__name__ == EXPECTED_CLASS[variant]
    unet_config = model_config.unet_config
    assert unet_config["image_model"] == "flux"
    assert unet_config["guidance_embed"] is (variant == "dev")
    for key, value in flux_config(variant).items():
        assert unet_config[key] == value, key


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_weights_round_trip_bit_exactly(tiny_flux_paths: dict[str, Path], variant: str) -> None:
    saved = load_file(tiny_flux_paths[variant])
    loaded = _load(tiny_flux_paths[variant]).model.diffusion_model.state_dict()
    assert saved.keys() == loaded.keys()
    for key, tensor in saved.items():
        assert tensor.dtype == loaded[key].dtype == torch.float32, key
        assert torch.equal(tensor, loaded[key]), key


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_seed_decides_file_contents(tiny_flux_paths: dict[str, Path], tmp_path: Path, variant: str) -> None:
    # The in-process API and the CLI write the same bytes for the same arguments.
    same = write_tiny_flux(tmp_path / "same.safetensors", variant=variant, seed=0)
    assert _sha256(same) == _sha256(tiny_flux_paths[variant])
    other = write_tiny_flux(tmp_path / "other.safetensors", variant=variant, seed=1)
    assert _sha256(other) != _sha256(same)
    assert not torch.equal(load_file(other)["img_in.weight"], load_file(same)["img_in.weight"])


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_forward_gives_order_one_output(tiny_flux_paths: dict[str, Path], variant: str) -> None:
    model = _load(tiny_flux_paths[variant]).model.diffusion_model
    inputs = _inputs()
    guidance = torch.full((2,), 3.5) if variant == "dev" else None
    with torch.no_grad():
        out = model(inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], guidance)
    assert out.shape == inputs["x"].shape
    assert torch.isfinite(out).all()
    assert 0.1 < out.std().item() < 10
    assert not torch.allclose(out[0], out[1])  # each sample's own input matters


def test_output_depends_on_every_parameter(comfy_root: Path) -> None:
    # Zero-initialised gates or final layers would hide whole blocks from later exactness tests. (Perturbation, not
    # autograd: ComfyUI's rope kernel has no backward.)
    model = build_flux(flux_config("dev"), seed=0)
    inputs = _inputs(batch=1, latent=8, tokens=4)  # 52 forwards: keep each one small
    guidance = torch.full((1,), 3.5)
    generator = torch.Generator().manual_seed(0)

    def forward() -> torch.Tensor:
        return model(inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], guidance)

    dead = []
    with torch.no_grad():
        reference = forward()
        for name, parameter in model.named_parameters():
            original = parameter.clone()
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            if (forward() - reference).abs().max() < 1e-5:
                dead.append(name)
            parameter.copy_(original)
    assert not dead


def test_configs() -> None:
    bench = flux_config("dev", "bench")
    assert (bench["hidden_size"], bench["num_heads"], bench["depth"], bench["depth_single_blocks"]) == (768, 6, 2, 4)
    assert flux_config("schnell", hidden_size=512)["num_heads"] == 4  # head dim stays 128
    check_flux_detectable(bench)
    with pytest.raises(ValueError, match="num_heads"):
        check_flux_detectable(flux_config(num_heads=4))
    with pytest.raises(ValueError, match="theta"):
        check_flux_detectable(flux_config(theta=256))
    with pytest.raises(ValueError, match="global_modulation"):
        check_flux_detectable(flux_config(global_modulation=True))
    with pytest.raises(ValueError, match="unknown flux variant"):
        flux_config("pro")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        write_tiny_flux("model.pt")


def test_undetectable_configs_still_build(comfy_root: Path) -> None:
    # Parallelism tests need more heads than ComfyUI's 128-wide detection allows; the module itself is fine.
    model = build_flux(flux_config(num_heads=4, axes_dim=[8, 28, 28]), seed=0)
    inputs = _inputs(batch=1)
    with torch.no_grad():
        out = model(inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], torch.full((1,), 3.5))
    assert torch.isfinite(out).all()


def test_cli_rejects_bad_arguments(run_cli, tmp_path: Path) -> None:
    result = run_cli("make-tiny-model", "--variant", "pro", "--out", str(tmp_path / "x.safetensors"))
    assert result.returncode == 2
    assert "unknown flux variant 'pro'" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
    result = run_cli("make-tiny-model", "--family", "sd3", "--variant", "sd4", "--out", str(tmp_path / "y.safetensors"))
    assert result.returncode == 2
    assert "unknown sd3 variant/size 'sd4'/'tiny'; choose from ['sd3', 'sd35']" in result.stderr
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize(("family", "model_class", "config_class"), [("flux2", "Flux2", "Flux2"), ("sd15", "BaseModel", "SD15"),
                                                                  ("sdxl", "SDXL", "SDXL"), ("sd3", "SD3", "SD3"), ("sd35", "SD3", "SD3"),
                                                                  ("qwen_image", "QwenImage", "QwenImage"),
                                                                  ("wan21", "WAN21", "WAN21_T2V"), ("wan21_i2v", "WAN21", "WAN21_I2V"),
                                                                  ("wan22_5b", "WAN22", "WAN22_T2V"), ("wan22_a14b_i2v", "WAN21", "WAN21_T2V"),
                                                                  ("lumina2", "Lumina2", "Lumina2"),
                                                                  ("chroma", "Chroma", "Chroma"),
                                                                  ("hunyuan_video", "HunyuanVideo", "HunyuanVideo"),
                                                                  ("hunyuan_video15", "HunyuanVideo15", "HunyuanVideo15"),
                                                                  ("ltxv", "LTXV", "LTXV"), ("cogvideox", "CogVideoX", "CogVideoX_T2V")])
def test_other_families_are_detected_as_themselves_and_round_trip(tiny_model_path, family: str, model_class: str,
                                                                  config_class: str) -> None:
    path = tiny_model_path(family)
    patcher = _load(path)
    assert type(patcher.model).__name__ == model_class
    assert type(patcher.model.model_config).__name__ == config_class
    saved, loaded = load_file(path), patcher.model.diffusion_model.state_dict()
    assert saved.keys() == loaded.keys()
    # Width-fixed families are stored in bf16 (tiny_models.WIDTH_FIXED_STORAGE); ComfyUI loads every file into fp32 here.
    assert all(loaded[key].dtype == torch.float32 and torch.equal(tensor.to(torch.float32), loaded[key])
               for key, tensor in saved.items() if tensor.is_floating_point())
    assert all(tensor.abs().max() > 0 for tensor in saved.values()), "every tensor is seeded, none left at zero"


@pytest.mark.parametrize(("family", "qk_norm", "dual_attention_blocks"), [("sd3", None, []), ("sd35", "rms", [0])])
def test_sd3_files_load_with_their_block_layout(tiny_model_path, family: str, qk_norm, dual_attention_blocks) -> None:
    """SD3.5's layout (RMS q/k norms, an image-only second attention in its first block) is read back from the file."""
    patcher = _load(tiny_model_path(family))
    unet_config = patcher.model.model_config.unet_config
    assert unet_config.get("qk_norm") == qk_norm
    assert unet_config["x_block_self_attn_layers"] == dual_attention_blocks
    blocks = patcher.model.diffusion_model.joint_blocks
    assert [i for i, block in enumerate(blocks) if block.x_block.x_block_self_attn] == dual_attention_blocks
