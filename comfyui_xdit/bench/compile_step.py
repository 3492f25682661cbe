"""Eager vs TorchCompileModel-compiled sampling steps on the pool (CPU ranks over gloo).

    python -m comfyui_xdit.bench.compile_step [--backend inductor] [--world 2] [--steps 4] [--size 32] [--repeats 3]

Prints one JSON line on stdout (progress on stderr).

Method
- Model: the seeded tiny Flux (tiny_models.write_tiny_flux, hidden 256, 1 double + 1 single block); a `--size` x
  `--size` latent, 7 text tokens, BasicGuider, euler, "simple" schedule.
- Each rank builds the graph with stock nodes on a shell MODEL (as XDiTUNetLoader returns it), with and without
  ComfyUI's TorchCompileModel node, carries it with job.build_job and runs it with job.run_job on its parallel model
  (ulysses over all ranks), as a pool worker does. One torch thread per rank.
- `compile_s`: the first compiled sampling's wall time minus an eager one's (dynamo tracing plus the backend's
  build). Then eager and compiled samplings alternate `--repeats` times; `ms_per_step` are medians, `speedup` the
  median of per-pair ratios. `max_abs_err`: compiled vs eager latent.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from parallel_core.local_launch import run_on_ranks


def _inputs(model, spec: dict, compiled: bool):
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    from comfyui_xdit.testing.tiny_models import stand_in_conditioning

    def first(output):
        return output.result[0] if hasattr(output, "result") else output[0]

    if compiled:
        model = first(TorchCompileModel.execute(model, spec["backend"]))
    size = spec["size"]
    model = ModelSamplingFlux().patch(model, 1.15, 0.5, size * 8, size * 8)[0]
    guider = first(custom.BasicGuider.execute(model, stand_in_conditioning(100, 7)))
    sigmas = first(custom.BasicScheduler.execute(model, "simple", spec["steps"], 1.0))
    noise = first(custom.RandomNoise.execute(0))
    latent = torch.zeros(1, 16, size, size)
    return guider, first(custom.KSamplerSelect.execute("euler")), sigmas, noise.generate_noise({"samples": latent}), latent


def _rank(rank: int, world_size: int, path: str, spec: dict) -> dict:
    torch.set_num_threads(1)
    from comfyui_xdit.comfy_runtime import init_worker

    init_worker(cpu=True)
    import comfy.sd

    from comfyui_xdit.job import build_job, run_job
    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.shell_model import build_shell
    from parallel_core import ParallelConfig, init_parallel

    degrees = {"ulysses_degree": world_size}
    state = init_parallel(ParallelConfig(**degrees))
    model = parallelize(comfy.sd.load_diffusion_model(path), state)
    shell = build_shell(path, "default", PoolModelRef(path, "default", tuple(degrees.items()), world_size, "", 2))
    jobs = {kind: build_job(*_inputs(shell, spec, kind == "compiled"), None, 0) for kind in ("eager", "compiled")}

    def timed(kind: str) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        latent = run_job(model, jobs[kind], lambda *args: None, state)
        return time.perf_counter() - start, latent

    timed("eager")  # untimed: first use of every group
    eager_s, eager = timed("eager")
    first_compiled_s, compiled = timed("compiled")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(spec["repeats"]):
        for kind in times:
            times[kind].append(timed(kind)[0])
    return {"compile_s": first_compiled_s - eager_s, "times": times, "max_abs_err": (compiled - eager).abs().max().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="TorchCompileModel's backend (inductor, cudagraphs) or another torch.compile backend")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    spec = {"backend": args.backend, "steps": args.steps, "size": args.size, "repeats": args.repeats}
    from comfyui_xdit.comfy_runtime import import_comfy
    from comfyui_xdit.testing.tiny_models import write_tiny_flux

    import_comfy()
    with tempfile.TemporaryDirectory() as folder:
        path = str(write_tiny_flux(Path(folder) / "flux.safetensors", "dev", seed=0))
        print(f"running {args.world} ranks, backend {args.backend} ...", file=sys.stderr)
        per_rank = run_on_ranks(_rank, args.world, path, spec, timeout_s=3600)
    times = per_rank[0]["times"]
    eager, compiled = (statistics.median(times[k]) / args.steps * 1e3 for k in ("eager", "compiled"))
    print(json.dumps({
        "bench": "compile_step", "backend": args.backend, "world_size": args.world, "degrees": {"ulysses_degree": args.world},
        "latent": [args.size, args.size], "image_tokens": (args.size // 2) ** 2, "text_tokens": 7, "hidden": 256, "steps": args.steps,
        "compile_s": [round(r["compile_s"], 1) for r in per_rank], "eager_ms_per_step": round(eager, 1),
        "compiled_ms_per_step": round(compiled, 1),
        "speedup": round(statistics.median(e / c for e, c in zip(times["eager"], times["compiled"])), 3),
        "max_abs_err": max(r["max_abs_err"] for r in per_rank)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
