"""PipeFusion, displaced patch parallel and Ulysses at the same world size, against stock ComfyUI and naive patches.

    python -m comfyui_xdit.bench.stale_methods [--steps 12] [--size 64] [--text-tokens 256] [--repeats 2]
        [--methods stock,pipefusion,...] [--patches 4] [--sampler euler] [--guider basic|cfg]
        (e.g. --methods pipefusion,pipefusion_memory,pipefusion_speed --repeats 5: the balances, paired with stock)

Prints one JSON line per method on stdout (progress on stderr), then one line per stage count and balance for the
stage plan of the real Flux.1-dev architecture (shapes only, at 1024x1024: 4096 image + 512 text tokens).

Method
- Model: a seeded checkpoint of tiny_models' "pipeline" size (4 double + 10 single blocks; hidden 256, or
  `--hidden`) loaded by ComfyUI; a `--size` x `--size` latent and `--text-tokens` text rows; sampling as SamplerCustomAdvanced does with
  stock nodes (BasicGuider, or CFGGuider with `--guider cfg`, whose cond and uncond run as one batch of 2; euler or
  `--sampler`, "simple" schedule, `--steps` steps), as in tests/flux_cases.py.
- Every method is one spawn of its ranks (`run_on_ranks`, one torch thread per rank, ComfyUI with
  --use-pytorch-cross-attention so all runs use the same SDPA kernel); `ms_per_step` is the median over `--repeats`
  samplings of the wall time / steps, after one untimed sampling. `speedup_vs_1` divides the stock median by it.
- Quality: the final latent against stock's (same seed, steps): `max_abs_err` and `psnr_db` (peak = stock's
  range). "naive_patch" runs the model on each band of rows alone (bench/naive_patches.py) with as many bands as
  the PipeFusion run uses; "naive_patch_2" as many as patch parallel uses.
- Bytes: what each rank recorded on its CommStats over a sampling / steps, beside the definition
  (bench/stale_bytes.py for PipeFusion and patch parallel, bench/flux_step.theoretical_step_bytes for Ulysses).
- Memory: `block_parameter_share` is the share of the transformer's block parameters a rank holds (PipeFusion
  stages load only their blocks, stage_loading.py); `peak_rss_mb` the rank's peak resident memory;
  `kv_cache_mb` the most the stale methods' key/value tables held at once.
- Bubble: PipeFusion ranks record the time they block waiting for the previous stage (recv) or for the last
  stage's output (broadcast); `bubble_measured` is that time over the sampling's wall time, beside
  `bubble_theory` = (P-1)/(M+P-1) of one fill and drain per model call with equal stages and patches (what a call
  costs without lookahead), `bubble_theory_at_plan` = each stage's idle share of one pipelined call with the
  plan's modelled compute shares and the patches' token counts (`patch_tokens`: the first band is shortened for
  the text it carries, stale_steps), with lookahead (`lookahead`: true unless the method switches it off; the first
  stage runs the next call's first patch while the last stage finishes this call's, pipefusion_lookahead) for a
  call between two that look ahead, and `bubble_theory_sampling` = each stage's idle share of the whole sampling
  (the synchronous warmup call, the first pipelined call that fills and the last that drains included, as in
  `bubble_measured`). `lookahead_used_missed`: the first stage's predictions used and missed over all samplings.
- CPU time: `cpu_ms_per_step` is each rank's process CPU time per step (waiting ranks block, they do not spin), so
  `stage_cpu_share` measures each stage's share of the work even on a loaded machine, beside the modelled
  `compute_share` (which leaves out the embedders and final layer every stage runs on each patch); `cpu_over_stock`
  = the ranks' CPU time together over stock's.
- Paired: the PipeFusion runs also time stock sampling on rank 0 (one thread, the other rank waiting) before each
  timed PipeFusion sampling: `speedup_vs_1_paired` is the median of those per-pair ratios, the figure to quote on a
  machine whose load changes (rank 0's `peak_rss_mb` then includes the stock model).
- Stage plan: PipeFusion runs once per balance ("pipefusion" = the default, balanced; "pipefusion_memory",
  "pipefusion_speed"; "pipefusion_speed_no_lookahead" = the speed cut with lookahead off): `stage_blocks` per stage, `compute_share` per stage (block_stages' model at this job's token
  counts), `parameter_share` per stage, `stage_busy_ms_per_step` = each rank's wall time minus its waits, per step,
  and `speedup_theory` = what the modelled shares allow over one rank (one synchronous warmup call, then pipelined
  calls of `patch_tokens`, with lookahead where the method has it), beside the measured `speedup_vs_1` (`speedup_measured_over_theory` = their ratio;
  `speedup_theory_equal_patches` = the same with M equal patches).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from parallel_core import (DEFAULT_BALANCE, Tokens, band_tokens, block_flops, patch_bands, pipeline_bubble, pipeline_bubbles, pipeline_time,
                           stage_shares)
from parallel_core.local_launch import run_on_ranks

from .flux_step import theoretical_step_bytes
from .stale_bytes import displaced_call_bytes, looks_ahead, pipefusion_call_bytes

HEAD_DIM, BLOCKS, OUT_FEATURES = 128, 14, 64
FLUX_DEV = {"hidden_size": 3072, "num_heads": 24, "depth": 19, "depth_single_blocks": 38}
# Deterministic ComfyUI samplers with one model call a step (the bytes and bubble theory count one call a step).
# One model call a step, as the bytes and bubble theory assume; the last four draw noise (the same seeded noise in
# every run, so quality still compares against stock's).
ONE_CALL_SAMPLERS = ("euler", "dpmpp_2m", "deis", "uni_pc", "res_multistep", "ipndm", "lms", "euler_ancestral", "lcm", "dpmpp_2m_sde", "er_sde")


def _rank(rank: int, world_size: int, model_path: str, method: dict, spec: dict) -> dict:
    from .flux_step import _sample, import_comfy_on_rank

    torch.set_num_threads(1)
    import_comfy_on_rank("pytorch")
    import comfy.sd

    from comfyui_xdit.bench.naive_patches import naive_patch_model
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.stage_loading import held_block_parameters, load_stage
    from comfyui_xdit.stale_forwards import LOOKAHEAD_ATTACHMENT
    from comfyui_xdit.stale_steps import OPTIONS_KEY
    from parallel_core import ParallelConfig, init_parallel

    config = ParallelConfig(**method.get("degrees", {}))
    state = init_parallel(config) if world_size > 1 else None
    if config.pipefusion_degree > 1:
        model = load_stage(model_path, "default", config.pipefusion_degree, state.pipefusion.rank, method["balance"])
    else:
        model = comfy.sd.load_diffusion_model(model_path)
    held = held_block_parameters(model.model)
    if state is not None:
        model = parallelize(model, state)
        model.model_options["transformer_options"] = {**model.model_options.get("transformer_options", {}),
                                                      OPTIONS_KEY: method.get("options", {})}
    elif method.get("naive_patches"):
        model = naive_patch_model(model, method["naive_patches"])
    plan = None
    if config.pipefusion_degree > 1:
        from comfyui_xdit.families import adapter_for

        plan = plan_line(model.model.diffusion_model, adapter_for(model.model), config.pipefusion_degree, method["balance"],
                         Tokens(image=(spec["size"] // 2) ** 2, text=spec["text_tokens"]))
    job = {"latent": (spec["size"], spec["size"]), "text_tokens": spec["text_tokens"]}
    # Paired: rank 0 also samples with the stock model (one thread, the other rank waiting) before each timed
    # parallel sampling, so each ratio compares runs made under the same machine load.
    stock = comfy.sd.load_diffusion_model(model_path) if method.get("paired") and state is not None and state.rank == 0 else None
    latent, _ = _sample(model, spec["guider"], job, spec["steps"], spec["seed"], sampler_name=spec["sampler"])  # untimed: first use of every group
    if stock is not None:
        _sample(stock, spec["guider"], job, spec["steps"], spec["seed"], sampler_name=spec["sampler"])
    times, cpu_times, stock_times, comm = [], [], [], None
    for _ in range(spec["repeats"]):
        if method.get("paired") and state is not None:
            torch.distributed.barrier()
            if stock is not None:
                started = time.perf_counter()
                _sample(stock, spec["guider"], job, spec["steps"], spec["seed"], sampler_name=spec["sampler"])
                stock_times.append(time.perf_counter() - started)
        if state is not None:
            torch.distributed.barrier()
            state.comm.reset()
        started, cpu_started = time.perf_counter(), time.process_time()
        latent, _ = _sample(model, spec["guider"], job, spec["steps"], spec["seed"], sampler_name=spec["sampler"])
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        if state is not None:
            comm = {"bytes": state.comm.snapshot(), "waited_s": state.comm.waited_s()}
    cache = sum(c.peak_bytes for c in _caches(model))
    lookahead = model.get_attachment(LOOKAHEAD_ATTACHMENT) if state is not None else None
    return {"latent": latent, "times": times, "cpu_times": cpu_times, "stock_times": stock_times, "comm": comm, "held": held, "kv_cache_bytes": cache,
            "plan": plan, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "lookahead": [lookahead.used, lookahead.missed] if lookahead is not None else None}


def _caches(model) -> list:
    from parallel_core import KVCache

    found = []
    # The forward patch binds the method, a partial that binds the cache (flux.parallelize, stale_forwards.stale_method).
    pending = [arg for patch in model.object_patches.values() for arg in getattr(patch, "args", ())]
    while pending:
        arg = pending.pop()
        if isinstance(arg, KVCache):
            found.append(arg)
        else:
            pending.extend(getattr(arg, "args", ()) if isinstance(arg, functools.partial) else ())
    return found


def _bands(spec: dict) -> list[tuple[int, int]]:
    """PipeFusion's bands at this job (stale_steps.bands_for: the first shortened for the text it carries)."""
    rows = spec["size"] // 2
    return patch_bands(rows, spec["patches"], rows, spec["text_tokens"])


