"""Row-parallel VAE decode (or encode) against stock VAEDecode and VAEDecodeTiled: time and peak memory per rank.

Prints JSON lines, one per configuration: stock `VAE.decode`, stock `VAE.decode_tiled` (VAEDecodeTiled's defaults:
512 px tiles, 64 px overlap), and vae_parallel.decode on 1, 2 and 4 gloo ranks (one thread each), all on the tiny
seeded Flux 16-channel VAE (testing/tiny_vae.py: the stock encoder, a 32-wide decoder) and one seeded latent; with
--vae wan21 on the tiny seeded Wan 2.1 video VAE (8 wide) and a latent of --frames frames (4 x frames - 3 video frames).
With --encode: stock `VAE.encode`, `VAE.encode_tiled` (VAEEncodeTiled's defaults) and vae_parallel.encode of one
seeded image of the same size instead.
Every configuration runs in fresh processes; a rank's peak resident memory during the decode (reset just before it,
Linux's /proc/self/clear_refs) minus its resident memory before it is what that decode needed. `max_abs_error` is against the stock decode.

`ideal_bytes_per_rank` is the stock decode's peak divided by the ranks: what a split costing nothing beyond 1/P
(halos, the gathered attention keys) would need. Each rank keeps only its own rows of the output, as on the pool,
where the caller joins them.

    python -m comfyui_xdit.bench.vae_decode --latent 128     # a 1024 x 1024 image
    python -m comfyui_xdit.bench.vae_decode --vae wan21 --latent 32 --frames 6   # 21 frames of 256 x 256
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from comfyui_xdit.vae_parallel import join_pieces
from parallel_core.local_launch import run_on_ranks

TILED_PIXELS, TILED_OVERLAP_PIXELS = 512, 64  # VAEDecodeTiled's defaults


VAES = {"flux": ("kl_vae", "flux"), "wan21": ("wan_vae", "wan21")}  # --vae: its tiny family and variant


def _inputs(vae, latent_rows: int, frames: int, encode: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    pixels = latent_rows * vae.spacial_compression_encode()
    if vae.latent_dim == 3:
        if encode:
            return torch.rand((4 * frames - 3, pixels, pixels, 3), generator=generator)
        return torch.randn((1, vae.latent_channels, frames, latent_rows, latent_rows), generator=generator)
    if encode:
        return torch.rand((1, pixels, pixels, 3), generator=generator)
    return torch.randn((1, vae.latent_channels, latent_rows, latent_rows), generator=generator)


def _rank(rank: int, world: int, path: str, latent_rows: int, frames: int, method: str, encode: bool) -> dict:
    import psutil

    from comfyui_xdit.comfy_runtime import import_comfy
    from parallel_core.spatial_conv import RowGroup

    import_comfy()
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    x = _inputs(vae, latent_rows, frames, encode)
    before = psutil.Process().memory_info().rss
    _reset_peak_rss()  # loading the file peaked higher than the decode may
    started = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI runs every node
        image = (_encode if encode else _decode)(vae, x, method, RowGroup(rank, world))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_delta_bytes": max(0, _peak_rss() - before), "image": image}


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # Linux: "5" resets the peak resident set size
        handle.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _decode(vae, latent: torch.Tensor, method: str, rows) -> torch.Tensor | None:
    from comfyui_xdit import vae_parallel

    if method == "stock":
        return vae.decode(latent)
    if method == "tiled":
        ratio = vae.spacial_compression_decode()
        return vae.decode_tiled(latent, tile_x=TILED_PIXELS // ratio, tile_y=TILED_PIXELS // ratio,
                                overlap=TILED_OVERLAP_PIXELS // ratio)
    return vae_parallel.decode(vae, latent, rows)


def _encode(vae, pixels: torch.Tensor, method: str, rows) -> torch.Tensor | None:
    from comfyui_xdit import vae_parallel

    if method == "stock":
        return vae.encode(pixels)
    if method == "tiled":
        return vae.encode_tiled(pixels, tile_x=TILED_PIXELS, tile_y=TILED_PIXELS, overlap=TILED_OVERLAP_PIXELS)
    return vae_parallel.encode(vae, pixels, rows)


def measure(path: str, vae_name: str, latent_rows: int, frames: int, method: str, world: int, encode: bool) -> dict:
    results = run_on_ranks(_rank, world, path, latent_rows, frames, method, encode, timeout_s=3600)
    video = vae_name == "wan21"
    return {"vae": vae_name, "kind": "encode" if encode else "decode", "method": method, "world_size": world,
            "latent": ([frames] if video else []) + [latent_rows, latent_rows],
            "image_pixels": ([4 * frames - 3] if video else []) + [latent_rows * 8, latent_rows * 8],
            "seconds": max(r["seconds"] for r in results),
            "peak_delta_bytes_per_rank": [r["peak_delta_bytes"] for r in results],
            "image": results[0]["image"] if method != "row_parallel" else join_pieces("encode" if encode else "decode", [r["image"] for r in results])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=128, help="latent rows and columns (the image is 8x that)")
    parser.add_argument("--worlds", default="1,2,4", help="rank counts for the row-parallel decode")
    parser.add_argument("--encode", action="store_true", help="measure encoding an image of that size instead")
    parser.add_argument("--vae", choices=sorted(VAES), default="flux", help="the tiny seeded VAE")
    parser.add_argument("--frames", type=int, default=6, help="latent frames for a video VAE (4 x frames - 3 video frames)")
    args = parser.parse_args(argv)
    from comfyui_xdit.comfy_runtime import import_comfy
    from comfyui_xdit.testing.tiny_models import write_tiny_model

    import_comfy()
    family, variant = VAES[args.vae]
    with tempfile.TemporaryDirectory() as folder:
        path = str(write_tiny_model(family, Path(folder) / f"{args.vae}.safetensors", variant=variant))
        configs = [("stock", 1), ("tiled", 1)] + [("row_parallel", int(w)) for w in args.worlds.split(",")]
        reference, stock_peak = None, None
        for method, world in configs:
            row = measure(path, args.vae, args.latent, args.frames, method, world, args.encode)
            image = row.pop("image")
            if reference is None:
                reference, stock_peak = image, row["peak_delta_bytes_per_rank"][0]
            row["max_abs_error"] = (image - reference).abs().max().item()
            if method == "row_parallel":
                row["ideal_bytes_per_rank"] = stock_peak // world
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
