"""weight_sharding "blocks" on local CPU gloo ranks: memory per rank, bytes gathered, and step time against the
unsharded pool. JSON lines on stdout, progress on stderr.

    python -m comfyui_xdit.bench.sharded_weights [--worlds 1 2 4] [--rounds 3] [--steps 4] [--latent 64]

Model: tiny_models' "bench" Flux (hidden 768, 2 double + 4 single blocks, fp32; ~1024 image tokens at a 64 x 64
latent, near Flux-dev's attention share at 1024^2), written to a temporary file and loaded the way a worker loads
it (weight_sharding.load_sharded reads each rank's part of the blocks from the file).

- "memory" (one line per world, per rank): this rank's pieces (`resident_block_bytes`), the blocks whole
  (`whole_block_bytes`), the goal 1/P of them + two whole blocks (`goal_bytes`), and the most block bytes this rank
  held during sampling (`peak_block_bytes` = pieces + the most blocks whole or in flight at once × the largest
  block; on one rank a whole block is a view of its piece); `rss_*_mb` is the process's resident set (ComfyUI and torch included) after loading, and its peak.
- "step" (world 2 only, one line per rank): sampling (BasicGuider, euler, Ulysses 2) with the unsharded pool,
  sharded with prefetch, sharded without; `--rounds` rounds interleave them (reversed every other round) and each
  cost is the median of per-round ratios to the unsharded time. Bytes gathered per step, measured on the job's
  CommStats, against theory: every model call gathers each block once, each rank sending its piece to P-1 ranks.
The machine is shared (2 cores, other jobs running): single runs vary; quote the medians.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _first(node_output):
    return node_output.result[0] if hasattr(node_output, "result") else node_output[0]


@torch.inference_mode()  # as ComfyUI runs a prompt's nodes (and the pool's workers their jobs)
def _sample(model_patcher, latent: int, steps: int) -> float:
    """Seconds per step of SamplerCustomAdvanced with stock nodes (BasicGuider, euler, one model call a step)."""
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    from comfyui_xdit.testing.tiny_models import stand_in_conditioning

    model = ModelSamplingFlux().patch(model_patcher, 1.15, 0.5, latent * 8, latent * 8)[0]
    guider = _first(custom.BasicGuider.execute(model, stand_in_conditioning(100, 64)))
    sigmas = _first(custom.BasicScheduler.execute(model, "simple", steps, 1.0))
    sampler = _first(custom.KSamplerSelect.execute("euler"))
    noise = _first(custom.RandomNoise.execute(0))
    samples = {"samples": torch.zeros(1, 16, latent, latent)}
    started = time.perf_counter()
    _first(custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, samples))
    return (time.perf_counter() - started) / steps


def _track_peak(sharded) -> list[int]:
    """Record the most blocks whole or in flight at once, around each block's gather."""
    most = [0]
    gatherer = sharded.gatherer
    before = gatherer.before

    def counting_before(index):
        whole = before(index)
        most[0] = max(most[0], gatherer.whole_blocks)
        return whole

    gatherer.before = counting_before
    return most


def _rank(rank: int, world_size: int, path: str, latent: int, steps: int, rounds: int) -> dict:
    from comfyui_xdit.comfy_runtime import init_worker

    init_worker(cpu=True)
    import comfy.sd

    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.weight_sharding import load_sharded, sharded_blocks, world_group
    from parallel_core import ParallelConfig, init_parallel

    state = init_parallel(ParallelConfig(ulysses_degree=world_size))
    rss_before = _rss_mb()
    model = load_sharded(path, "default", world_group())
    sharded = sharded_blocks(model)
    result = {"rank": rank, "rss_loaded_mb": round(_rss_mb(), 1), "rss_before_mb": round(rss_before, 1),
              "resident_block_bytes": sharded.resident_bytes(), "whole_block_bytes": sharded.block_bytes(),
              "largest_block_bytes": sharded.largest_block_bytes()}
    most = _track_peak(sharded)
    sharded_model = parallelize(model, state)
    state.comm.reset()
    _sample(sharded_model, latent, steps)
    result["gathered_bytes_per_step"] = state.comm.bytes_sent("all_gather", "world") / steps
    result["most_blocks_whole"] = most[0]
    # One rank: a whole block is a view of its piece, nothing more is held.
    result["peak_block_bytes"] = sharded.resident_bytes() + (most[0] * sharded.largest_block_bytes() if world_size > 1 else 0)
    if world_size == 2:
        pool = parallelize(comfy.sd.load_diffusion_model(path), state)
        runs = {"unsharded": [], "prefetch": [], "no_prefetch": []}
        for round_ in range(rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for name in order:
                sharded.prefetch = name != "no_prefetch"
                runs[name].append(_sample(sharded_model if name != "unsharded" else pool, latent, steps))
        sharded.prefetch = True
        result["step_s"] = {k: statistics.median(v) for k, v in runs.items()}
        for name in ("prefetch", "no_prefetch"):
            result[f"cost_{name}"] = statistics.median(s / u - 1 for s, u in zip(runs[name], runs["unsharded"]))
    result["rss_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--latent", type=int, default=64)
    args = parser.parse_args(argv)

    from comfyui_xdit.testing.tiny_models import write_tiny_flux
    from parallel_core.local_launch import run_on_ranks

    with tempfile.TemporaryDirectory() as scratch:
        path = str(write_tiny_flux(Path(scratch) / "bench-flux.safetensors", "dev", "bench", seed=0))
        for world in args.worlds:
            print(f"world {world} ...", file=sys.stderr, flush=True)
            per_rank = run_on_ranks(_rank, world, path, args.latent, args.steps, args.rounds, timeout_s=3600)
            for result in per_rank:
                piece, whole = result["resident_block_bytes"], result["whole_block_bytes"]
                goal = whole / world + 2 * result["largest_block_bytes"]
                theory = piece * (world - 1)  # one model call a step: each block's piece to P-1 ranks
                line = {"bench": "sharded_weights", "part": "memory", "world": world, **{k: v for k, v in result.items() if k not in ("step_s",)},
                        "goal_bytes": int(goal), "peak_within_goal": result["peak_block_bytes"] <= goal,
                        "theory_gathered_bytes_per_step": theory}
                print(json.dumps(line), flush=True)
                if "step_s" in result:
                    print(json.dumps({"bench": "sharded_weights", "part": "step", "world": world, "rank": result["rank"],
                                      "steps": args.steps, "latent": args.latent, "rounds": args.rounds,
                                      "step_s": result["step_s"], "cost_prefetch": result["cost_prefetch"],
                                      "cost_no_prefetch": result["cost_no_prefetch"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
