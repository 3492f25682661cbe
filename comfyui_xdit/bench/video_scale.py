"""Video at scale: step time and activation memory per rank of Wan's sequence parallel against tokens and ranks.

    python -m comfyui_xdit.bench.video_scale [--frames 5,11,21,42] [--worlds 1,2,4] [--budget-mb 0]

Prints one JSON line per (world size, clip length) and one "scale" line per world size on stdout; progress on stderr.

Method
- Model: ComfyUI's own WanModel (comfy.supported_models.WAN21_T2V.get_model, the stock forward), built in-process at a
  small width (tiny_models.in_process_patcher: seeded, detection bypassed), so tens of thousands of tokens run on CPU:
  by default 2 heads of Wan's 128 channels (width 256, FFN 4x), one block. The width matters for the memory figures:
  the sampler's latent-sized tensors (16 channels x 4 pixels = 64 floats a token, a few copies, on every rank) stay
  whole, so at a width near 64 they, not the blocks, would dominate; real Wan is 1536 or 5120 wide.
  The token grid is Wan's at 480p: a 60 x 104 latent (832 x 480 pixels) patchified 2 x 2 into 30 x 52 = 1560 tokens
  per latent frame; 5, 11, 21 and 42 latent frames (17, 41, 81 and 165 video frames) give 7.8k, 17k, 33k and 66k
  tokens, the counts issue 13 names. umT5-wide stand-in text (512 rows); cross-attention to it needs no communication.
- Methods: world 1 is the stock model (ComfyUI's PyTorch SDPA attention, --use-pytorch-cross-attention, the kernel
  the parallel ranks run too; ComfyUI's default on CPU materialises attention scores); world P runs the Wan adapter (families/wan.py) with Ulysses over as many ranks as
  the heads allow and Ring over the rest, as the loader's auto degrees pick. Ranks are local gloo processes with
  `--threads` torch threads each (1 by default).
- One sampling step (SamplerCustomAdvanced, BasicGuider, euler): one forward. `step_s` is the slowest rank's wall time
  for the step (median over `--repeats`); `speedup_vs_1` divides world 1's by it.
- Memory: before the step each rank resets its peak resident set (Linux /proc/self/clear_refs "5") and reads its
  resident set; `activation_mb` is the rise of the peak over that during the step (max over ranks): what the forward
  allocates beyond the resident model, inputs and imports. `peak_rss_mb` is the absolute peak.
- Bytes: what each rank recorded on `state.comm` during the step against theory: per self-attention call
  attention.theoretical_bytes (Ulysses' all-to-alls, Ring's K/V passes) and the gather of the head's output,
  ceil(S/P) x (16 channels x 2 x 2 patch pixels) x 4 x (P - 1).
- Scale: the longest clip whose activation peak per rank stays within a budget (`--budget-mb`; 0 = world 1's peak
  at the second-longest clip), measured, and extrapolated by a least-squares line of activation against tokens for
  each world (stated as such). The goal is that it grows about linearly with the ranks.
- The machine may be shared: `loadavg_1m` is recorded beside every time; memory figures do not depend on load.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from comfyui_xdit.bench.attention import theoretical_bytes
from comfyui_xdit.bench.flux_step import import_comfy_on_rank
from parallel_core.local_launch import run_on_ranks

ELT = 4  # fp32
LATENT_ROWS, LATENT_COLS = 60, 104  # Wan at 832 x 480: the VAE divides by 8
PATCH = 2
HEAD_FEATURES = 16 * PATCH * PATCH  # what Wan's head gives a token (latent channels x patch pixels): all that is gathered
TEXT_ROWS = 512  # umT5 context ComfyUI pads Wan's prompt to


def wan_config(dim: int, heads: int, layers: int) -> dict:
    from comfyui_xdit.testing.tiny_models import WAN_BASE, WAN_VARIANTS

    return {**WAN_BASE, **WAN_VARIANTS["t2v"][0], "dim": dim, "ffn_dim": dim * 4, "num_heads": heads, "num_layers": layers}


def tokens_for(frames: int) -> int:
    return frames * (LATENT_ROWS // PATCH) * (LATENT_COLS // PATCH)


def degrees_for(world: int, heads: int) -> dict[str, int]:
    """The loader's auto split: as much Ulysses as divides the heads, Ring for the rest."""
    ulysses = max(u for u in range(1, world + 1) if world % u == 0 and heads % u == 0)
    return {"ulysses_degree": ulysses, "ring_degree": world // ulysses}


def theoretical_step_bytes(world: int, heads: int, dim: int, layers: int, frames: int) -> int:
    if world == 1:
        return 0
    degrees = degrees_for(world, heads)
    tokens = tokens_for(frames)
    attention = theoretical_bytes(1, tokens, heads, dim // heads, ELT, degrees["ulysses_degree"], degrees["ring_degree"])
    return layers * attention + -(-tokens // world) * HEAD_FEATURES * ELT * (world - 1)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _exact_rss_allocator() -> None:
    """Make the resident set track live tensors: glibc serves every allocation over 128 kB by mmap (a fixed threshold
    also stops it raising the threshold after frees), so freed activations leave the resident set at once."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def _trim_heap() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _step(model_patcher, frames: int, text_width: int, pooled_width: int) -> None:
    from comfy_extras import nodes_custom_sampler as custom

    from comfyui_xdit.testing.tiny_models import stand_in_conditioning

    guider = custom.BasicGuider.execute(model_patcher, stand_in_conditioning(100, TEXT_ROWS, context_dim=text_width, pooled_dim=pooled_width)).result[0]
    sigmas = custom.BasicScheduler.execute(model_patcher, "simple", 1, 1.0).result[0]
    sampler = custom.KSamplerSelect.execute("euler").result[0]
    noise = custom.RandomNoise.execute(0).result[0]
    latent = {"samples": torch.zeros(1, 16, frames, LATENT_ROWS, LATENT_COLS)}
    custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)


def rank_main(rank: int, world: int, frames_list: list[int], dim: int, heads: int, layers: int, repeats: int) -> list[dict]:
    import_comfy_on_rank("pytorch")  # world 1 then runs the same SDPA kernel as the parallel ranks
    _exact_rss_allocator()
    from comfyui_xdit.testing.tiny_models import conditioning_widths, in_process_patcher

    model = in_process_patcher("WAN21_T2V", wan_config(dim, heads, layers), seed=0, output_layer="head.head")
    state = None
    if world > 1:
        from comfyui_xdit.parallel_model import parallelize
        from parallel_core import ParallelConfig, init_parallel

        state = init_parallel(ParallelConfig(**degrees_for(world, heads)))
        model = parallelize(model, state)
    text_width, pooled_width = conditioning_widths(model.model)
    _step(model, 1, text_width, pooled_width)  # warm-up: first-call allocations and lazy imports stay out of the figures
    rows = []
    for frames in frames_list:
        times, activations, peaks, sent = [], [], [], 0
        for _ in range(repeats):
            gc.collect()
            _trim_heap()
            if state is not None:
                state.comm.reset()
                torch.distributed.barrier()
            before = _proc_status_kb("VmRSS")
            _reset_peak_rss()
            started = time.perf_counter()
            _step(model, frames, text_width, pooled_width)
            times.append(time.perf_counter() - started)
            peak = _proc_status_kb("VmHWM")
            activations.append((peak - before) / 1024)
            peaks.append(peak / 1024)
            if state is not None:
                sent = sum(state.comm.snapshot().values())
        rows.append({"frames": frames, "times": times, "activation_mb": max(activations), "peak_rss_mb": max(peaks), "bytes": sent})
        print(f"  world {world} rank {rank}: {frames} frames {statistics.median(times):.2f} s, "
              f"+{max(activations):.0f} MB", file=sys.stderr, flush=True)
    return rows


def _fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of activation MB against tokens."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="5,11,21", help="latent frames, comma-separated (5,11,21,42 = 7.8k..66k tokens)")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--dim", type=int, default=256, help="model width (default 256: 2 heads of Wan's 128 channels)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--budget-mb", type=float, default=0.0, help="activation budget per rank for the scale line (0 = see doc)")
    args = parser.parse_args(argv)
    frames_list = [int(f) for f in args.frames.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    results: dict[int, list[dict]] = {}
    for world in worlds:
        print(f"world {world} ...", file=sys.stderr, flush=True)
        per_rank = run_on_ranks(rank_main, world, frames_list, args.dim, args.heads, args.layers, args.repeats,
                                threads_per_rank=args.threads, timeout_s=7200)
        load = os.getloadavg()[0]
        rows = []
        for index, frames in enumerate(frames_list):
            ranks = [r[index] for r in per_rank]
            step_s = statistics.median(max(r["times"][i] for r in ranks) for i in range(args.repeats))
            rows.append({"bench": "video_scale", "method": "single" if world == 1 else
                         "+".join(f"{k.split('_')[0]}{v}" for k, v in degrees_for(world, args.heads).items() if v > 1),
                         "world_size": world, "frames": frames, "tokens": tokens_for(frames),
                         "latent": [1, 16, frames, LATENT_ROWS, LATENT_COLS], "dim": args.dim, "heads": args.heads,
                         "layers": args.layers, "threads": args.threads, "step_s": round(step_s, 3),
                         "activation_mb": round(max(r["activation_mb"] for r in ranks), 1),
                         "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ranks), 1),
                         "bytes_per_rank": max(r["bytes"] for r in ranks),
                         "theory_bytes": theoretical_step_bytes(world, args.heads, args.dim, args.layers, frames),
                         "loadavg_1m": round(load, 1)})
        results[world] = rows
    single = {row["frames"]: row["step_s"] for row in results.get(1, [])}
    for world in worlds:
        for row in results[world]:
            if row["frames"] in single:
                row["speedup_vs_1"] = round(single[row["frames"]] / row["step_s"], 3)
            print(json.dumps(row), flush=True)
    budget = args.budget_mb
    if not budget and 1 in results and len(frames_list) >= 2:
        budget = results[1][-2]["activation_mb"]
    for world in worlds:
        rows = results[world]
        fitting = [row for row in rows if row["activation_mb"] <= budget]
        fit = _fit([(row["tokens"], row["activation_mb"]) for row in rows])
        extrapolated = int((budget - fit[0]) / fit[1]) if fit and fit[1] > 0 else None
        print(json.dumps({"bench": "video_scale", "scale": True, "world_size": world, "budget_mb": round(budget, 1),
                          "longest_measured_tokens": max((row["tokens"] for row in fitting), default=0),
                          "longest_measured_frames": max((row["frames"] for row in fitting), default=0),
                          "fitted_mb_per_1k_tokens": round(fit[1] * 1000, 3) if fit else None,
                          "fitted_fixed_mb": round(fit[0], 1) if fit else None,
                          "longest_fitted_tokens": extrapolated,
                          "longest_fitted_latent_frames": extrapolated // tokens_for(1) if extrapolated else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
