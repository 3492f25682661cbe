"""Per-step time of ComfyUI's own Flux on local CPU gloo ranks: 1 rank vs Ulysses-2, Ring-2 and CFG-2.

    python -m comfyui_xdit.bench.flux_step [--pairs 5] [--repeats 2] [--text-tokens 256] [--no-mix] [--wait-load 1.2]
                                           [--diffusers]

Prints one JSON line per (model shape, configuration) on stdout; progress goes to stderr.

Method
- Models: seeded checkpoints written with `write_tiny_flux(path, "dev", "bench", seed, **overrides)` and loaded in
  every rank with `comfy.sd.load_diffusion_model`, so the forward is ComfyUI 0.30.0's own Flux code. Two shapes:
  "bench" (a 128x128 latent = 4096 image tokens; by default hidden 512 = 4 heads of 128, 1 double + 2 single
  blocks: FLUX_SIZES["bench"], hidden 768 with 2 + 4 blocks, takes ~16 s a step here, and tests pin that size, so
  the bench passes overrides instead) and "flux_mix" (hidden 768 =
  6 heads, 64x64 latent = 1024 image tokens: attention is ~20% of the FLOPs, like Flux-dev at 1024^2). Every line
  states the shape it ran and its `attention_flop_share`, computed from the shapes (`flux_flops`).
- Attention kernel: ComfyUI on CPU defaults to its sub-quadratic attention, about 2x slower than torch SDPA (which
  parallel_core's attention uses) at these shapes; a stock baseline with it would credit the kernel change to
  parallelism. Every rank therefore runs ComfyUI with --use-pytorch-cross-attention (`--comfy-attention pytorch`),
  so the baseline and the parallel runs use the same SDPA kernel; `--comfy-attention default` measures the former.
  CFG-2 ranks run parallel_core's attention too (the Flux adapter routes attention through it for any degrees).
- Sampling is what SamplerCustomAdvanced does with stock nodes (ModelSamplingFlux -> BasicGuider or CFGGuider ->
  BasicScheduler "simple", KSamplerSelect euler, RandomNoise), like tests/flux_cases.py. The text conditioning
  has `--text-tokens` rows (256 by default: ComfyUI's Flux T5 tokenizer pads every prompt to at least 256).
- One spawn of 2 ranks (`run_on_ranks`, `threads_per_rank` torch threads each) runs everything, so spawn, ComfyUI
  import and model loading are excluded. The 1-rank baselines are the unpatched ModelPatcher on rank 0 while
  rank 1 waits in a barrier (its CPU use then is reported as `idle_rank_cpu_share`, ~0): same process, same
  thread count, stock code path. Parallel runs use `parallelize(model, state)` on both ranks.
- Interleaving: each round runs ulysses, single, ring, cfg, single-cfg (odd rounds reversed), so every parallel
  run sits next to its baseline of the same round; per-pair ratio = baseline_ms[k] / method_ms[k] and
  `speedup_vs_1` is the median of those ratios. ulysses and ring pair with "single" (BasicGuider, one forward per
  step); cfg pairs with "single-cfg" (CFGGuider cfg 3.5 on one rank: ComfyUI batches both conds into one forward).
- Step time: a sampler_post_cfg_function (stock ModelPatcher hook, called once per step after the model) stamps
  perf_counter on rank 0; step i lasts stamp[i] - stamp[i-1] (step 1 from the call, which adds only ComfyUI's
  per-call setup, a few ms). Each run samples `repeats` steps, and a run's time is the median of them; in the first
  round every configuration samples `warmup` extra first steps that are dropped (first model load, first use of
  each gloo group); later rounds' first steps measured no slower than their others. Parallel ranks are
  synchronised by their collectives every step, so rank 0's step time is the slowest rank's.
- Bytes: `bytes_per_rank_per_step` is what each rank recorded on `state.comm` over a run, divided by its steps.
  `theoretical_bytes_per_step` (see `theoretical_step_bytes`): each rank's rows are its image and text shards,
  N = S/P + T/P of them, and they travel together: Ulysses per attention call 3*B*N*H*D*4*(U-1)/U in +
  B*N*H*D*4*(U-1)/U out; Ring (R-1)*2*B*(U*N)*(H/U)*D*4 per call; calls = depth + single_depth per forward, plus the
  forward's output all-gather B*(S/P)*64*4*(P-1); CFG: each rank broadcasts the prediction of each cond it owns,
  latent bytes * (world-1).
- `comm_only_ms_per_step`: the step's collectives replayed alone (same shapes, same gloo groups, no compute),
  median of `repeats` replays; divided by the step time it bounds the communication share (Ring overlaps its K/V
  transfer with compute, so for Ring it is an upper bound on what is exposed).
- `flop_bound_speedup`: total FLOPs / the FLOPs of one rank, i.e. the speedup with free communication: sequence
  parallelism splits image and text rows of every linear layer and the attention; every rank repeats only the
  modulation/embedders (per sample); CFG-2 splits whole forwards (2.0).
- `max_abs_err`: the parallel run's final latent vs the 1-rank latent of the same round (same seed).
- `cpu_ms_per_step_by_rank` (the process: compute and gloo's threads) and `main_thread_cpu_ms_per_step_by_rank`:
  CPU time per step on each rank that ran (medians over rounds, warmup steps included): the work a rank does,
  which another process's load changes far less than it changes wall time.
- `--diffusers` (diffusers_flux.py): diffusers' own FluxTransformer2DModel at the same sizes (fp32, its default
  init from the same seed on every rank), one forward per timed step, on 1 rank (rank 1 waiting, as for ours) and
  with its Ulysses-2 and Ring-2 context parallelism over the same gloo world; its three runs follow ours in each
  round (precede them in odd rounds). Its lines give `median_forward_ms`, `speedup_vs_1` against its own 1-rank
  runs, `max_abs_err` against its own 1-rank output, and our same method's speedup and step time from this run.
  A diffusers forward has no sampler around it: a ComfyUI step adds the sampler's per-step work to the forward.
- `median_steady_step_ms` and `steady_speedup_vs_1`: the same over the steps after each run's first interval only.
  The first interval is timed from SamplerCustomAdvanced's start, so it also holds ComfyUI's set-up of the
  sampling (noise, conds, the model's loaded check), which a real prompt pays once for all its steps and a bare
  forward never pays (with the default 2 timed steps and 1 warmup step: two steps in the first round, one in each
  later round). The diffusers lines repeat them for ours
  as `xdit_steady_speedup_vs_1` and `xdit_median_steady_step_ms`.
- `--profile` (profile_categories.py): torch.profiler over one step of each of our configurations on every rank,
  and with `--diffusers` over one forward of each diffusers model, its modules and RoPE application labelled the
  way ours are (diffusers_flux.profile_labels), so both print self-CPU ms in the same categories.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from comfyui_xdit.bench.attention import METHODS, time_across_ranks
from comfyui_xdit.bench.diffusers_flux import DIFFUSERS_METHODS, DIFFUSERS_VERSION, require_diffusers
from parallel_core.local_launch import run_on_ranks

# configuration -> (ParallelConfig kwargs or None for the 1-rank baseline, guider, baseline it is paired with)
CONFIGS: dict[str, tuple[dict | None, str, str | None]] = {
    "single": (None, "basic", None),
    "ulysses": ({"ulysses_degree": METHODS["ulysses"][0], "ring_degree": METHODS["ulysses"][1]}, "basic", "single"),
    "ring": ({"ulysses_degree": METHODS["ring"][0], "ring_degree": METHODS["ring"][1]}, "basic", "single"),
    "single-cfg": (None, "cfg", None),
    "cfg": ({"cfg_degree": 2}, "cfg", "single-cfg"),
}
ROUND_ORDER = ("ulysses", "single", "ring", "cfg", "single-cfg")  # each parallel run next to its baseline
PARALLEL = ("ulysses", "ring", "cfg")
PROFILED = ("single", "ulysses", "ring", "cfg")
DIFFUSERS_PROFILED = ("diffusers-single", "diffusers-ulysses", "diffusers-ring")
DIFFUSERS_ORDER = ("diffusers-ulysses", "diffusers-single", "diffusers-ring")
DIFFUSERS_PARALLEL = ("diffusers-ulysses", "diffusers-ring")
WORLD = 2
CFG_SCALE = 3.5
LATENT_CHANNELS = 16
PATCH = 2
OUT_FEATURES = LATENT_CHANNELS * PATCH * PATCH  # final layer's per-token output (64)
ELT = 4  # fp32


# --------------------------------------------------------------------------------------------------- FLOP model
def flux_flops(hidden: int, depth: int, single_depth: int, image_tokens: int, text_tokens: int, batch: int = 1,
               context_dim: int = 64, vec_dim: int = 32, mlp_ratio: float = 4.0) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one Flux forward, by what a sequence-parallel rank does with them.

    Per token and block (double: each stream; single: linear1 h->(3+m)h, linear2 (1+m)h->h) the linear layers cost
    2*(4+2m)*h^2; joint attention over N = S + T tokens costs 4*N^2*h per block (QK^T and PV). Embedders and
    modulation are per sample. Norms, RoPE, softmax and other elementwise work are not counted. The total equals
    torch.utils.flop_counter.FlopCounterMode's count of ComfyUI's Flux forward (addmm + baddbmm/bmm) exactly.
    """
    h, s, t, blocks = hidden, image_tokens, text_tokens, depth + single_depth
    n = s + t
    per_token = 2 * (4 + 2 * mlp_ratio) * h * h
    attention = blocks * 4 * n * n * h
    linear_image = blocks * s * per_token + 2 * s * OUT_FEATURES * h + 2 * s * h * OUT_FEATURES  # + img_in, final linear
    linear_text = blocks * t * per_token + 2 * t * context_dim * h  # + txt_in
    per_sample = (2 * 2 * (256 * h + h * h)  # time_in, guidance_in
                  + 2 * (vec_dim * h + h * h)  # vector_in
                  + depth * 2 * 2 * 6 * h * h + single_depth * 2 * 3 * h * h + 2 * 2 * h * h)  # modulations
    parts = {"attention": attention, "linear_image": linear_image, "linear_text": linear_text, "per_sample": per_sample}
    return {k: float(v * batch) for k, v in parts.items()}


