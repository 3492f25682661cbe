"""Rank-side runs for the stock cache/compile tests: ComfyUI's EasyCache, LazyCache and TorchCompileModel on the pool.

Every rank loads the tiny Flux with ComfyUI's loader and builds the graph with stock nodes (cache node ->
ModelSamplingFlux -> CFGGuider/BasicGuider, BasicScheduler, KSamplerSelect, RandomNoise). Rank 0 samples it on the
stock model in one process; every rank also builds the same graph on a shell MODEL (as XDiTUNetLoader returns it),
carries it with job.build_job and runs it with job.run_job on its parallel model, as a pool worker does. Which steps
ran the model is read off a forward hook on the diffusion model's last layer, step by step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from comfyui_xdit.comfy_runtime import init_worker

import flux_cases


@dataclass(frozen=True)
class CacheCase:
    name: str
    node: str  # "EasyCache", "LazyCache" or "" (compile only)
    threshold: float = 0.1
    guider: str = "cfg"
    steps: int = 10
    height: int = 18  # 9x11 tokens: rows divide neither 2 nor 4
    width: int = 22
    batch: int = 1
    seed: int = 5
    compile_backend: str = ""  # set_torch_compile_wrapper's backend, as TorchCompileModel sets it ("" = none)


CASES = (
    CacheCase("easycache-cfg", "EasyCache"),
    CacheCase("lazycache-cfg", "LazyCache"),
    CacheCase("easycache-basic-batch2", "EasyCache", guider="basic", batch=2, seed=6),
)
COMPILE_CASE = CacheCase("compile-aot-eager", "", steps=3, compile_backend="aot_eager")
EAGER_CASE = CacheCase("eager", "", steps=COMPILE_CASE.steps, seed=COMPILE_CASE.seed)
CONFIGS: dict[int, list[dict]] = {
    2: [{"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}, {"data_degree": 2}],
    4: [{"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_degree": 2}, {"cfg_degree": 2, "data_degree": 2},
        {"cfg_degree": 4}],
}


def _with_patches(model, case: CacheCase):
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from comfy_extras.nodes_torch_compile import skip_torch_compile_dict

    if case.node:
        node = {"EasyCache": EasyCacheNode, "LazyCache": LazyCacheNode}[case.node]
        model = node.execute(model, case.threshold, 0.15, 0.95, False).result[0]
    if case.compile_backend:
        # TorchCompileModel's own call, with a backend its combo does not list: inductor takes minutes to build
        # its C++ kernels on these CPUs (the bench measures it).
        model = model.clone()
        set_torch_compile_wrapper(model=model, backend=case.compile_backend, options={"guard_filter_fn": skip_torch_compile_dict})
    return model


def graph(model, case: CacheCase):
    """SamplerCustomAdvanced's inputs for `case`, from stock nodes: (guider, sampler, sigmas, noise, latent)."""
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = ModelSamplingFlux().patch(_with_patches(model, case), 1.15, 0.5, case.width * 8, case.height * 8)[0]
    positive = flux_cases._conditioning(100)
    if case.guider == "cfg":
        guider = flux_cases._first(custom.CFGGuider.execute(model, positive, flux_cases._conditioning(200), 3.5))
    else:
        guider = flux_cases._first(custom.BasicGuider.execute(model, positive))
    sigmas = flux_cases._first(custom.BasicScheduler.execute(model, "simple", case.steps, 1.0))
    sampler = flux_cases._first(custom.KSamplerSelect.execute("euler"))
    noise = flux_cases._first(custom.RandomNoise.execute(case.seed))
    return guider, sampler, sigmas, noise, {"samples": torch.zeros(case.batch, 16, case.height, case.width)}


class StepRecorder:
    """Which sampling steps ran the diffusion model (a forward hook on its last layer, read at each step's callback)."""

    def __init__(self, diffusion_model: torch.nn.Module, last_layer: str = "final_layer"):
        self.calls = 0
        self.steps: list[bool] = []
        self._seen = 0
        self._hook = getattr(diffusion_model, last_layer).register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1

    def remove(self) -> None:
        """Unhook (before compiled runs: dynamo guards on the counter, so each job would recompile)."""
        self._hook.remove()

    def start(self) -> None:
        self.steps, self._seen = [], self.calls

    def callback(self, step, x0, x, total_steps) -> None:
        self.steps.append(self.calls > self._seen)
        self._seen = self.calls


def stock_sample(base, recorder: StepRecorder, case: CacheCase) -> torch.Tensor:
    """The stock graph in one process, sampled as SamplerCustomAdvanced samples it (guider.sample)."""
    guider, sampler, sigmas, noise, latent = graph(base, case)
    recorder.start()
    return guider.sample(noise.generate_noise(latent), latent["samples"], sampler, sigmas, callback=recorder.callback,
                         disable_pbar=True, seed=noise.seed)


def pool_sample(shell, model, state, recorder: StepRecorder, case: CacheCase) -> torch.Tensor:
    """The same graph built on the shell, carried as a job and run on this rank's parallel model."""
    from comfyui_xdit.job import build_job, run_job

    guider, sampler, sigmas, noise, latent = graph(shell, case)
    job = build_job(guider, sampler, sigmas, noise.generate_noise(latent), latent["samples"], None, noise.seed)
    recorder.start()
    return run_job(model, job, recorder.callback, state)