def _theory(method: dict, spec: dict, rank: int) -> dict[str, int]:
    rows, steps, text = spec["size"] // 2, spec["steps"], spec["text_tokens"]
    batch = 2 if spec["guider"] == "cfg" else 1  # CFGGuider batches cond and uncond in one model call
    total: dict[str, int] = {}

    def add(part: dict[str, int]) -> None:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value

    degrees = method.get("degrees", {})
    if degrees.get("pipefusion_degree", 1) > 1:
        stages = degrees["pipefusion_degree"]
        for call in range(steps):
            bands = [(0, rows)] if call == 0 else _bands(spec)
            add(pipefusion_call_bytes(rank, stages, batch, text, rows, bands, spec["hidden"], OUT_FEATURES,
                                      looks_ahead=method.get("options", {}).get("lookahead", True) and looks_ahead(call, steps)))
    elif degrees.get("patch_degree", 1) > 1:
        for call in range(steps):
            add(displaced_call_bytes(degrees["patch_degree"], batch, text, rows * rows, BLOCKS, spec["hidden"] // HEAD_DIM, HEAD_DIM, OUT_FEATURES, call == 0))
    else:
        for _ in range(steps):
            add(theoretical_step_bytes("ulysses", batch, rows * rows, text, spec["hidden"] // HEAD_DIM, HEAD_DIM, BLOCKS, (spec["size"], spec["size"])))
    return {k: v // steps for k, v in total.items()}


def _psnr(latent: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((latent - reference) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10((reference.max() - reference.min()).item() ** 2 / mse)


def _methods(spec: dict) -> list[dict]:
    patches = spec["patches"]
    pipefusion = {"world_size": 2, "degrees": {"pipefusion_degree": 2}, "options": {"num_pipeline_patch": patches}, "paired": True}
    return [
        {"method": "stock", "world_size": 1},
        {"method": "naive_patch", "world_size": 1, "naive_patches": patches},
        {"method": "naive_patch_2", "world_size": 1, "naive_patches": 2},
        {"method": "pipefusion", **pipefusion, "balance": DEFAULT_BALANCE},
        {"method": "pipefusion_memory", **pipefusion, "balance": "memory"},
        {"method": "pipefusion_speed", **pipefusion, "balance": "speed"},
        # The same without lookahead (pipefusion_lookahead: each model call fills and drains the pipeline).
        {"method": "pipefusion_speed_no_lookahead", **pipefusion, "balance": "speed", "options": {"num_pipeline_patch": patches, "lookahead": False}},
        {"method": "patch_parallel", "world_size": 2, "degrees": {"patch_degree": 2}, "options": {}},
        {"method": "ulysses", "world_size": 2, "degrees": {"ulysses_degree": 2}},
    ]


def plan_line(diffusion_model, adapter, stages: int, balance: str, tokens: Tokens) -> dict:
    """The stage plan `balance` cuts (block_stages.stage_plan) and each stage's modelled compute (at `tokens`) and
    parameter shares."""
    from comfyui_xdit.block_stages import profiles, stage_plan

    every = profiles(diffusion_model, adapter)
    plan = stage_plan(diffusion_model, adapter, stages, balance)
    compute = stage_shares(plan, [block_flops(p, tokens) for p in every])
    return {"balance": balance, "stages": stages, "stage_blocks": [[stage.start, stage.stop] for stage in plan],
            "compute_share": [round(c, 4) for c in compute],
            "parameter_share": [round(p, 4) for p in stage_shares(plan, [p.parameters for p in every])],
            "image_tokens": tokens.image, "text_tokens": tokens.text}


def sampling_time(compute_share: list[float], patches, steps: int, warmup_steps: int = 1, lookahead: bool = True) -> float:
    """The pipeline's time for a sampling in units of one rank's step: synchronous warmup calls run the stages one
    after the other (the whole work), the rest pipeline `patches` (a count, or each patch's tokens: pipeline_time),
    with `lookahead` (a plain Euler run) every call but the last running the next one's first patch ahead and
    every one but the first after the warmup handing it over at once; work outside the blocks, communication and
    per-patch overheads are not modelled."""
    warm = min(warmup_steps, steps)
    return warm + sum(pipeline_time(compute_share, patches, skip_first=lookahead and call > warm, ahead=lookahead and call < steps - 1)
                      for call in range(warm, steps))


def speedup_theory(compute_share: list[float], patches, steps: int, warmup_steps: int = 1, lookahead: bool = True) -> float:
    """One rank's time over the pipeline's (sampling_time)."""
    return steps / sampling_time(compute_share, patches, steps, warmup_steps, lookahead)


def flux_dev_plan_lines(patches_per_stage: int = 2) -> list[dict]:
    """Flux.1-dev's stage plans (the real architecture on the meta device) at 1024x1024: each balance at 2, 4 and
    8 stages, with its modelled compute and parameter shares and what the compute shares allow."""
    import comfy.ldm.flux.model
    import comfy.ops

    from comfyui_xdit.families import registered
    from comfyui_xdit.testing.tiny_models import flux_config

    config = flux_config("dev", "tiny", **FLUX_DEV, vec_in_dim=768, context_in_dim=4096)
    model = comfy.ldm.flux.model.Flux(dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init, **config)
    adapter = registered("Flux")
    lines = []
    for stages in (2, 4, 8):
        for balance in ("memory", "balanced", "speed"):
            line = plan_line(model, adapter, stages, balance, Tokens(image=4096, text=512))
            patches = patches_per_stage * stages
            lines.append({"method": "pipefusion_plan", "model": "flux1-dev architecture (19 double + 38 single blocks, hidden 3072)",
                          **line, "max_parameter_share_over_equal": round(max(line["parameter_share"]) * stages, 4),
                          "max_compute_share_over_equal": round(max(line["compute_share"]) * stages, 4),
                          "patches": patches, "bubble_theory_at_plan": [round(b, 3) for b in pipeline_bubbles(line["compute_share"], patches)],
                          "speedup_theory_per_pipelined_call": round(1 / pipeline_time(line["compute_share"], patches), 3),
                          "speedup_theory_per_pipelined_call_lookahead": round(
                              1 / pipeline_time(line["compute_share"], patches, skip_first=True, ahead=True), 3)})
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=256, help="model width (a multiple of 128); the pipeline size's is 256")
    parser.add_argument("--patches", type=int, default=4, help="PipeFusion's num_pipeline_patch (4 = its auto value at 2 stages)")
    parser.add_argument("--methods", default="", help="comma-separated method names to run (stock always runs); default: all")
    parser.add_argument("--sampler", default="euler", choices=ONE_CALL_SAMPLERS,
                        help="ComfyUI sampler (one model call a step, as the bytes and bubble theory assume)")
    parser.add_argument("--guider", default="basic", choices=("basic", "cfg"),
                        help="BasicGuider, or CFGGuider (scale 3.5): its cond and uncond run as one batch of 2 in each model call")
    args = parser.parse_args(argv)
    spec = {"steps": args.steps, "size": args.size, "text_tokens": args.text_tokens, "repeats": args.repeats, "seed": args.seed,
            "hidden": args.hidden, "patches": args.patches, "sampler": args.sampler, "guider": args.guider}
    chosen = {"stock", *filter(None, args.methods.split(","))} if args.methods else None
    from comfyui_xdit.comfy_runtime import import_comfy
    from comfyui_xdit.testing.tiny_models import write_tiny_flux

    import_comfy()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        path = str(write_tiny_flux(Path(folder) / "flux-pipeline.safetensors", "dev", "pipeline", seed=args.seed, hidden_size=args.hidden))
        for method in _methods(spec):
            if chosen is not None and method["method"] not in chosen:
                continue
            print(f"running {method['method']} ...", file=sys.stderr)
            results[method["method"]] = (method, run_on_ranks(_rank, method["world_size"], path, method, spec, timeout_s=3600))
    stock_latent = results["stock"][1][0]["latent"]
    stock_ms = statistics.median(results["stock"][1][0]["times"]) / args.steps * 1e3
    for name, (method, per_rank) in results.items():
        ms = statistics.median(per_rank[0]["times"]) / args.steps * 1e3
        line = {"method": name, "world_size": method["world_size"], "degrees": method.get("degrees", {}),
                "latent": [args.size, args.size], "image_tokens": (args.size // 2) ** 2, "text_tokens": args.text_tokens,
                "hidden": args.hidden, "blocks": BLOCKS, "steps": args.steps, "sampler": args.sampler, "guider": args.guider, "ms_per_step": round(ms, 1),
                "speedup_vs_1": round(stock_ms / ms, 3),
                "cpu_ms_per_step": [round(statistics.median(r["cpu_times"]) / args.steps * 1e3, 1) for r in per_rank],
                "cpu_over_stock": round(sum(statistics.median(r["cpu_times"]) for r in per_rank) / statistics.median(results["stock"][1][0]["cpu_times"]), 3),
                "max_abs_err": (per_rank[0]["latent"] - stock_latent).abs().max().item(),
                "psnr_db": round(_psnr(per_rank[0]["latent"], stock_latent), 2),
                "block_parameter_share": [round(r["held"][0] / r["held"][1], 4) for r in per_rank],
                "peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in per_rank],
                "kv_cache_mb": [round(r["kv_cache_bytes"] / 2**20, 2) for r in per_rank]}
        if method["world_size"] > 1:
            measured = [{k: v // args.steps for k, v in r["comm"]["bytes"].items()} for r in per_rank]
            theory = [_theory(method, spec, rank) for rank in range(method["world_size"])]
            line.update({"bytes_per_rank_per_step": measured, "theoretical_bytes_per_rank_per_step": theory,
                         "bytes_match": measured == theory,
                         "total_bytes_per_rank_per_step": [sum(m.values()) for m in measured]})
        if name.startswith("pipefusion"):
            plan, patches, bands = per_rank[0]["plan"], spec["patches"], _bands(spec)
            tokens = band_tokens(bands, args.size // 2, args.text_tokens)
            walls = [statistics.median(r["times"]) for r in per_rank]
            lookahead = method["options"].get("lookahead", True)
            theory = speedup_theory(plan["compute_share"], tokens, args.steps, lookahead=lookahead)
            timeline = sampling_time(plan["compute_share"], tokens, args.steps, lookahead=lookahead)
            line.update({"warmup_steps": 1, "num_pipeline_patch": patches, "patch_bands": bands, "patch_tokens": tokens, **plan,
                         # first stage's predictions used and missed over the run's samplings (the untimed one included)
                         "lookahead": lookahead, "lookahead_used_missed": per_rank[0]["lookahead"],
                         "stage_busy_ms_per_step": [round((wall - r["comm"]["waited_s"]) / args.steps * 1e3, 1) for wall, r in zip(walls, per_rank)],
                         "stage_cpu_share": [round(c / sum(line["cpu_ms_per_step"]), 4) for c in line["cpu_ms_per_step"]],
                         "bubble_measured": [round(r["comm"]["waited_s"] / wall, 3) for wall, r in zip(walls, per_rank)],
                         "bubble_theory": round(pipeline_bubble(2, patches), 3),
                         "bubble_theory_at_plan": [round(b, 3) for b in pipeline_bubbles(plan["compute_share"], tokens, lookahead)],
                         "bubble_theory_sampling": [round(1 - share * args.steps / timeline, 3) for share in plan["compute_share"]],
                         "speedup_theory": round(theory, 3),
                         "speedup_theory_equal_patches": round(speedup_theory(plan["compute_share"], patches, args.steps, lookahead=lookahead), 3),
                         "speedup_measured_over_theory": round(stock_ms / ms / theory, 3),
                         "stock_ms_per_step_paired": round(statistics.median(per_rank[0]["stock_times"]) / args.steps * 1e3, 1),
                         "speedup_vs_1_paired": round(statistics.median(s / t for s, t in zip(per_rank[0]["stock_times"], per_rank[0]["times"])), 3)})
        print(json.dumps(line), flush=True)
    for line in flux_dev_plan_lines():
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
