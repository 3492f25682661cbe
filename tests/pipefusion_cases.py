"""Rank-side sampling for the PipeFusion / displaced patch parallel tests: stock ComfyUI nodes (flux_cases.sample),
stock model vs stage-loaded parallel model, with the sampler node's stale options set on the worker's model."""
from __future__ import annotations

from pathlib import Path

import flux_cases
from comfyui_xdit.comfy_runtime import init_worker

EXACT = flux_cases.FULL_WARMUP  # every step synchronous
DEFAULTS: dict = {}  # the sampler node's defaults: warmup 1, patches auto


def _lora_refs(paths: list[str]):
    from comfyui_xdit.job_spec import LoraRef

    refs = []
    for path in paths:
        stat = Path(path).stat()
        refs.append(LoraRef(path=path, strength=0.8, stamp=(stat.st_size, stat.st_mtime_ns)))
    return tuple(refs)


def pipefusion_rank(rank: int, world_size: int, model_path: str, runs: list[dict], naive_patches: list[int] = (), loras: list[str] = ()) -> dict:
    """runs: [{"degrees": ..., "case": SamplingCase fields, "options": stale options, optionally "balance": how the
    stages are cut (stage_cuts.BALANCES; default DEFAULT_BALANCE)}]; every rank returns its
    latents, bytes and held block parameters per run; rank 0 adds stock (with the LoRAs) and naive patch latents."""
    init_worker(cpu=True)
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from comfyui_xdit.bench.naive_patches import naive_patch_model
    from comfyui_xdit.lora_merge import MergedLoras
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.stage_loading import held_block_parameters, load_stage
    from comfyui_xdit.stale_forwards import LOOKAHEAD_ATTACHMENT
    from parallel_core import DEFAULT_BALANCE, ParallelConfig, init_parallel

    base = comfy.sd.load_diffusion_model(model_path)
    result: dict = {"latents": {}, "bytes": {}, "held": {}, "stock": {}, "naive": {}, "lookahead": {}}
    cases = {str(run["case"]): flux_cases.SamplingCase(**run["case"]) for run in runs}
    if rank == 0:
        stock = base
        for path in loras:
            stock = comfy.sd.load_lora_for_models(stock, None, comfy.utils.load_torch_file(path, safe_load=True), 0.8, 0)[0]
        for name, case in cases.items():
            result["stock"][name] = flux_cases.sample(stock, case)
            for patches in naive_patches:
                result["naive"][f"{patches}/{name}"] = flux_cases.sample(naive_patch_model(base, patches), case)
        # ComfyUI keeps the last sampled model patched (stock's LoRAs merged into base's weights) until it unloads it
        comfy.model_management.unload_all_models()
    states: dict = {}
    models: dict = {}
    for index, run in enumerate(runs):
        config, balance = ParallelConfig(**run["degrees"]), run.get("balance", DEFAULT_BALANCE)
        if config not in states:
            states[config] = init_parallel(config)
        state = states[config]
        if (config, balance) not in models:  # one model per config and stage cut, as a worker keeps it
            model = load_stage(model_path, "default", config.pipefusion_degree, state.pipefusion.rank, balance) if config.pipefusion_degree > 1 else base
            MergedLoras(model).apply(_lora_refs(list(loras)))
            models[config, balance] = (parallelize(model, state), held_block_parameters(model.model))
        model, held = models[config, balance]
        state.comm.reset()
        lookahead = model.get_attachment(LOOKAHEAD_ATTACHMENT)
        before = (lookahead.used, lookahead.missed) if lookahead is not None else (0, 0)
        result["latents"][index] = flux_cases.sample(flux_cases.with_stale_options(model, run["options"]), cases[str(run["case"])])
        result["bytes"][index] = state.comm.snapshot()
        result["held"][index] = held
        if lookahead is not None:  # predictions of the next call's first patch used and missed (first stage only)
            result["lookahead"][index] = (lookahead.used - before[0], lookahead.missed - before[1])
    return result


def mismatched_cut_rank(rank: int, world_size: int, model_path: str) -> str:
    """Build PipeFusion on a stage loaded with the memory cut whose ModelPatcher claims the speed cut: the message."""
    init_worker(cpu=True)
    from comfyui_xdit.block_stages import BALANCE_ATTACHMENT
    from comfyui_xdit.parallel_model import parallelize
    from comfyui_xdit.stage_loading import load_stage
    from parallel_core import ParallelConfig, init_parallel

    state = init_parallel(ParallelConfig(pipefusion_degree=2))
    model = load_stage(model_path, "default", 2, state.pipefusion.rank, "memory").clone()
    model.set_attachments(BALANCE_ATTACHMENT, "speed")
    try:
        parallelize(model, state)
    except RuntimeError as error:
        return str(error)
    return "built"