def attention_flop_share(flops: dict[str, float]) -> float:
    return flops["attention"] / sum(flops.values())


def flop_bound_speedup(method: str, flops: dict[str, float], degree: int = 2) -> float:
    """Speedup over one rank if communication were free and ranks perfectly overlapped (see module docstring)."""
    total = sum(flops.values())
    if method == "cfg":
        return float(degree)
    # Text rows are sharded like image rows, in the linear layers and in attention (queries and keys).
    per_rank = (flops["attention"] + flops["linear_image"] + flops["linear_text"]) / degree + flops["per_sample"]
    return total / per_rank


# ------------------------------------------------------------------------------------------------- byte model
def theoretical_step_bytes(method: str, batch: int, image_tokens: int, text_tokens: int, heads: int, head_dim: int,
                           calls: int, latent_hw: tuple[int, int]) -> dict[str, int]:
    """Bytes one rank sends per sampling step, by collective (see the module docstring)."""
    if method == "cfg":
        # 2 conds, one owned by each of the 2 cfg ranks: the owner broadcasts its prediction to the other rank.
        owned = 2 // WORLD
        return {"broadcast/cfg": owned * batch * LATENT_CHANNELS * latent_hw[0] * latent_hw[1] * ELT * (WORLD - 1)}
    u, r = METHODS[method]
    p = u * r
    local = -(-image_tokens // p)
    rows = local + -(-text_tokens // p)  # each rank's image and text rows travel together (usp_segments_attention)
    heads_here = -(-heads // u)
    out = {}
    if u > 1:  # q, k, v in and the output back, (U-1)/U of each
        out["all_to_all/ulysses"] = calls * 4 * batch * rows * heads_here * u * head_dim * ELT * (u - 1) // u
    if r > 1:
        out["ring_send/ring"] = calls * (r - 1) * 2 * batch * (u * rows) * heads_here * head_dim * ELT
    out["all_gather/sequence"] = batch * local * OUT_FEATURES * ELT * (p - 1)  # the forward's output rows
    return out


# ---------------------------------------------------------------------------------------------- rank side
def _first(node_output):
    return node_output.result[0] if hasattr(node_output, "result") else node_output[0]


@torch.inference_mode()  # as ComfyUI runs a prompt's nodes (and the pool's workers their jobs)
def _sample(model_patcher, guider_kind: str, job: dict, steps: int, seed: int, on_step=None,
            sampler_name: str = "euler") -> tuple[torch.Tensor, list[float]]:
    """SamplerCustomAdvanced with stock nodes; returns the latent and one perf_counter stamp per step (+ start).
    `on_step()` runs at the end of every step."""
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    from comfyui_xdit.testing.tiny_models import stand_in_conditioning

    h, w = job["latent"]
    model = ModelSamplingFlux().patch(model_patcher, 1.15, 0.5, w * 8, h * 8)[0]
    stamps: list[float] = []

    def stamp(args):
        stamps.append(time.perf_counter())
        if on_step is not None:
            on_step()
        return args["denoised"]

    model.set_model_sampler_post_cfg_function(stamp)
    positive = stand_in_conditioning(100, job["text_tokens"])
    if guider_kind == "cfg":
        guider = _first(custom.CFGGuider.execute(model, positive, stand_in_conditioning(200, job["text_tokens"]), CFG_SCALE))
    else:
        guider = _first(custom.BasicGuider.execute(model, positive))
    sigmas = _first(custom.BasicScheduler.execute(model, "simple", steps, 1.0))
    sampler = _first(custom.KSamplerSelect.execute(sampler_name))
    noise = _first(custom.RandomNoise.execute(seed))
    latent = {"samples": torch.zeros(1, LATENT_CHANNELS, h, w)}
    start = time.perf_counter()
    samples = _first(custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent))["samples"]
    return samples, [start, *stamps]


def _replay_step_comm(method: str, state, job: dict, spec: dict) -> dict:
    """The collectives of one step of `method`, alone, on this rank's groups: median ms over `repeats` replays."""
    import parallel_core as pc
    from parallel_core.comm import CommStats, RingShift

    stats = CommStats()
    b, s, t, heads, d = 1, job["image_tokens"], job["text_tokens"], job["heads"], 128
    calls = job["depth"] + job["single_depth"]

    def replay():
        if method == "cfg":
            pred = torch.zeros(1, LATENT_CHANNELS, *job["latent"])
            for owner in range(2):
                pc.broadcast(pred, owner % state.cfg.size, state.cfg, stats)
            return
        u, r = state.ulysses.size, state.ring.size
        local = -(-s // (u * r))
        rows = local + -(-t // (u * r))
        heads_here = -(-heads // u)
        for _ in range(calls):
            qkv = [torch.zeros(b, rows, heads_here * u, d) for _ in range(3)]
            kv = pc.comm.sequence_to_heads(qkv, heads_here * u, state.ulysses, stats)[1:]
            for _step in range(r - 1):
                kv = RingShift(kv, state.ring, stats).wait()
            pc.comm.heads_to_sequence(torch.zeros(b, u * rows, heads_here, d), heads, state.ulysses, stats)
        pc.all_gather(torch.zeros(b, local, OUT_FEATURES), 1, state.sequence, stats)

    replay()  # warm
    stats.reset()
    times = time_across_ranks(replay, spec["repeats"])
    return {"ms": statistics.median(times), "bytes": stats.bytes_sent() // spec["repeats"]}


def _diffusers_models(job: dict, spec: dict) -> dict:
    """diffusers' Flux at the job's shape: the 1-rank model and its Ulysses-2 and Ring-2 copies (collective)."""
    from ray_backend.collector import collector_paused

    with collector_paused(then_freeze=True):  # diffusers' modules frozen as ComfyUI's are (import_comfy_on_rank)
        from diffusers import ContextParallelConfig, FluxTransformer2DModel  # noqa: F401  (their modules load here)

        from comfyui_xdit.bench import diffusers_flux
    single = diffusers_flux.flux_transformer(job["hidden"], job["depth"], job["single_depth"], spec["seed"])
    models = {"diffusers-single": single}
    for name, degrees in DIFFUSERS_METHODS.items():
        if degrees is not None:
            models[name] = diffusers_flux.parallel_copy(single, degrees)
    return {**models, "inputs": diffusers_flux.flux_inputs(job["latent"], job["text_tokens"], spec["seed"]), "outputs": {}}


def _diffusers_round(name: str, theirs: dict, runs: dict, rank: int, spec: dict, k: int) -> None:
    """One timed run of a diffusers model: `repeats` forwards (plus the first round's warmup), median ms on rank 0.
    The 1-rank model runs on rank 0 while the other rank waits, as our 1-rank baseline does."""
    from comfyui_xdit.bench import diffusers_flux

    warmup = spec["warmup"] if k == 0 else 0
    dist.barrier()
    load = os.getloadavg()[0]
    if name == "diffusers-single" and rank != 0:
        dist.barrier()
        runs[name].append({})
        return
    times = []
    cpu0, thread0 = _cpu_s(), time.thread_time()
    for _ in range(warmup + spec["repeats"]):
        start = time.perf_counter()
        out = diffusers_flux.forward(theirs[name], theirs["inputs"])
        times.append((time.perf_counter() - start) * 1e3)
    forwards = warmup + spec["repeats"]
    theirs["outputs"][name] = out
    runs[name].append({"step_ms": times, "median_ms": statistics.median(times[warmup:]), "load": (load, os.getloadavg()[0]),
                       "cpu_ms_per_step": (_cpu_s() - cpu0) * 1e3 / forwards,
                       "main_thread_cpu_ms_per_step": (time.thread_time() - thread0) * 1e3 / forwards})
    dist.barrier()
    if rank == 0:
        print(f"[bench] round {k + 1}/{spec['pairs']} {name}: {runs[name][-1]['median_ms']:.0f} ms/forward "
              f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


def _label_flux_modules(diffusion_model) -> list:
    """Forward hooks opening a profiler range around the model call, its modulation and conditioning embedders
    (per-sample work) and its RoPE table (profile_categories' labels); returns the hook handles."""
    from comfy.ldm.flux import layers

    from comfyui_xdit.bench.profile_categories import MODEL, MODULATION, ROPE, label_modules

    def kind(name: str, module, _parent) -> str | None:
        if module is diffusion_model:
            return MODEL
        if isinstance(module, layers.Modulation) or name.endswith("adaLN_modulation") or name in ("time_in", "vector_in", "guidance_in"):
            return MODULATION
        return ROPE if isinstance(module, layers.EmbedND) else None

    return label_modules(diffusion_model, kind)


def _profile_result(profiler, ms_key: str, ms: float) -> dict:
    from comfyui_xdit.bench.profile_categories import breakdown

    by_category = breakdown(profiler.events())
    top = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {ms_key: round(ms, 1), "ms_by_category": {k: round(v, 1) for k, v in by_category.items()},
            "top_self_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in top}}


def _profile_step(model_patcher, guider: str, job: dict, seed: int) -> dict:
    """torch.profiler over the second of two sampling steps on this rank: ms by profile_categories' category."""
    handles = _label_flux_modules(model_patcher.model.diffusion_model)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                      schedule=torch.profiler.schedule(wait=1, warmup=0, active=1))
    try:
        with profiler:
            _, stamps = _sample(model_patcher, guider, job, 2, seed, on_step=profiler.step)
    finally:
        for handle in handles:
            handle.remove()
    return _profile_result(profiler, "step_ms", (stamps[2] - stamps[1]) * 1e3)


def _profile_forward(model, inputs: dict) -> dict:
    """torch.profiler over the second of two diffusers forwards on this rank, its modules and RoPE application
    labelled as ours are (diffusers_flux.profile_labels): ms by profile_categories' category."""
    from comfyui_xdit.bench import diffusers_flux

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                      schedule=torch.profiler.schedule(wait=1, warmup=0, active=1))
    with diffusers_flux.profile_labels(model), profiler:
        for _ in range(2):
            start = time.perf_counter()
            diffusers_flux.forward(model, inputs)
            ms = (time.perf_counter() - start) * 1e3
            profiler.step()
    return _profile_result(profiler, "forward_ms", ms)


def _profile_rank(rank: int, base, models: dict, theirs: dict, job: dict, spec: dict) -> dict:
    """One profiled step per configuration and rank, then one diffusers forward per diffusers model when the bench
    runs them (the 1-rank baselines on rank 0 while rank 1 waits)."""
    out = {}
    for name in (*PROFILED, *(DIFFUSERS_PROFILED if theirs else ())):
        one_rank = CONFIGS[name][0] is None if name in CONFIGS else DIFFUSERS_METHODS[name] is None
        dist.barrier()
        if one_rank and rank != 0:
            dist.barrier()
            continue
        if name in CONFIGS:
            out[name] = _profile_step(base if one_rank else models[name], CONFIGS[name][1], job, spec["seed"])
        else:
            out[name] = _profile_forward(theirs[name], theirs["inputs"])
        dist.barrier()
    return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def import_comfy_on_rank(attention: str) -> str:
    """Import ComfyUI in this rank (CPU) as a pool worker does: with the cyclic collector paused and what the imports
    left frozen after (otherwise a full collection, 0.12-0.15 s here, lands in some timed step, and in a parallel
    step every rank waits for it). "pytorch" sets --use-pytorch-cross-attention first. Returns the kernel."""
    from comfyui_xdit.comfy_runtime import comfyui_path, init_worker
    from ray_backend.collector import collector_paused

    with collector_paused(then_freeze=True):
        if attention == "pytorch":
            root = str(comfyui_path(prepare=False))
            if root not in sys.path:
                sys.path.insert(0, root)
            import comfy.cli_args

            comfy.cli_args.args.use_pytorch_cross_attention = True  # read when comfy.model_management is imported
        init_worker(cpu=True)
        import comfy.ldm.modules.attention
        import comfy.samplers  # noqa: F401  (the job modules a worker imports with ComfyUI)
        import comfy.sd  # noqa: F401

    return comfy.ldm.modules.attention.optimized_attention.__name__


def _bench_rank(rank: int, world_size: int, spec: dict) -> list[dict]:
    """Every job's interleaved rounds on this rank (one spawn for the whole bench)."""
    comfy_kernel = import_comfy_on_rank(spec["comfy_attention"])
    import comfy.sd
    import comfy.utils

    from comfyui_xdit.parallel_model import parallelize
    from parallel_core import ParallelConfig, init_parallel

    comfy.utils.set_progress_bar_enabled(False)
    # Group creation is collective: every rank builds every state, in the same order.
    states = {name: init_parallel(ParallelConfig(**CONFIGS[name][0])) for name in PARALLEL}
    results = []
    for job in spec["jobs"]:
        base = comfy.sd.load_diffusion_model(job["path"])
        models = {name: parallelize(base, states[name]) for name in PARALLEL}
        theirs = _diffusers_models(job, spec) if spec["diffusers"] else {}
        runs: dict[str, list[dict]] = {name: [] for name in (*CONFIGS, *theirs)}
        latents: dict[str, torch.Tensor] = {}
        for k in range(spec["pairs"]):
            order = ROUND_ORDER if k % 2 == 0 else tuple(reversed(ROUND_ORDER))
            if theirs:  # diffusers' runs right after ours (before them in odd rounds), in the same pattern
                order = (*order, *DIFFUSERS_ORDER) if k % 2 == 0 else (*reversed(DIFFUSERS_ORDER), *order)
            for name in order:
                if name in theirs:
                    _diffusers_round(name, theirs, runs, rank, spec, k)
                    continue
                degrees, guider, baseline = CONFIGS[name]
                seed = spec["seed"] + k
                warmup = spec["warmup"] if k == 0 else 0
                steps = warmup + spec["repeats"]
                dist.barrier()
                load = os.getloadavg()[0]
                if degrees is None and rank != 0:
                    cpu0, wall0 = _cpu_s(), time.perf_counter()
                    dist.barrier()  # rank 0 samples alone
                    runs[name].append({"idle_cpu_s": _cpu_s() - cpu0, "idle_wall_s": time.perf_counter() - wall0})
                    continue
                state = states.get(name)
                if state is not None:
                    state.comm.reset()
                cpu0, thread0 = _cpu_s(), time.thread_time()
                latent, stamps = _sample(base if degrees is None else models[name], guider, job, steps, seed)
                cpu_s, thread_s = _cpu_s() - cpu0, time.thread_time() - thread0
                step_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
                if len(step_ms) != steps:
                    raise RuntimeError(f"{name}: {len(step_ms)} step stamps for {steps} steps")
                steady = step_ms[max(warmup, 1):]  # the first interval also holds the sampler's set-up
                record = {
                    "step_ms": step_ms,
                    "median_ms": statistics.median(step_ms[warmup:]),
                    "steady_ms": statistics.median(steady) if steady else None,
                    "bytes_per_step": {key: n / steps for key, n in state.comm.snapshot().items()} if state else {},
                    "load": (load, os.getloadavg()[0]),
                    "cpu_ms_per_step": cpu_s * 1e3 / steps,
                    "main_thread_cpu_ms_per_step": thread_s * 1e3 / steps,
                }
                if rank == 0:
                    latents[name] = latent
                    record["latent_absmax"] = latent.abs().max().item()
                runs[name].append(record)
                dist.barrier()
                if rank == 0:
                    print(f"[bench] {job['name']} round {k + 1}/{spec['pairs']} {name}: {record['median_ms']:.0f} ms/step "
                          f"(steps {', '.join(f'{x:.0f}' for x in step_ms)}; load {os.getloadavg()[0]:.2f})",
                          file=sys.stderr, flush=True)
            if rank == 0:  # each parallel latent against its baseline of the same round
                for name in PARALLEL:
                    runs[name][-1]["max_abs_err"] = (latents[name] - latents[CONFIGS[name][2]]).abs().max().item()
                for name in DIFFUSERS_PARALLEL if theirs else ():
                    runs[name][-1]["max_abs_err"] = (theirs["outputs"][name] - theirs["outputs"]["diffusers-single"]).abs().max().item()
        comm = {name: _replay_step_comm(name, states[name], job, spec) for name in PARALLEL}
        results.append({"runs": runs, "comm_replay": comm, "comfy_kernel": comfy_kernel,
                        "profile": _profile_rank(rank, base, models, theirs, job, spec) if spec["profile"] else {}})
        del models, base
    return results


# ----------------------------------------------------------------------------------------------- parent side
def _write_models(jobs: list[dict], directory: Path, seed: int) -> None:
    from comfyui_xdit.testing.tiny_models import flux_config, write_tiny_flux

    for job in jobs:
        path = directory / f"flux_step_{job['name']}.safetensors"
        write_tiny_flux(path, "dev", "bench", seed, **job["overrides"])
        config = flux_config("dev", "bench", **job["overrides"])
        job.update(path=str(path), heads=config["num_heads"], hidden=config["hidden_size"], depth=config["depth"],
                   single_depth=config["depth_single_blocks"])


def _records(job: dict, result: dict, spec: dict, threads: int) -> list[dict]:
    idle = result["idle_runs"]["single"] + result["idle_runs"]["single-cfg"]  # rank 1 while rank 0 ran alone
    flops = flux_flops(job["hidden"], job["depth"], job["single_depth"], job["image_tokens"], job["text_tokens"])
    share = attention_flop_share(flops)
    calls = job["depth"] + job["single_depth"]
    common = {
        "model": job["name"],
        "model_file": {"size": "bench", "overrides": job["overrides"]},
        "latent": list(job["latent"]),
        "image_tokens": job["image_tokens"],
        "text_tokens": job["text_tokens"],
        "hidden": job["hidden"],
        "heads": job["heads"],
        "head_dim": 128,
        "depth": job["depth"],
        "single_depth": job["single_depth"],
        "attention_flop_share": round(share, 3),
        "gflop_per_forward": round(sum(flops.values()) / 1e9, 1),
        "threads_per_rank": threads,
        "timed_steps_per_run": spec["repeats"],
        "warmup_steps_first_round": spec["warmup"],
        "pairs": spec["pairs"],
        "sampler": "euler",
        "comfy_attention": result["comfy_kernel"],
        "xdit_attention": "parallel_core auto backend (torch_cpu_flash on CPU)",
    }
    out = []
    for name, (degrees, guider, baseline) in CONFIGS.items():
        rank0 = result["runs_rank0"][name]
        loads = [x for run in rank0 for x in run["load"]]
        line = {"method": name if degrees is None else f"{name}-2", "world_size": 1 if degrees is None else WORLD,
                "degrees": degrees or {}, "guider": "CFGGuider cfg 3.5 (2 conds/step)" if guider == "cfg" else "BasicGuider (1 cond/step)",
                **common}
        mine = [run["median_ms"] for run in rank0]
        line["median_step_ms"] = round(statistics.median(mine), 1)
        line.update(_cpu_by_rank(result["runs_by_rank"][name]))  # work per rank, less sensitive to load
        line["per_pair_step_ms"] = [round(x, 1) for x in mine]
        steady = [run["steady_ms"] for run in rank0]
        if None not in steady:
            line["median_steady_step_ms"] = round(statistics.median(steady), 1)
        line["per_pair_loadavg_1m"] = [round(run["load"][0], 2) for run in rank0]
        if baseline is None:
            line["latent_absmax"] = round(max(run["latent_absmax"] for run in rank0), 3)
            if name == "single":
                idle_cpu = sum(run["idle_cpu_s"] for run in idle)
                idle_wall = sum(run["idle_wall_s"] for run in idle)
                line["idle_rank_cpu_share"] = round(idle_cpu / idle_wall, 4) if idle_wall else None
        else:
            base_ms = [run["median_ms"] for run in result["runs_rank0"][baseline]]
            ratios = [b / m for b, m in zip(base_ms, mine)]
            base_steady = [run["steady_ms"] for run in result["runs_rank0"][baseline]]
            if None not in steady and None not in base_steady:
                line["steady_speedup_vs_1"] = round(statistics.median(b / m for b, m in zip(base_steady, steady)), 3)
            method = name
            theory = theoretical_step_bytes(method, 1, job["image_tokens"], job["text_tokens"], job["heads"], 128, calls, job["latent"])
            measured = result["bytes_by_rank"][name]
            replay = result["comm_replay"][name]
            line.update({
                "baseline": baseline,
                "per_pair_baseline_ms": [round(x, 1) for x in base_ms],
                "per_pair_ratio": [round(x, 3) for x in ratios],
                "speedup_vs_1": round(statistics.median(ratios), 3),
                "flop_bound_speedup": round(flop_bound_speedup(method, flops), 3),
                "bytes_per_rank_per_step": sum(measured[0].values()),
                "measured_breakdown": measured[0],
                "bytes_by_rank_per_step": [sum(m.values()) for m in measured],
                "theoretical_bytes_per_step": sum(theory.values()),
                "theoretical_breakdown": theory,
                "bytes_match": all(m == theory for m in measured),
                "comm_only_ms_per_step": round(replay["ms"], 1),
                "comm_share_of_step": round(replay["ms"] / statistics.median(mine), 3),
                "max_abs_err": max(run["max_abs_err"] for run in rank0),
            })
        line["loadavg_1m"] = [round(min(loads), 2), round(max(loads), 2)]
        out.append(line)
    if "diffusers-single" in result["runs_rank0"]:
        ours = {line["method"]: line for line in out}
        out.extend(_diffusers_records(result["runs_rank0"], result["runs_by_rank"], common, ours))
    return out


def _cpu_by_rank(runs_by_rank: list[list[dict]]) -> dict[str, list[float]]:
    """Median CPU ms per step of each rank that ran (a 1-rank baseline's waiting rank has no records)."""
    return {f"{key}_by_rank": [round(statistics.median(run[key] for run in runs), 1) for runs in runs_by_rank if runs and key in runs[0]]
            for key in ("cpu_ms_per_step", "main_thread_cpu_ms_per_step")}


def _diffusers_records(runs: dict, runs_by_rank: dict, common: dict, ours: dict) -> list[dict]:
    """diffusers' lines: its 1-rank forward and its Ulysses-2 / Ring-2 forwards, each speedup against its own 1-rank
    runs of the same rounds, beside our same method's speedup and step time from this run."""
    base_ms = [run["median_ms"] for run in runs["diffusers-single"]]
    lines = []
    for name, degrees in DIFFUSERS_METHODS.items():
        rank0 = runs[name]
        mine = [run["median_ms"] for run in rank0]
        loads = [x for run in rank0 for x in run["load"]]
        line = {"method": name if degrees is None else f"{name}-2", "world_size": 1 if degrees is None else WORLD,
                "degrees": {} if degrees is None else {"ulysses_degree": degrees[0], "ring_degree": degrees[1]},
                "implementation": f"diffusers {DIFFUSERS_VERSION} FluxTransformer2DModel, one forward (no sampler), "
                                  "context parallelism over gloo; attention: its native backend (torch SDPA on CPU; "
                                  "Ring: the same CPU flash kernel with its LSE)",
                **{k: v for k, v in common.items() if k not in ("sampler", "comfy_attention", "xdit_attention")},
                "median_forward_ms": round(statistics.median(mine), 1),
                "per_pair_forward_ms": [round(x, 1) for x in mine],
                "per_pair_loadavg_1m": [round(run["load"][0], 2) for run in rank0],
                **_cpu_by_rank(runs_by_rank[name]),
                "loadavg_1m": [round(min(loads), 2), round(max(loads), 2)]}
        if degrees is not None:
            ratios = [b / m for b, m in zip(base_ms, mine)]
            ours_line = ours[name.removeprefix("diffusers-") + "-2"]
            line.update({"baseline": "diffusers-single", "per_pair_ratio": [round(x, 3) for x in ratios],
                         "speedup_vs_1": round(statistics.median(ratios), 3),
                         "max_abs_err": max(run["max_abs_err"] for run in rank0),
                         "xdit_speedup_vs_1": ours_line["speedup_vs_1"],
                         "xdit_median_step_ms": ours_line["median_step_ms"],
                         **{f"xdit_{key}": ours_line[key] for key in ("steady_speedup_vs_1", "median_steady_step_ms")
                            if key in ours_line}})
        lines.append(line)
    return lines


def _jobs(args) -> list[dict]:
    jobs = [{
        "name": "bench",
        "latent": (args.latent, args.latent),
        "overrides": {"hidden_size": args.hidden, "depth": args.depth, "depth_single_blocks": args.single_depth},
    }]
    if args.mix:
        jobs.append({
            "name": "flux_mix",
            "latent": (args.mix_latent, args.mix_latent),
            "overrides": {"hidden_size": args.mix_hidden, "depth": args.mix_depth, "depth_single_blocks": args.mix_single_depth},
        })
    for job in jobs:
        h, w = job["latent"]
        job["image_tokens"] = ((h + 1) // PATCH) * ((w + 1) // PATCH)
        job["text_tokens"] = args.text_tokens
    return jobs


def _reference_line(text_tokens: int) -> dict:
    """The same FLOP model for real Flux-dev at 1024^2 (not run): what the bench shapes are compared with."""
    flops = flux_flops(3072, 19, 38, 4096, text_tokens, context_dim=4096, vec_dim=768)
    return {
        "method": "reference (not run)",
        "model": "Flux-dev 1024x1024 (FLOP model only)",
        "latent": [128, 128],
        "image_tokens": 4096,
        "text_tokens": text_tokens,
        "hidden": 3072,
        "heads": 24,
        "depth": 19,
        "single_depth": 38,
        "attention_flop_share": round(attention_flop_share(flops), 3),
        "flop_bound_speedup": {m: round(flop_bound_speedup(m, flops), 3) for m in PARALLEL},
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit.bench.flux_step", description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=128, help="bench model: latent side (128 -> 4096 image tokens)")
    parser.add_argument("--hidden", type=int, default=512, help="bench model: hidden size (a multiple of 128)")
    parser.add_argument("--depth", type=int, default=1, help="bench model: double blocks")
    parser.add_argument("--single-depth", type=int, default=2, help="bench model: single blocks")
    parser.add_argument("--no-mix", dest="mix", action="store_false", help="skip the Flux-mix shape")
    parser.add_argument("--mix-latent", type=int, default=64, help="Flux-mix model: latent side (64 -> 1024 tokens)")
    parser.add_argument("--mix-hidden", type=int, default=768)
    parser.add_argument("--mix-depth", type=int, default=1)
    parser.add_argument("--mix-single-depth", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=256, help="text rows of the conditioning (Flux T5 in ComfyUI: >= 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (1-rank baseline uses the same)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per run (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of each configuration's first run")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--comfy-attention", choices=("pytorch", "default"), default="pytorch",
                        help="ComfyUI's attention in every rank: 'pytorch' (--use-pytorch-cross-attention: torch SDPA, "
                             "the kernel the parallel runs use, so speedups compare like with like) or 'default' "
                             "(ComfyUI's CPU default, sub-quadratic attention, ~2x slower than SDPA here)")
    parser.add_argument("--diffusers", action="store_true",
                        help=f"also time diffusers' own Flux transformer (diffusers {DIFFUSERS_VERSION}, the 'bench' extra) at "
                             "the same shape on 1 rank and with its Ulysses-2 and Ring-2 context parallelism, "
                             "interleaved with our runs")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, run torch.profiler over one sampling step of each configuration "
                             "on every rank (with --diffusers also one forward of each diffusers model, its modules "
                             "mapped to the same categories) and print its time by category (profile_categories.py) "
                             "as JSON lines")
    parser.add_argument("--wait-load", type=float, default=None,
                        help="before starting, wait (up to --wait-s) until the 1-minute load average is at most this")
    parser.add_argument("--wait-s", type=float, default=600.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole spawn")
    args = parser.parse_args(argv)
    if min(args.repeats, args.pairs) < 1 or args.warmup < 0:
        parser.error("--repeats and --pairs must be >= 1, --warmup >= 0")
    for hidden in (args.hidden, args.mix_hidden):
        if hidden % 128:
            parser.error("hidden sizes must be multiples of 128 (ComfyUI detects Flux heads as hidden / 128)")
    return args


def _wait_for_load(limit: float, max_s: float) -> None:
    deadline = time.monotonic() + max_s
    while os.getloadavg()[0] > limit and time.monotonic() < deadline:
        print(f"[bench] load {os.getloadavg()[0]:.2f} > {limit}: waiting", file=sys.stderr, flush=True)
        time.sleep(30)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.diffusers:
        require_diffusers()
    if args.wait_load is not None:
        _wait_for_load(args.wait_load, args.wait_s)
    if WORLD * args.threads > (os.cpu_count() or 1):
        print(f"[bench] warning: {WORLD} ranks x {args.threads} threads exceed the {os.cpu_count()} CPUs here", file=sys.stderr)
    load_start = os.getloadavg()
    print(f"[bench] torch {torch.__version__}, {os.cpu_count()} CPUs, load {load_start}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    jobs = _jobs(args)
    spec = {"warmup": args.warmup, "repeats": args.repeats, "pairs": args.pairs, "seed": args.seed,
            "comfy_attention": args.comfy_attention, "diffusers": args.diffusers, "profile": args.profile}
    with tempfile.TemporaryDirectory(prefix="flux_step_") as tmp:
        _write_models(jobs, Path(tmp), args.seed)
        spec["jobs"] = jobs
        per_rank = run_on_ranks(_bench_rank, WORLD, spec, threads_per_rank=args.threads, timeout_s=args.timeout)
    load_end = os.getloadavg()
    for j, job in enumerate(jobs):
        result = {
            "runs_rank0": per_rank[0][j]["runs"],
            "comm_replay": per_rank[0][j]["comm_replay"],
            "comfy_kernel": per_rank[0][j]["comfy_kernel"],
            "bytes_by_rank": {name: [_median_bytes(rank_result[j]["runs"][name]) for rank_result in per_rank] for name in PARALLEL},
            "runs_by_rank": {name: [rank_result[j]["runs"][name] for rank_result in per_rank] for name in per_rank[0][j]["runs"]},
        }
        # rank 1's idle records for the baselines (it only waits while rank 0 samples alone)
        result["idle_runs"] = {"single": per_rank[1][j]["runs"]["single"], "single-cfg": per_rank[1][j]["runs"]["single-cfg"]}
        for line in _records(job, result, spec, args.threads):
            line["loadavg_bench_start_end"] = [round(x, 2) for x in (*load_start, *load_end)]
            print(json.dumps(line), flush=True)
        for line in _profile_records(job, [rank_result[j]["profile"] for rank_result in per_rank]):
            print(json.dumps(line), flush=True)
    print(json.dumps(_reference_line(args.text_tokens)), flush=True)
    print(f"[bench] done in {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}", file=sys.stderr, flush=True)
    return 0


def _profile_records(job: dict, profiles: list[dict]) -> list[dict]:
    """One line per (configuration, rank) that was profiled."""
    lines = []
    for name in (*PROFILED, *DIFFUSERS_PROFILED):
        for rank, profile in enumerate(profiles):
            if name in profile:
                total = sum(profile[name]["ms_by_category"].values())
                share = {k: round(v / total, 3) for k, v in profile[name]["ms_by_category"].items()} if total else {}
                lines.append({"profile": name, "model": job["name"], "rank": rank, "image_tokens": job["image_tokens"],
                              "text_tokens": job["text_tokens"], "hidden": job["hidden"], **profile[name],
                              "profiled_ms": round(total, 1), "share_by_category": share,
                              "loadavg_1m": round(os.getloadavg()[0], 2)})
    return lines


def _median_bytes(runs: list[dict]) -> dict[str, int]:
    """Bytes per step by collective; every run of a configuration moves the same bytes, so take the first."""
    first = runs[0]["bytes_per_step"]
    if any(run["bytes_per_step"] != first for run in runs):
        raise RuntimeError(f"byte counts differ between runs of one configuration: {[run['bytes_per_step'] for run in runs]}")
    return {key: int(value) if float(value).is_integer() else value for key, value in first.items()}


if __name__ == "__main__":
    sys.exit(main())
