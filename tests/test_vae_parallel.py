"""Row-parallel VAE decode/encode on real gloo ranks equals stock VAE.decode/VAE.encode (tiny seeded VAEs that the
stock loader detects: the Flux 16-channel, the SDXL 4-channel and the Flux.2 128-channel AutoencoderKL, the Wan 2.1
video VAE; the Wan 2.2 video VAE built in-process, as no tiny file can be detected as it).

Cases cover rows that do not divide by the ranks, a single latent row per rank, batch 2, pixels cropped to the
downscale factor, a latent too short to split (decoded by rank 0 alone), and video: several latent frames (the
causal cache carried from chunk to chunk on each rank), images encoded as the frames of one clip.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel_core.local_launch import run_on_ranks
from parallel_core.spatial_conv import RowGroup, group_norm, halo_exchange, split_rows

TOLERANCE = 1e-5  # of the output's scale: the largest magnitude in the stock result, at least 1


def _cases(world: int) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(variant, "decode"/"encode", latent or pixel shape, seed)."""
    return [
        ("flux", "decode", (1, 16, 5, 6), 1),  # 5 rows: uneven at 2 and 4 ranks (one row on some)
        ("flux", "decode", (2, 16, world, 3), 2),  # one row per rank, batch 2
        ("flux", "decode", (1, 16, world - 1, 4), 3),  # too short to split: rank 0 alone
        ("sdxl", "decode", (1, 4, 7, 5), 4),
        ("flux", "encode", (1, 8 * 5 + 3, 8 * 6 + 5, 3), 5),  # cropped to 40 x 48 by the stock code
        ("sdxl", "encode", (2, 8 * world, 40, 3), 6),  # one latent row per rank, batch 2
        ("sdxl", "encode", (1, 8 * (world - 1) + 3, 24, 3), 7),  # too short to split: rank 0 alone
        ("flux2", "decode", (1, 128, 5, 4), 8),  # Flux.2: 2x2-packed latent rows
        ("flux2", "encode", (1, 16 * 5, 32, 3), 9),  # bands of whole 16-pixel latent rows
        ("wan21", "decode", (1, 16, 2, 5, 6), 10),  # 2 latent frames: 5 video frames in 2 cached chunks
        ("wan21", "encode", (5, 8 * 5 + 3, 8 * 6 + 2, 3), 11),  # 5 images as frames: 3 chunks, cropped
        ("wan22", "decode", (1, 48, 2, 5, 4), 12),
        ("wan22", "encode", (5, 16 * 5, 16 * 2 + 5, 3), 13),
    ]


def _inputs(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) if kind == "decode" else torch.rand(shape, generator=generator)


def _load_vae(path: str):
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    return comfy.sd.VAE(sd=sd, metadata=metadata)


def _load_vaes(paths: dict[str, str]) -> dict:
    from comfyui_xdit.testing.tiny_vae import tiny_wan22_vae

    return {**{variant: _load_vae(path) for variant, path in paths.items()}, "wan22": tiny_wan22_vae(seed=0)}


def _vae_rank(rank: int, world: int, paths: dict[str, str]) -> list:
    from comfyui_xdit import vae_parallel
    from comfyui_xdit.comfy_runtime import import_comfy

    import_comfy()
    vaes = _load_vaes(paths)
    rows = RowGroup(rank, world)
    results = []
    for variant, kind, shape, seed in _cases(world):
        run = vae_parallel.decode if kind == "decode" else vae_parallel.encode
        results.append(run(vaes[variant], _inputs(kind, shape, seed), rows))
    return results


@pytest.fixture(scope="module")
def vae_paths(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from comfyui_xdit.testing.tiny_models import write_tiny_model

    folder = tmp_path_factory.mktemp("kl_vae")
    return {variant: str(write_tiny_model("kl_vae", folder / f"{variant}.safetensors", variant=variant))
            for variant in ("flux", "sdxl", "flux2")} | {
        "wan21": str(write_tiny_model("wan_vae", folder / "wan21.safetensors"))}


def test_stock_loader_detects_the_tiny_vaes(vae_paths: dict[str, str]) -> None:
    import comfy.ldm.models.autoencoder as autoencoder
    from comfy.ldm.wan.vae import WanVAE

    flux, sdxl, flux2 = (_load_vae(vae_paths[variant]) for variant in ("flux", "sdxl", "flux2"))
    assert type(flux.first_stage_model) is autoencoder.AutoencodingEngine and flux.latent_channels == 16
    assert type(sdxl.first_stage_model) is autoencoder.AutoencoderKL and sdxl.latent_channels == 4
    assert flux2.first_stage_model.bn is not None and flux2.latent_channels == 128 and flux2.downscale_ratio == 16
    image = flux.decode(torch.randn((1, 16, 4, 4), generator=torch.Generator().manual_seed(0)))
    clamped = ((image == 0) | (image == 1)).float().mean().item()
    assert image.shape == (1, 32, 32, 3) and image.std() > 0.05 and clamped < 0.1
    wan = _load_vae(vae_paths["wan21"])
    assert type(wan.first_stage_model) is WanVAE and wan.latent_channels == 16 and wan.latent_dim == 3
    video = wan.decode(torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(0)))
    clamped = ((video == 0) | (video == 1)).float().mean().item()
    assert video.shape == (1, 5, 32, 32, 3) and video.std() > 0.05 and clamped < 0.1


