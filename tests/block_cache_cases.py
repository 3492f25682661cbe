"""Rank-side runs for the redundancy analysis and cache schedules (block_cache.py) on the tiny Flux.

Rank 0 runs the carried job in one process on the stock model (state None) as the reference; every rank runs it on
its parallel model (ulysses 2 on an uneven 9 x 11 token grid, 7 text tokens: both streams padded on rank 1), and the
scheduled jobs also under ring 2 and cfg 2, and under PipeFusion 2 (stage-loaded: each rank holds one block) and
patch 2, at full warmup (exact) and at the sampler's default warmup (stale keys/values). A
"freezer" object patch makes chosen blocks return, over a range of steps, the output they gave the step before the
range: the analysis must show zero change exactly there.
"""
from __future__ import annotations

import torch

from comfyui_xdit.comfy_runtime import init_worker

import cache_cases
import flux_cases

STEPS = 6
CASE = cache_cases.CacheCase("blocks", "", steps=STEPS)
# One cond, which every cfg rank computes (counted once), over 3 batch rows (data 2 pads one on rank 1, not counted).
BASIC_CASE = cache_cases.CacheCase("blocks-basic-batch3", "", guider="basic", steps=STEPS, batch=3, seed=6)
FROZEN_STEPS = (2, 3)  # sampling steps at which the frozen blocks repeat their step-1 output
BLOCKS = ("double_blocks.0", "single_blocks.0")  # the tiny Flux's, in execution order
FROZEN_BLOCKS = BLOCKS
# A schedule: whole steps 2 and 4, block 1 alone at step 3, block 0 alone at step 5 (under patch parallel, where a
# rank runs both blocks, tables named by call order would give block 1 block 0's table there).
SKIP = {2: "all", 4: "all", 3: [1], 5: [0]}
WARMUPS = {"exact": flux_cases.FULL_WARMUP, "stale": {"warmup_steps": 1}}  # the sampler node's default: 1


class Freezer:
    """A block forward (an object patch) that repeats its output of the step before FROZEN_STEPS during them."""

    def __init__(self, block: torch.nn.Module):
        self.block, self.kept = block, {}

    def __call__(self, *args, **kwargs):
        options = kwargs["transformer_options"]
        sample_sigmas = options["sample_sigmas"]
        step = int((sample_sigmas[:-1] - options["sigmas"].reshape(-1)[0].to(sample_sigmas)).abs().argmin())
        out = type(self.block).forward(self.block, *args, **kwargs)
        shape = tuple(args[0].shape) if args else tuple(kwargs["img"].shape)
        if step == FROZEN_STEPS[0] - 1:
            self.kept[shape] = _copy(out)
        return _copy(self.kept[shape]) if step in FROZEN_STEPS else out  # copies: the model updates streams in place


def _copy(out):
    return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


def frozen(model):
    model = model.clone()
    for name in FROZEN_BLOCKS:
        container, index = name.split(".")
        model.add_object_patch(f"diffusion_model.{name}.forward", Freezer(getattr(model.model.diffusion_model, container)[int(index)]))
    return model


def schedule(blocks: int) -> dict:
    return {"steps": STEPS, "reuse": {s: list(range(blocks)) if b == "all" else b for s, b in SKIP.items()}}


def _kit(path: str, degrees: dict, world_size: int):
    """The tiny Flux loaded in this process, and job(...) / run(model, job, state) on a shell MODEL for `degrees`."""
    init_worker(cpu=True)
    import comfy.sd

    from comfyui_xdit.block_cache import SCHEDULE_ATTACHMENT
    from comfyui_xdit.job import build_job, run_job
    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.shell_model import build_shell

    base = comfy.sd.load_diffusion_model(path)
    shell = build_shell(path, "default", PoolModelRef(path, "default", tuple(degrees.items()), world_size, "", 2))

    def job(analyse: bool, reuse: dict | None = None, case=CASE, stale: dict | None = None):
        model = shell.clone()
        if reuse is not None:
            model.set_attachments(SCHEDULE_ATTACHMENT, reuse)
        guider, sampler, sigmas, noise, latent = cache_cases.graph(model, case)
        return build_job(guider, sampler, sigmas, noise.generate_noise(latent), latent["samples"], None, noise.seed,
                         stale_options=stale, analyse=analyse)

    def run(model, the_job, state) -> dict:
        report: dict = {}
        report["samples"] = run_job(model, the_job, lambda *a: None, state, report)
        return report

    return base, job, run


