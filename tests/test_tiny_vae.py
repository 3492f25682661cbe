"""Tiny TAEF1: the stock VAELoader finds it as "taef1" and the stock VAEDecode turns a Flux latent into a picture."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from comfyui_xdit.testing.tiny_models import write_tiny_model
from comfyui_xdit.testing.tiny_vae import taef1_files, write_tiny_taef1


@pytest.fixture(scope="module")
def taef1_dir(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model("taef1", tmp_path_factory.mktemp("vae_approx"), seed=0)


@pytest.fixture(scope="module")
def stock_vae(taef1_dir: Path):
    import folder_paths

    import nodes  # ComfyUI's nodes.py: import_comfy put ComfyUI first on sys.path

    folder_paths.add_model_folder_path("vae_approx", str(taef1_dir))
    assert "taef1" in nodes.VAELoader.vae_list(nodes.VAELoader)
    return nodes.VAELoader().load_vae("taef1")[0]


def test_stock_loader_builds_taesd_for_flux(stock_vae) -> None:
    import comfy.taesd.taesd

    model = stock_vae.first_stage_model
    assert isinstance(model, comfy.taesd.taesd.TAESD)
    assert stock_vae.latent_channels == 16
    # VAELoader adds Flux's latent scale and shift for "taef1" itself.
    assert model.vae_scale.item() == pytest.approx(0.3611)
    assert model.vae_shift.item() == pytest.approx(0.1159)


def test_stock_decode_gives_a_real_image(stock_vae) -> None:
    import nodes

    latent = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(3))
    image = nodes.VAEDecode().decode(stock_vae, {"samples": latent})[0]
    assert image.shape == (1, 128, 128, 3)
    assert torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1
    # Structure, not a flat or saturated field: spread in every channel and few clamped pixels.
    assert (image.std(dim=(0, 1, 2)) > 0.05).all()
    clamped = ((image == 0) | (image == 1)).float().mean().item()
    assert clamped < 0.2
    # The picture follows the latent.
    other = nodes.VAEDecode().decode(stock_vae, {"samples": latent.flip(-1)})[0]
    assert (image - other).abs().mean() > 0.01


def test_seed_decides_files(taef1_dir: Path, tmp_path: Path) -> None:
    def digests(folder: Path) -> list[str]:
        return [hashlib.sha256(path.read_bytes()).hexdigest() for path in taef1_files(folder).values()]

    assert digests(write_tiny_taef1(tmp_path / "same", seed=0)) == digests(taef1_dir)
    assert digests(write_tiny_taef1(tmp_path / "other", seed=1)) != digests(taef1_dir)


def test_refuses_a_file_path_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="folder"):
        write_tiny_taef1(tmp_path / "taef1.safetensors")
    with pytest.raises(ValueError, match="no config overrides"):
        write_tiny_model("taef1", tmp_path, depth=3)
    # Detection fixes the Wan 2.2 VAE's width: its one size is refused by name before anything is drawn.
    with pytest.raises(ValueError, match="detection fixes its width"):
        write_tiny_model("wan22_vae", tmp_path / "wan22.safetensors", size="bench")