@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_vae_equals_stock(vae_paths: dict[str, str], world: int) -> None:
    from comfyui_xdit import vae_parallel

    results = run_on_ranks(_vae_rank, world, vae_paths, timeout_s=900)
    vaes = _load_vaes(vae_paths)
    errors = {}
    for index, (variant, kind, shape, seed) in enumerate(_cases(world)):
        vae = vaes[variant]
        x = _inputs(kind, shape, seed)
        expected = vae.decode(x) if kind == "decode" else vae.encode(x)
        pieces = [r[index] for r in results]
        got = vae_parallel.join_pieces(kind, pieces)
        assert got.shape == expected.shape, (variant, kind, shape)
        # No rank holds the whole output: each returns only its own rows (rank 0 alone a latent too short to split).
        rows_dim = vae_parallel.ROWS_DIM[kind]
        held = [0 if piece is None else piece.shape[rows_dim] for piece in pieces]
        assert held == [expected.shape[rows_dim]] + [0] * (world - 1) or max(held) < expected.shape[rows_dim], held
        scale = max(1.0, expected.abs().max().item())
        errors[(variant, kind, shape)] = ((got - expected).abs().max().item(), scale)
    print(f"world {world} (max abs error, output scale):", errors)
    assert all(error <= TOLERANCE * scale for error, scale in errors.values()), errors


def test_other_vaes_are_refused_by_name(comfy_root: Path) -> None:
    import comfy.sd

    from comfyui_xdit import vae_parallel
    from comfyui_xdit.testing.tiny_vae import build_taef1

    halves = build_taef1(seed=0)
    sd = {f"taesd_{part}.{key}": value for part, module in halves.items() for key, value in module.state_dict().items()}
    taesd = comfy.sd.VAE(sd=sd)
    assert "TAESD" in vae_parallel.unsupported_reason(taesd)
    with pytest.raises(ValueError, match=r"cannot decode in parallel: its model is TAESD; row-parallel VAE supports .* Wan 2.1 / Wan 2.2 video VAEs"):
        vae_parallel.decode(taesd, torch.zeros((1, 16, 4, 4)), RowGroup(0, 1))


def test_bad_video_inputs_are_refused_naming_what_to_change(vae_paths: dict[str, str]) -> None:
    """Refused before any work (no process group exists here: a split would fail differently)."""
    from comfyui_xdit import vae_parallel
    from comfyui_xdit.testing.tiny_vae import tiny_wan22_vae

    wan21, wan22 = _load_vae(vae_paths["wan21"]), tiny_wan22_vae(seed=0)
    rows = RowGroup(0, 2)
    with pytest.raises(ValueError, match=r"samples is a 4-D latent \(1, 16, 4, 4\), but the Wan 2.1 VAE is a video VAE: "
                                         r"it decodes \(batch, channels, frames, rows, columns\) latents"):
        vae_parallel.decode(wan21, torch.zeros((1, 16, 4, 4)), rows)
    with pytest.raises(ValueError, match=r"samples has 16 channels, but the Wan 2.2 VAE decodes latents of 48: load the VAE"):
        vae_parallel.decode(wan22, torch.zeros((1, 16, 2, 4, 4)), rows)
    with pytest.raises(ValueError, match=r"pixels of 12 x 40 are smaller than one latent pixel of the Wan 2.2 VAE "
                                         r"\(16 x 16\): give it an image of at least 16 x 16"):
        vae_parallel.encode(wan22, torch.zeros((3, 12, 40, 3)), rows)
    with pytest.raises(ValueError, match=r"the Wan 2.1 VAE encodes clips of 1 \+ 4k frames \(1, 5, 9, ...\), but pixels has 7: "
                                         r"give it 5 or 9 frames \(stock VAE Encode would drop the last 2 without a word\)"):
        vae_parallel.encode(wan21, torch.zeros((7, 16, 16, 3)), rows)


def _rank_ops(rank: int, world: int) -> dict[str, float]:
    torch.manual_seed(0)
    whole = torch.randn(2, 6, 11, 5) * 3 + 2  # a mean well off zero, as after a residual stack
    weight, bias = torch.randn(6), torch.randn(6)
    start, stop = split_rows(11, world)[rank]
    rows = RowGroup(rank, world)
    band = whole[..., start:stop, :]
    normed = group_norm(band, 3, weight, bias, 1e-6, rows)
    expected_norm = torch.nn.functional.group_norm(whole, 3, weight, bias, 1e-6)[..., start:stop, :]
    haloed = halo_exchange(band, 1, 2, rows)
    padded = torch.nn.functional.pad(whole, (0, 0, 1, 2))
    return {"norm": (normed - expected_norm).abs().max().item(),
            "halo": (haloed - padded[..., start:stop + 3, :]).abs().max().item()}


@pytest.mark.fast
def test_halo_and_group_norm_match_whole_image_ops() -> None:
    for errors in run_on_ranks(_rank_ops, 3):
        assert errors["halo"] == 0
        assert errors["norm"] <= 2e-6, errors


@pytest.mark.fast
def test_split_rows() -> None:
    assert split_rows(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split_rows(40, 2, multiple=8) == [(0, 24), (24, 40)]
    with pytest.raises(ValueError, match="fewer than the 4 parts"):
        split_rows(3, 4)
    with pytest.raises(ValueError, match="units of 8"):
        split_rows(12, 2, multiple=8)
