"""A cache schedule from the redundancy analysis vs ComfyUI's EasyCache, at the same skipped work, on the pool.

    python -m comfyui_xdit.bench.cache_schedule [--families flux,sd3] [--world 2] [--steps 12] [--skips 2,3,4] [--size 24]
        [--pipefusion]

Prints one JSON line per (family, method, skipped steps) on stdout (progress on stderr).

Method
- Models: seeded tiny checkpoints (testing/tiny_models.py): Flux at its "pipeline" size (4 double + 10 single blocks,
  hidden 256), Qwen-Image (1 block, hidden 3072: detection fixes its width) and, on request, SD3 (2 joint blocks;
  stock EasyCache does not act on it, see FAMILIES); a `--size` x `--size` latent, 7 stand-in text tokens, CFGGuider
  (cfg 2), euler, "simple" schedule, the family's stock ModelSampling node. Random weights: little step-to-step
  structure compared with a trained model.
- Every rank builds the graphs with stock nodes on a shell MODEL (as XDiTUNetLoader returns it), carries them with
  job.build_job and runs them with job.run_job on its parallel model (ulysses over all ranks), as a pool worker does.
  One torch thread per rank.
- The analysis is measured on another noise seed and prompt than the one evaluated. The reference is the uncached
  pool result (equal to stock ComfyUI to fp32 rounding, tests/test_flux_parallel.py).
- Schedules (redundancy.choose_schedule) skip `k` steps' worth of block evaluations, as single (step, block)
  evaluations ("schedule-blocks") or whole steps ("schedule-steps"). EasyCache (ComfyUI's node, its default start
  0.15 / end 0.95) is run over a grid of thresholds; for each `k` the smallest threshold that skips exactly `k` steps
  is reported (skipped steps counted by a hook on the final layer). EasyCache skips the whole model call, the
  schedule only the blocks.
- `psnr_db` of the final latent against the reference (peak = the reference's value range); `seconds` the median of
  `--repeats` timed runs; `speedup` the median of per-pair ratios against interleaved uncached runs.
- `--pipefusion`: also PipeFusion over all ranks (stage-loaded models, the sampler's default warmup 1 and patches
  auto: stale keys/values), uncached ("pipefusion", its speedup against uncached ulysses runs) and with the block
  schedules ("pipefusion-schedule-blocks", against uncached PipeFusion runs), the PSNR against the same (stock)
  reference; block evaluations counted over all ranks, per patch. Only for families whose tiny model has a block per rank (not Qwen-Image).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from parallel_core.local_launch import run_on_ranks

# Tiny size, and the last layer whose calls tell which steps ran the model. SD3 is here for the schedule only: ComfyUI
# 0.30.0's MMDiT forward runs no DIFFUSION_MODEL wrappers, so stock EasyCache never skips a step on it.
# `stages`: the most PipeFusion stages the tiny model has blocks for.
FAMILIES = {"flux": {"model_size": "pipeline", "last_layer": "final_layer", "stages": 14},
            "qwen_image": {"model_size": "tiny", "last_layer": "proj_out", "stages": 1},
            "sd3": {"model_size": "tiny", "last_layer": "final_layer", "stages": 2}}
EASYCACHE_THRESHOLDS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.14, 0.17, 0.2, 0.25, 0.3, 0.35, 0.42, 0.5, 0.6, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 2.5)
ANALYSIS_SEED, EVAL_SEED = 11, 2


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (x - reference).pow(2).mean().item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _graph(model, base_model, spec: dict, seed: int, easycache: float | None = None):
    import comfy.model_base
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_easycache import EasyCacheNode
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow, ModelSamplingFlux, ModelSamplingSD3

    from comfyui_xdit.testing.tiny_models import conditioning_widths, stand_in_conditioning

    def first(output):
        return output.result[0] if hasattr(output, "result") else output[0]

    if easycache is not None:
        model = first(EasyCacheNode.execute(model, easycache, 0.15, 0.95, False))
    size = spec["size"]
    frames = ()
    if isinstance(base_model, comfy.model_base.Flux):
        model = ModelSamplingFlux().patch(model, 1.15, 0.5, size * 8, size * 8)[0]
    elif isinstance(base_model, comfy.model_base.QwenImage):  # as ComfyUI's Qwen-Image templates; 5-D latents
        model, frames = ModelSamplingAuraFlow().patch_aura(model, 3.1)[0], (1,)
    else:
        model = ModelSamplingSD3().patch(model, 3.0)[0]
    text, pooled = conditioning_widths(base_model)
    positive, negative = (stand_in_conditioning(seed * 10 + k, 7, context_dim=text, pooled_dim=pooled) for k in (0, 1))
    guider = first(custom.CFGGuider.execute(model, positive, negative, 2.0))
    sigmas = first(custom.BasicScheduler.execute(model, "simple", spec["steps"], 1.0))
    noise = first(custom.RandomNoise.execute(seed))
    latent = torch.zeros(1, 16, *frames, size, size)
    return guider, first(custom.KSamplerSelect.execute("euler")), sigmas, noise.generate_noise({"samples": latent}), latent, noise.seed


def _rank(rank: int, world_size: int, path: str, spec: dict) -> dict:
    torch.set_num_threads(1)
    from comfyui_xdit.comfy_runtime import init_worker

    init_worker(cpu=True)
    import comfy.sd

    from comfyui_xdit.block_cache import SCHEDULE_ATTACHMENT
    from comfyui_xdit.job import build_job, run_job
    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.redundancy import choose_schedule
    from comfyui_xdit.shell_model import build_shell
    from comfyui_xdit.stage_loading import load_stage
    from parallel_core import DEFAULT_BALANCE, ParallelConfig, init_parallel

    degrees = {"ulysses_degree": world_size}
    base = comfy.sd.load_diffusion_model(path)
    state = init_parallel(ParallelConfig(**degrees))
    model = parallelize(base, state)
    pools = {"ulysses": (model, state)}
    if spec["pipefusion"] and spec["stages"] >= world_size:
        pf_state = init_parallel(ParallelConfig(pipefusion_degree=world_size))
        pools["pipefusion"] = (parallelize(load_stage(path, "default", world_size, pf_state.pipefusion.rank, DEFAULT_BALANCE), pf_state), pf_state)
    shell = build_shell(path, "default", PoolModelRef(path, "default", tuple(degrees.items()), world_size, "", 2))
    calls = {"n": 0}
    getattr(base.model.diffusion_model, spec["last_layer"]).register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    def job(seed: int, easycache: float | None = None, schedule: dict | None = None, analyse: bool = False):
        patcher = shell.clone()
        if schedule is not None:
            patcher.set_attachments(SCHEDULE_ATTACHMENT, schedule)
        guider, sampler, sigmas, noise, latent, seed = _graph(patcher, base.model, spec, seed, easycache)
        return build_job(guider, sampler, sigmas, noise, latent, None, seed, analyse=analyse)

    def run(the_job, pool: str = "ulysses") -> dict:
        ran_steps: list[bool] = []
        before = {"n": calls["n"]}

        def callback(step, x0, x, total):
            ran_steps.append(calls["n"] > before["n"])
            before["n"] = calls["n"]

        report: dict = {}
        start = time.perf_counter()
        on_model, on_state = pools[pool]
        report["samples"] = run_job(on_model, the_job, callback, on_state, report)
        report["seconds"] = time.perf_counter() - start
        report["skipped_steps"] = ran_steps.count(False) if pool == "ulysses" else None  # the hook is on the whole model
        return report

    analysis = run(job(ANALYSIS_SEED, analyse=True))["block_changes"]
    analysis["model"] = {"file": Path(path).name, "bytes": 0, "header_sha256": ""}
    uncached_job = job(EVAL_SEED)
    reference = run(uncached_job)
    variants: dict[str, dict] = {}
    for k in spec["skips"]:
        for granularity in ("blocks", "steps"):
            schedule = choose_schedule(analysis, k, granularity)
            variants[f"schedule-{granularity}/{k}"] = {"job": job(EVAL_SEED, schedule=schedule), "estimated_error": schedule["estimated_error"]}
    easy = {}
    for threshold in EASYCACHE_THRESHOLDS:
        out = run(job(EVAL_SEED, easycache=threshold))
        easy.setdefault(out["skipped_steps"], (threshold, out))
    for k in spec["skips"]:
        if k in easy:
            variants[f"easycache/{k}"] = {"job": job(EVAL_SEED, easycache=easy[k][0]), "threshold": easy[k][0]}
    if "pipefusion" in pools:  # the same jobs on the PipeFusion pool, timed against uncached PipeFusion
        variants["pipefusion/0"] = {"job": uncached_job, "pool": "pipefusion", "baseline": "ulysses"}  # PipeFusion's own speedup
        for k in spec["skips"]:
            variants[f"pipefusion-schedule-blocks/{k}"] = {**variants[f"schedule-blocks/{k}"], "pool": "pipefusion"}
    results = {}
    for name, variant in variants.items():
        pairs, outs = [], []
        pool = variant.get("pool", "ulysses")
        for _ in range(spec["repeats"]):
            plain = run(uncached_job, variant.get("baseline", pool))
            out = run(variant["job"], pool)
            pairs.append(plain["seconds"] / out["seconds"])
            outs.append(out)
        out = outs[-1]
        results[name] = {"psnr_db": psnr(out["samples"], reference["samples"]), "seconds": statistics.median(o["seconds"] for o in outs),
                         "speedup": statistics.median(pairs), "skipped_steps": out["skipped_steps"],
                         "blocks_reused": out.get("blocks_reused", 0), "blocks_ran": out.get("blocks_ran"),
                         **{k: v for k, v in variant.items() if k not in ("job", "pool", "baseline")}}
    return {"blocks": len(analysis["blocks"]), "reference_seconds": reference["seconds"],
            "easycache_skips": {str(k): t for k, (t, _) in sorted(easy.items())}, "results": results,
            "analysis_step_change": [None if row is None else round(sum(row) / len(row), 4) for row in analysis["output_change"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="flux,qwen_image")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skips", default="2,3,4")
    parser.add_argument("--size", type=int, default=24, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pipefusion", action="store_true", help="also PipeFusion over all ranks, uncached and with the block schedules")
    args = parser.parse_args(argv)
    spec = {"steps": args.steps, "size": args.size, "repeats": args.repeats, "skips": [int(k) for k in args.skips.split(",")],
            "pipefusion": args.pipefusion}
    from comfyui_xdit.comfy_runtime import import_comfy
    from comfyui_xdit.testing.tiny_models import write_tiny_model

    import_comfy()
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as folder:
            path = str(write_tiny_model(family, Path(folder) / f"{family}.safetensors", size=FAMILIES[family]["model_size"], seed=0))
            print(f"{family}: running {args.world} ranks ...", file=sys.stderr)
            per_rank = run_on_ranks(_rank, args.world, path, {**spec, **FAMILIES[family]}, timeout_s=3600)
        result = per_rank[0]
        for name, numbers in result["results"].items():  # PipeFusion ranks run their own stage's blocks: add them up
            if name.startswith("pipefusion"):
                numbers["blocks_reused"], numbers["blocks_ran"] = (sum(r["results"][name][key] or 0 for r in per_rank) for key in ("blocks_reused", "blocks_ran"))
        print(json.dumps({"bench": "cache_schedule", "family": family, "analysis_step_change": result["analysis_step_change"],
                          "easycache_thresholds_by_skipped_steps": result["easycache_skips"]}), flush=True)
        for name, numbers in result["results"].items():
            method, skips = name.split("/")
            pool = {"pipefusion_degree": args.world} if method.startswith("pipefusion") else {"ulysses_degree": args.world}
            print(json.dumps({"bench": "cache_schedule", "family": family, "method": method, "target_skipped_steps": int(skips),
                              "world_size": args.world, "degrees": pool, "steps": args.steps,
                              "latent": [args.size, args.size], "blocks": result["blocks"],
                              "skipped_block_evaluations": numbers["blocks_reused"] if method != "easycache" else numbers["skipped_steps"] * result["blocks"],
                              **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in numbers.items()},
                              "reference_seconds": round(result["reference_seconds"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