def cache_rank(rank: int, world_size: int, path: str, configs: list[dict], case_dicts: list[dict], compile_config: dict | None) -> dict:
    init_worker(cpu=True)
    import comfy.sd
    from torch._dynamo.utils import counters

    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.shell_model import build_shell
    from parallel_core import ParallelConfig, init_parallel

    cases = [CacheCase(**c) for c in case_dicts]
    base = comfy.sd.load_diffusion_model(path)
    recorder = StepRecorder(base.model.diffusion_model)
    result: dict = {"parallel": {}, "steps": {}, "bytes": {}}
    if rank == 0:
        result["stock"], result["stock_steps"] = {}, {}
        # The caches read start/end sigmas off the loaded model's model_sampling before sampling loads the graph's
        # ModelSamplingFlux patch: a one-process run reads the patched one on every run but the first after a load,
        # and the pool always does (stock_patches.apply). Warm the stock model once so stock is in that state.
        stock_sample(base, recorder, CacheCase("warm-up", "", steps=1))
        for case in cases + ([EAGER_CASE] if compile_config else []):
            result["stock"][case.name] = stock_sample(base, recorder, case)
            result["stock_steps"][case.name] = recorder.steps
    runs = [(degrees, [(case.name, case) for case in cases]) for degrees in configs]
    if compile_config:
        # Eager first, then compiled twice: the second compiled job must compile nothing new.
        runs.append((compile_config, [("eager", EAGER_CASE), ("compiled", COMPILE_CASE), ("compiled-again", COMPILE_CASE)]))
    for degrees, named_cases in runs:
        if named_cases[0][0] == "eager":
            recorder.remove()
        state = init_parallel(ParallelConfig(**degrees))
        model = parallelize(base, state)
        shell = build_shell(path, "default", PoolModelRef(path, "default", tuple(degrees.items()), world_size, "", 2))
        for name, case in named_cases:
            key = f"{flux_cases.tag(degrees)}/{name}"
            # Counted as a difference, not reset: a reset is a change dynamo's guards on the counters would see.
            before = state.comm.snapshot()
            result["parallel"][key] = pool_sample(shell, model, state, recorder, case)
            result["steps"][key] = recorder.steps
            result["bytes"][key] = {k: n - before.get(k, 0) for k, n in state.comm.snapshot().items() if n > before.get(k, 0)}
            result.setdefault("compiled_frames", {})[key] = counters["frames"]["ok"]
    return result


def case_dicts() -> list[dict]:
    return [asdict(case) for case in CASES]


QWEN_CONFIGS = [{"ulysses_degree": 2}, {"cfg_degree": 2}]


def qwen_image_rank(rank: int, world_size: int, path: str, configs: list[dict]) -> dict:
    """EasyCache on Qwen-Image, whose sequence parallelism is a DIFFUSION_MODEL wrapper of its own (stock_patches
    puts EasyCache's outside it): rank 0's stock CFG graph vs the carried job on every rank, step by step."""
    init_worker(cpu=True)
    import comfy.sd
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_easycache import EasyCacheNode
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    from comfyui_xdit.job import build_job, run_job
    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.shell_model import build_shell
    from comfyui_xdit.testing.tiny_models import stand_in_conditioning
    from parallel_core import ParallelConfig, init_parallel

    def graph(model, steps: int, cache: bool = True):
        if cache:  # a threshold at which the tiny Qwen-Image skips some of 8 steps
            model = EasyCacheNode.execute(model, 0.6, 0.15, 0.95, False).result[0]
        model = ModelSamplingAuraFlow().patch_aura(model, 3.1)[0]
        conds = [stand_in_conditioning(seed, 7, context_dim=3584) for seed in (100, 200)]
        guider = flux_cases._first(custom.CFGGuider.execute(model, *conds, 2.5))
        sigmas = flux_cases._first(custom.BasicScheduler.execute(model, "simple", steps, 1.0))
        noise = flux_cases._first(custom.RandomNoise.execute(3))
        latent = torch.zeros(1, 16, 1, 18, 22)  # 9 x 11 tokens
        return guider, flux_cases._first(custom.KSamplerSelect.execute("euler")), sigmas, noise.generate_noise({"samples": latent}), latent, noise.seed

    base = comfy.sd.load_diffusion_model(path)
    recorder = StepRecorder(base.model.diffusion_model, "proj_out")
    result: dict = {"parallel": {}, "steps": {}}
    if rank == 0:
        guider, sampler, sigmas, noise, latent, seed = graph(base, 1, cache=False)  # warm-up (see cache_rank)
        guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=seed)
        guider, sampler, sigmas, noise, latent, seed = graph(base, 8)
        recorder.start()
        result["stock"] = guider.sample(noise, latent, sampler, sigmas, callback=recorder.callback, disable_pbar=True, seed=seed)
        result["stock_steps"] = recorder.steps
    for degrees in configs:
        state = init_parallel(ParallelConfig(**degrees))
        model = parallelize(base, state)
        shell = build_shell(path, "default", PoolModelRef(path, "default", tuple(degrees.items()), world_size, "", 24))
        guider, sampler, sigmas, noise, latent, seed = graph(shell, 8)
        job = build_job(guider, sampler, sigmas, noise, latent, None, seed)
        recorder.start()
        result["parallel"][flux_cases.tag(degrees)] = run_job(model, job, recorder.callback, state)
        result["steps"][flux_cases.tag(degrees)] = recorder.steps
    return result