def _stale_runs(path: str, base, job, run, configs: list[dict], names: tuple[str, ...]) -> dict:
    """Per config (PipeFusion / patch parallel): the runs `names` of uncached-stale, no-skip-stale (the empty
    schedule), schedule-exact and schedule-stale (WARMUPS)."""
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.stage_loading import load_stage
    from parallel_core import DEFAULT_BALANCE, ParallelConfig, init_parallel

    makers = {"uncached-stale": lambda: job(False, stale=WARMUPS["stale"]),
              "no-skip-stale": lambda: job(False, {"steps": STEPS, "reuse": {}}, stale=WARMUPS["stale"]),
              **{f"schedule-{w}": (lambda options=options: job(False, schedule(len(BLOCKS)), stale=options)) for w, options in WARMUPS.items()}}
    jobs = {name: makers[name]() for name in names}
    result = {}
    for config in configs:
        state = init_parallel(ParallelConfig(**config))
        stages = state.pipefusion.size
        # A PipeFusion rank holds only its stage's block: the schedule names blocks by their index in the whole model.
        model = parallelize(load_stage(path, "default", stages, state.pipefusion.rank, DEFAULT_BALANCE) if stages > 1 else base, state)
        result[flux_cases.tag(config)] = {name: run(model, the_job, state) for name, the_job in jobs.items()}
    return result


def blocks_rank(rank: int, world_size: int, path: str, degrees: dict, schedule_configs: list[dict],
                analysis_configs: list[dict], stale_configs: list[dict]) -> dict:
    """Every job on `degrees`' parallel model; the scheduled jobs also on each of `schedule_configs`', the analysis of
    CASE and BASIC_CASE on each of `analysis_configs`', and every _stale_runs run on each of `stale_configs`'."""
    base, job, run = _kit(path, degrees, world_size)  # first: it sets ComfyUI up for the CPU
    from comfyui_xdit.parallel_model import parallelize
    from parallel_core import ParallelConfig, init_parallel

    jobs = {"analysis": job(True), "uncached": job(False), "no-skip": job(False, {"steps": STEPS, "reuse": {}}),
            "schedule": job(False, schedule(len(BLOCKS)))}
    result: dict = {"names": list(BLOCKS)}
    if rank == 0:
        result["one"] = {name: run(base, the_job, None) for name, the_job in jobs.items()}
        result["one"]["frozen"] = run(frozen(base), jobs["analysis"], None)
    state = init_parallel(ParallelConfig(**degrees))
    model = parallelize(base, state)
    result["pool"] = {name: run(model, the_job, state) for name, the_job in jobs.items()}
    result["pool"]["frozen"] = run(frozen(model), jobs["analysis"], state)
    for config in schedule_configs:
        state = init_parallel(ParallelConfig(**config))
        model = parallelize(base, state)
        result[flux_cases.tag(config)] = {name: run(model, jobs[name], state) for name in ("no-skip", "schedule")}
    result.update(_stale_runs(path, base, job, run, stale_configs, ("uncached-stale", "no-skip-stale", "schedule-exact", "schedule-stale")))
    analyses = {case.name: job(True, case=case) for case in (CASE, BASIC_CASE)}
    if rank == 0:
        result["one_analysis"] = {name: run(base, the_job, None)["block_changes"] for name, the_job in analyses.items()}
    for config in analysis_configs:
        state = init_parallel(ParallelConfig(**config))
        model = parallelize(base, state)
        result[f"analysis-{flux_cases.tag(config)}"] = {name: run(model, the_job, state)["block_changes"] for name, the_job in analyses.items()}
    return result


def stale_rank(rank: int, world_size: int, path: str, configs: list[dict]) -> dict:
    """The schedule at both warmups on each of `configs`' models (world 4: PipeFusion or patch parallel combined
    with another method); rank 0 adds the one-process scheduled and uncached latents."""
    base, job, run = _kit(path, configs[0], world_size)
    result: dict = {}
    if rank == 0:
        result["one"] = {"schedule": run(base, job(False, schedule(len(BLOCKS))), None), "uncached": run(base, job(False), None)}
    result.update(_stale_runs(path, base, job, run, configs, ("schedule-exact", "schedule-stale")))
    return result
