"""Per-family step time on local CPU gloo ranks: 1 rank vs Ulysses-2 and Ring-2, and bytes against theory.

    python -m comfyui_xdit.bench.family_step [--families flux,flux2,sd3,qwen_image] [--pairs 3] [--repeats 2]

Prints one JSON line per (family, method) on stdout; progress goes to stderr.

Method
- Models: ComfyUI's own model class of each family (comfy.supported_models.<class>.get_model, the stock forward),
  built in-process from a bench-sized config (tiny_models.in_process_patcher: seeded weights, detection bypassed, so
  Qwen-Image's fixed 3072 width does not apply). The shapes live in `shapes()`; a family with a sequence-parallel
  adapter is benched by adding its entry there.
- Shape: attention's share of a block grows with tokens / width. Each bench shape keeps the real model's head
  dimension and its ratio of (image + text) tokens to width at 1024 x 1024 (shapes()[...].real), so its attention
  share of the FLOPs is the real model's. `attention_flop_share` is counted on one forward of the bench model:
  linear FLOPs by torch's FlopCounterMode, attention (4 * B * Sq * Sk * H * D per call) by an attention override
  that counts each call (ComfyUI's `optimized_attention_override`, which every family's attention passes through).
  `real_attention_flop_share` scales those two counts to the real model's tokens and width (attention ~ N^2 h,
  linear ~ N h^2; per-sample embedders ignored).
- Sampling: SamplerCustomAdvanced with stock nodes (BasicGuider, BasicScheduler "simple", euler, RandomNoise) and
  seeded stand-in conditioning of the model's widths; one forward per step. Every rank runs ComfyUI with
  --use-pytorch-cross-attention so the 1-rank baseline uses the same SDPA kernel as the parallel ranks.
- One spawn of 2 ranks, `--threads` torch threads each (1: `torch.set_num_threads(1)`). The baseline is the
  unpatched model on rank 0 while rank 1 waits in a barrier. Rounds interleave ulysses, single, ring (odd rounds
  reversed); `speedup_vs_1` is the median of per-round ratios baseline / method. A step's time is the gap between
  stamps of a sampler_post_cfg_function; the first round's first step is dropped (warm-up).
- Bytes: what each rank recorded on `state.comm` per step, against `theoretical_step_bytes`: every family's adapter
  shards text rows like image rows, and each rank's N = ceil(S/P) + ceil(T/P) rows travel together
  (parallel_glue.text_front_attention): per attention call Ulysses' all-to-alls 4*B*N*H*D*4*(U-1)/U (q, k, v in,
  output back) and Ring's K/V passes (R-1)*2*B*(U*N)*(H/U)*D*4; per forward the all-gather of the
  sequence-sharded output rows B*ceil(S/P)*F*4*(P-1), F being the features the adapter gathers
  (shapes()[...].gathered_features).
- The machine may be shared: `loadavg_1m` (min, max over the runs) is recorded beside every time.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from comfyui_xdit.bench.flux_step import import_comfy_on_rank
from parallel_core.local_launch import run_on_ranks

ELT = 4  # fp32
METHODS: dict[str, dict[str, int] | None] = {"single": None, "ulysses": {"ulysses_degree": 2}, "ring": {"ring_degree": 2}}
ROUND_ORDER = ("ulysses", "single", "ring")


@dataclass(frozen=True)
class RealShape:
    """The real model at 1024 x 1024, for the FLOP mix the bench shape copies."""

    name: str
    hidden: int
    image_tokens: int
    text_tokens: int


@dataclass(frozen=True)
class BenchShape:
    config_class: str  # comfy.supported_models class
    unet_config: dict
    hidden: int  # attention width H * D
    heads: int
    latent: tuple[int, int]  # latent rows, cols
    text_tokens: int
    gathered_features: int  # per image token, what the adapter gathers after the blocks
    real: RealShape
    output_layer: str = "final_layer.linear"
    patch: int = 2  # latent pixels per token, each way
    buffers: Callable[[torch.nn.Module], None] | None = None  # sets the diffusion model's non-parameter state


def _flux_config(**overrides) -> dict:
    from comfyui_xdit.testing.tiny_models import flux_config

    return {"image_model": "flux", **flux_config("dev", "tiny", **overrides)}


def _flux2_config(**overrides) -> dict:
    from comfyui_xdit.testing.tiny_models import flux2_config

    return flux2_config("dev", "tiny", **overrides)


def _sd3_config(depth: int, side: int) -> dict:
    from comfyui_xdit.testing.tiny_models import SD3_CONFIG

    hidden = 64 * depth
    return {**SD3_CONFIG, "depth": depth, "num_patches": side * side, "pos_embed_max_size": side,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": hidden}}}


def _fill_pos_embed(model: torch.nn.Module, side: int) -> None:
    from comfyui_xdit.testing.tiny_models import fill_sd3_pos_embed_

    fill_sd3_pos_embed_(model, side)


def shapes() -> dict[str, BenchShape]:
    """Bench shapes by family: width 512 (1/6 of Flux.1's and Qwen-Image's 3072, 0.21 of SD3.5 Large's 2432; Flux.2
    below) and the real (image + text) tokens scaled by the same factor, so N / h is the real model's. Two blocks
    each (one double + one single for Flux); the real head dimension."""
    return {
        # Flux.1 dev: 4096 image tokens + 256 T5 rows (ComfyUI pads to 256) at hidden 3072 -> 676 + 43 at 512.
        "flux": BenchShape("Flux", _flux_config(hidden_size=512, num_heads=4, depth=1, depth_single_blocks=1), 512, 4,
                           (52, 52), 43, 64, RealShape("Flux.1 dev", 3072, 4096, 256)),
        # Flux.2 dev: patch 1 on a /16 latent (4096 tokens) + 512 text rows (ComfyUI pads its text to 512) at hidden
        # 6144. The 512 text rows stay, so the bench is twice as wide (1024, 8 heads): 256 + 512 tokens.
        "flux2": BenchShape("Flux2", _flux2_config(hidden_size=1024, num_heads=8, depth=1, depth_single_blocks=1), 1024, 8,
                            (16, 16), 512, 128, RealShape("Flux.2 dev", 6144, 4096, 512), patch=1),
        # SD3.5 Large: 4096 image tokens + 333 text rows (77 CLIP + 256 T5) at hidden 2432 (38 heads of 64)
        # -> 841 + 70 at 512 (8 heads of 64, 8 joint blocks: MMDiT ties depth to width; 2 would be hidden 128).
        "sd3": BenchShape("SD3", _sd3_config(8, 32), 512, 8, (58, 58), 70, 64, RealShape("SD3.5 Large", 2432, 4096, 333),
                          buffers=lambda model: _fill_pos_embed(model, 32)),
        # Qwen-Image: 4096 image tokens + ~128 prompt rows (Qwen2.5-VL, unpadded) at 3072 -> 676 + 21 at 512.
        "qwen_image": BenchShape("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 2,
                                               "num_attention_heads": 4, "attention_head_dim": 128, "joint_attention_dim": 64},
                                 # its adapter gathers the image's hidden rows after the last block: 512 features
                                 512, 4, (52, 52), 21, 512, RealShape("Qwen-Image", 3072, 4096, 128), output_layer="proj_out"),
    }


def image_tokens(shape: BenchShape) -> int:
    return -(-shape.latent[0] // shape.patch) * -(-shape.latent[1] // shape.patch)


# --------------------------------------------------------------------------------------------------- theory
def theoretical_step_bytes(method: str, shape: BenchShape, calls: int) -> dict[str, int]:
    """Bytes one rank sends per sampling step (one forward, batch 1), by collective (see the module docstring)."""
    degrees = METHODS[method]
    u, r = degrees.get("ulysses_degree", 1), degrees.get("ring_degree", 1)
    p, s, t, heads, d = u * r, image_tokens(shape), shape.text_tokens, shape.heads, shape.hidden // shape.heads
    local = -(-s // p)
    rows, heads_here = local + -(-t // p), -(-heads // u)
    out: dict[str, int] = {}
    if u > 1:
        out["all_to_all/ulysses"] = calls * 4 * rows * heads_here * u * d * ELT * (u - 1) // u
    if r > 1:
        out["ring_send/ring"] = calls * (r - 1) * 2 * (u * rows) * heads_here * d * ELT
    out["all_gather/sequence"] = local * shape.gathered_features * ELT * (p - 1)
    return out


# --------------------------------------------------------------------------------------------------- rank side
def _counting_attention(counts: list, func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                        transformer_options=None, **kwargs):
    # (B, H, S, D) when skip_reshape, else (B, S, H*D): either way 4 * B * Sq * Sk * H*D multiply-adds x2.
    b = q.shape[0]
    sq, sk = (q.shape[2], k.shape[2]) if skip_reshape else (q.shape[1], k.shape[1])
    width = q.shape[1] * q.shape[3] if skip_reshape else q.shape[2]
    counts.append(4 * b * sq * sk * width)
    return func(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                transformer_options=transformer_options, **kwargs)


@torch.inference_mode()  # as ComfyUI runs a prompt's nodes (and the pool's workers their jobs)
def _sample(model_patcher, shape: BenchShape, steps: int, seed: int) -> tuple[torch.Tensor, list[float]]:
    from comfy_extras import nodes_custom_sampler as custom

    from comfyui_xdit.testing.tiny_models import conditioning_widths, stand_in_conditioning

    stamps: list[float] = []

    def stamp(args):
        stamps.append(time.perf_counter())
        return args["denoised"]

    model = model_patcher.clone()
    model.set_model_sampler_post_cfg_function(stamp)
    base = model_patcher.model
    text, pooled = conditioning_widths(base)
    guider = custom.BasicGuider.execute(model, stand_in_conditioning(100, shape.text_tokens, context_dim=text, pooled_dim=pooled)).result[0]
    sigmas = custom.BasicScheduler.execute(model, "simple", steps, 1.0).result[0]
    sampler = custom.KSamplerSelect.execute("euler").result[0]
    noise = custom.RandomNoise.execute(seed).result[0]
    latent = {"samples": torch.zeros(1, base.latent_format.latent_channels, *shape.latent)}
    start = time.perf_counter()
    samples = custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result[0]["samples"]
    return samples, [start, *stamps]


def _flop_counts(model_patcher, shape: BenchShape) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    counts: list[int] = []
    model = model_patcher.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = functools.partial(_counting_attention, counts)
    with FlopCounterMode(display=False) as counter:
        _sample(model, shape, 1, 0)
    return {"attention": float(sum(counts)), "other": float(counter.get_total_flops())}


def _bench_rank(rank: int, world_size: int, spec: dict) -> dict:
    import_comfy_on_rank("pytorch")
    import comfy.utils

    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.testing.tiny_models import in_process_patcher
    from parallel_core import ParallelConfig, init_parallel

    comfy.utils.set_progress_bar_enabled(False)
    states = {name: init_parallel(ParallelConfig(**degrees)) for name, degrees in METHODS.items() if degrees}
    all_shapes = shapes()
    results = {}
    for family in spec["families"]:
        shape = all_shapes[family]
        base = in_process_patcher(shape.config_class, shape.unet_config, spec["seed"], shape.output_layer)
        if shape.buffers is not None:
            shape.buffers(base.model.diffusion_model)
        adapter = adapter_for(base.model)
        diffusion_model = base.model.diffusion_model
        calls = sum(len(getattr(diffusion_model, c)) for c in adapter.block_containers)
        models = {name: parallelize(base, state) for name, state in states.items()}
        runs: dict[str, list[dict]] = {name: [] for name in METHODS}
        for k in range(spec["pairs"]):
            for name in ROUND_ORDER if k % 2 == 0 else tuple(reversed(ROUND_ORDER)):
                warmup = 1 if k == 0 else 0
                steps = warmup + spec["repeats"]
                dist.barrier()
                load = os.getloadavg()[0]
                if METHODS[name] is None and rank != 0:
                    dist.barrier()  # rank 0 samples alone
                    continue
                state = states.get(name)
                if state is not None:
                    state.comm.reset()
                latent, stamps = _sample(base if state is None else models[name], shape, steps, spec["seed"] + k)
                step_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])][warmup:]
                runs[name].append({"median_ms": statistics.median(step_ms), "load": (load, os.getloadavg()[0]),
                                   "bytes_per_step": {key: n // steps for key, n in state.comm.snapshot().items()} if state else {},
                                   "latent": latent if rank == 0 else None})
                dist.barrier()
                if rank == 0:
                    print(f"[bench] {family} round {k + 1}/{spec['pairs']} {name}: {runs[name][-1]['median_ms']:.0f} ms/step "
                          f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        result = {"runs": runs, "calls": calls, "heads": adapter.num_heads(diffusion_model)}
        if rank == 0:
            result["flops"] = _flop_counts(base, shape)
        results[family] = result
        del models, base
    return results


# --------------------------------------------------------------------------------------------------- parent side
def _lines(family: str, shape: BenchShape, per_rank: list[dict], threads: int, pairs: int, repeats: int) -> list[dict]:
    rank0 = per_rank[0][family]
    flops = rank0["flops"]
    s = image_tokens(shape)
    n_bench, n_real = s + shape.text_tokens, shape.real.image_tokens + shape.real.text_tokens
    k_n, k_h = n_real / n_bench, shape.real.hidden / shape.hidden
    real_attention, real_other = flops["attention"] * k_n ** 2 * k_h, flops["other"] * k_n * k_h ** 2
    common = {
        "family": family, "model": f"{shape.config_class} (in-process, bench config)", "latent": list(shape.latent),
        "image_tokens": s, "text_tokens": shape.text_tokens, "hidden": shape.hidden, "heads": rank0["heads"],
        "head_dim": shape.hidden // shape.heads, "attention_calls_per_forward": rank0["calls"],
        "tokens_per_width": round(n_bench / shape.hidden, 3),
        "attention_flop_share": round(flops["attention"] / (flops["attention"] + flops["other"]), 3),
        "gflop_per_forward": round((flops["attention"] + flops["other"]) / 1e9, 2),
        "real_model": asdict(shape.real), "real_tokens_per_width": round(n_real / shape.real.hidden, 3),
        "real_attention_flop_share": round(real_attention / (real_attention + real_other), 3),
        "threads_per_rank": threads, "pairs": pairs, "timed_steps_per_run": repeats,
    }
    baseline = [run["median_ms"] for run in rank0["runs"]["single"]]
    lines = []
    for name, degrees in METHODS.items():
        runs = rank0["runs"][name]
        mine = [run["median_ms"] for run in runs]
        loads = [x for run in runs for x in run["load"]]
        line = {"method": name if degrees is None else f"{name}-2", "world_size": 1 if degrees is None else 2, **common,
                "median_step_ms": round(statistics.median(mine), 1), "per_pair_step_ms": [round(x, 1) for x in mine],
                "loadavg_1m": [round(min(loads), 2), round(max(loads), 2)]}
        if degrees is not None:
            ratios = [b / m for b, m in zip(baseline, mine)]
            theory = theoretical_step_bytes(name, shape, rank0["calls"])
            measured = [per_rank[r][family]["runs"][name][0]["bytes_per_step"] for r in range(len(per_rank))]
            line.update({
                "speedup_vs_1": round(statistics.median(ratios), 3), "per_pair_ratio": [round(x, 3) for x in ratios],
                "bytes_per_rank_per_step": sum(measured[0].values()), "measured_breakdown": measured[0],
                "theoretical_bytes_per_step": sum(theory.values()), "theoretical_breakdown": theory,
                "bytes_match": all(m == theory for m in measured),
                "max_abs_err_vs_1": max((run["latent"] - base["latent"]).abs().max().item()
                                        for run, base in zip(runs, rank0["runs"]["single"])),
            })
        lines.append(line)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit.bench.family_step", description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="flux,flux2,sd3,qwen_image", help="comma-separated keys of shapes()")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per run (median taken)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (the 1-rank baseline uses the same)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    known = shapes()
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in known]
    if unknown or not families:
        parser.error(f"unknown families {unknown}; choose from {sorted(known)}")
    if min(args.pairs, args.repeats) < 1:
        parser.error("--pairs and --repeats must be >= 1")
    print(f"[bench] torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()}", file=sys.stderr, flush=True)
    spec = {"families": families, "pairs": args.pairs, "repeats": args.repeats, "seed": args.seed}
    per_rank = run_on_ranks(_bench_rank, 2, spec, threads_per_rank=args.threads, timeout_s=args.timeout)
    for family in families:
        for line in _lines(family, known[family], per_rank, args.threads, args.pairs, args.repeats):
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
