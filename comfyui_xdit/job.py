"""The sampling job: what SamplerCustomAdvanced's inputs mean, as plain data, and back again on a worker.

`carry_*` runs in the ComfyUI process and turns live objects (guider, sampler, the model's patches) into names,
numbers and tensors, refusing anything it cannot rebuild faithfully; the LoRA stack XDiTLoraLoader recorded
travels as (path, strength) data (lora.py) and is merged on the workers (lora_merge.py). `rebuild_*` runs on each
worker and makes the same objects around the worker's resident model, so the worker runs ComfyUI's own sampling code.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import torch

import comfy.clip_vision
import comfy.model_sampling
import comfy.samplers
from comfy_extras.nodes_custom_sampler import Guider_Basic

from . import block_cache, stock_patches
from .errors import UnsupportedByXDiT
from .families import adapter_for
from .job_spec import PoolModelRef, SamplingJob
from .lora import lora_stack
from .shell_model import POOL_ATTACHMENT, SHELL_GUARD_KEY
from .stale_steps import OPTIONS_KEY

GUIDERS: dict[str, type] = {"basic": Guider_Basic, "cfg": comfy.samplers.CFGGuider}
# Cond entries whose meaning is a live object that cannot be carried to a worker.
_LIVE_COND_KEYS = {"control": "ControlNet", "gligen": "GLIGEN", "hooks": "hook (LoRA/keyframe) scheduling"}
# A CLIP vision encoder's output in a cond (e.g. WanImageToVideo's clip_vision_output: tensors held as attributes)
# travels as a dict of its attributes under this key and is rebuilt on the worker.
_CLIP_VISION_OUTPUT = "comfyui_xdit.clip_vision_output"
# model_options entries that are plain switches; every other entry is a callable patch from some node.
_PLAIN_MODEL_OPTIONS = {"transformer_options", "disable_cfg1_optimization"}


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def pool_model_of(model_patcher, node: str = "XDiTSamplerCustomAdvanced") -> PoolModelRef:
    """The pool model behind a MODEL; `node` (an XDiT sampler, named after its stock twin) is named in the refusal."""
    ref = model_patcher.attachments.get(POOL_ATTACHMENT)
    if ref is None:
        raise UnsupportedByXDiT(f"{node} needs a MODEL from XDiTUNetLoader; replace UNETLoader with XDiTUNetLoader (or use the stock {node.removeprefix('XDiT')})")
    return ref


def carry_model_patches(model_patcher, degrees: dict[str, int] | None = None) -> tuple[dict | None, dict, dict]:
    """(model_sampling state, plain model options, stock patches (stock_patches.carry)), or a clear refusal of
    what cannot be carried; `degrees` are the pool's (refusals of a stock patch with a degree name it)."""
    foreign_objects = sorted(set(model_patcher.object_patches) - {"model_sampling"})
    if foreign_objects:
        raise UnsupportedByXDiT(f"the MODEL carries object patches {foreign_objects} from another node that XDiT cannot rebuild on its workers; remove that node")
    if any(model_patcher.patches.values()):
        raise UnsupportedByXDiT("the MODEL carries weight patches (e.g. a stock LoRA loader); use XDiTLoraLoader, or remove the LoRA")
    for kind, by_key in model_patcher.wrappers.items():
        foreign = [k for k, fns in by_key.items() if k != SHELL_GUARD_KEY and not all(stock_patches.recognised_wrapper(f) for f in fns)]
        if foreign:
            raise UnsupportedByXDiT(f"the MODEL carries {kind} wrappers {foreign} from another node pack that XDiT cannot run on its workers; remove that node")
    for kind, by_key in model_patcher.callbacks.items():
        if any(by_key.values()):
            raise UnsupportedByXDiT(f"the MODEL carries {kind} callbacks from another node pack that XDiT cannot run on its workers; remove that node")
    if model_patcher.additional_models or model_patcher.hook_patches or model_patcher.injections:
        raise UnsupportedByXDiT("the MODEL carries additional models, hooks or injections from another node; XDiT cannot rebuild them on its workers")
    stock = stock_patches.carry(model_patcher, degrees or {})
    options = model_patcher.model_options
    foreign_options = sorted(set(options) - _PLAIN_MODEL_OPTIONS - ({stock_patches.COMPILE_OPTION} if stock.get("compile") else set()))
    if foreign_options:
        raise UnsupportedByXDiT(f"the MODEL carries sampler patches {foreign_options} from another node; XDiT cannot run them on its workers; remove that node")
    carried_options = {stock_patches.HOLDER_OPTION} if stock.get("holder") else set()
    transformer_options = {k: v for k, v in options.get("transformer_options", {}).items() if v and k not in carried_options}
    if transformer_options:
        raise UnsupportedByXDiT(f"the MODEL carries transformer patches {sorted(transformer_options)} from another node; XDiT cannot run them on its workers; remove that node")
    flags = {k: v for k, v in options.items() if k not in ("transformer_options", stock_patches.COMPILE_OPTION)}
    sampling = model_patcher.object_patches.get("model_sampling")
    return (carry_model_sampling(sampling) if sampling is not None else None), flags, stock


def carry_model_sampling(sampling: torch.nn.Module) -> dict:
    """A patched model_sampling (e.g. ModelSamplingFlux's shift) as class names + state."""
    bases = []
    for base in type(sampling).__bases__:
        if getattr(comfy.model_sampling, base.__name__, None) is not base:
            raise UnsupportedByXDiT(f"model_sampling class {base.__name__} is not one of ComfyUI's; XDiT cannot rebuild it on its workers")
        bases.append(base.__name__)
    attributes = {k: v for k, v in vars(sampling).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str)) and k != "training"}
    return {"bases": bases, "attributes": attributes, "buffers": {k: v.clone() for k, v in sampling.state_dict().items()}}


def carry_conds(guider) -> dict[str, list[list[Any]]]:
    """The guider's conditioning, back in CONDITIONING form ([[cross_attn, options], ...]) as plain data."""
    carried = {}
    for name, converted in guider.original_conds.items():
        entries = []
        for cond in converted:
            for key, what in _LIVE_COND_KEYS.items():
                if key in cond:
                    raise UnsupportedByXDiT(f"the {name} conditioning carries {what} ('{key}'), which XDiT cannot run in parallel yet; remove it")
            if cond.get("model_conds"):
                raise UnsupportedByXDiT(f"the {name} conditioning carries model conds {sorted(cond['model_conds'])} XDiT cannot carry; remove the node that adds them")
            options = {k: _carry_option(v) for k, v in cond.items() if k not in ("cross_attn", "model_conds", "uuid")}
            bad = sorted(k for k, v in options.items() if not _is_plain(v))
            if bad:
                raise UnsupportedByXDiT(f"the {name} conditioning carries {bad}, which are not plain data XDiT can send to its workers")
            entries.append([cond.get("cross_attn"), options])
        carried[name] = entries
    return carried


def _carry_option(value: Any) -> Any:
    if type(value) is comfy.clip_vision.Output:
        return {_CLIP_VISION_OUTPUT: dict(vars(value))}
    return value


def _rebuild_option(value: Any) -> Any:
    if not (isinstance(value, dict) and set(value) == {_CLIP_VISION_OUTPUT}):
        return value
    output = comfy.clip_vision.Output()
    for key, item in value[_CLIP_VISION_OUTPUT].items():
        output[key] = item
    return output


def rebuild_conds(conds: dict[str, list[list[Any]]]) -> dict[str, list[list[Any]]]:
    """carry_conds' CONDITIONING with the objects it carried as data made again."""
    return {name: [[cross_attn, {k: _rebuild_option(v) for k, v in options.items()}] for cross_attn, options in entries]
            for name, entries in conds.items()}


def _class_identity(cls: type) -> tuple[str, str]:
    # By source file and name, not object identity: ComfyUI loads comfy_extras node files under module names of
    # its own making, so the server's Guider_Basic is another class object than `from comfy_extras... import`.
    return os.path.realpath(inspect.getfile(cls)), cls.__qualname__


def carry_guider(guider) -> tuple[str, float]:
    for name, cls in GUIDERS.items():
        if _class_identity(type(guider)) == _class_identity(cls):
            return name, float(getattr(guider, "cfg", 1.0))
    raise UnsupportedByXDiT(f"guider {type(guider).__name__} is not supported by XDiT yet; use BasicGuider or CFGGuider")


def _function_identity(function) -> tuple:
    # Closures (dpm_fast, dpm_adaptive) are new objects per sampler but share their code; decorated k-diffusion
    # samplers share the decorator's code but keep their own qualified names: together they name the sampler.
    return (function.__module__, function.__qualname__, function.__code__)


def carry_sampler(sampler) -> tuple[str, dict, dict]:
    """The SAMPLER as (name, extra_options, inpaint_options): found by the identity of its sampling code."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise UnsupportedByXDiT(f"sampler {type(sampler).__name__} is not one of ComfyUI's k-samplers; XDiT cannot rebuild it on its workers")
    identity = _function_identity(sampler.sampler_function)
    for name in comfy.samplers.SAMPLER_NAMES:
        candidate = comfy.samplers.sampler_object(name)
        if _function_identity(candidate.sampler_function) == identity:
            extra, inpaint = dict(sampler.extra_options), dict(sampler.inpaint_options)
            if not (_is_plain(extra) and _is_plain(inpaint)):
                raise UnsupportedByXDiT(f"sampler {name} carries options that are not plain data; XDiT cannot send them to its workers")
            return name, extra, inpaint
    raise UnsupportedByXDiT(f"sampler function {sampler.sampler_function.__name__} is not one of ComfyUI's samplers; XDiT cannot rebuild it on its workers")


def build_job(guider, sampler, sigmas: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
              denoise_mask: torch.Tensor | None, seed: int, stale_options: dict | None = None, previews: bool = False,
              analyse: bool = False) -> SamplingJob:
    """Everything a worker needs, checked before any work starts; `analyse`: record per-block changes (block_cache.py)."""
    model_patcher = guider.model_patcher
    ref = pool_model_of(model_patcher)
    guider_name, cfg = carry_guider(guider)
    model_sampling, flags, stock = carry_model_patches(model_patcher, dict(ref.degrees))
    if stock.get("compile") and ref.weight_sharding != "none":  # compiled blocks would bake in the gathered weights
        raise UnsupportedByXDiT("TorchCompileModel is not supported with weight_sharding 'blocks' yet; remove TorchCompileModel "
                                "or set XDiTUNetLoader's weight_sharding to none")
    sampler_name, extra, inpaint = carry_sampler(sampler)
    blocks = carry_block_cache(model_patcher, dict(ref.degrees), len(sigmas) - 1, analyse, stock)
    return SamplingJob(
        model=ref, guider=guider_name, cfg=cfg, conds=carry_conds(guider), sampler_name=sampler_name,
        sampler_extra_options=extra, sampler_inpaint_options=inpaint, sigmas=sigmas.cpu(), noise=noise.cpu(),
        latent=latent.cpu(), denoise_mask=None if denoise_mask is None else denoise_mask.cpu(), seed=int(seed),
        model_sampling=model_sampling, model_option_flags=flags, loras=lora_stack(model_patcher),
        stale_options=dict(stale_options or {}), previews=previews, stock_patches=stock, block_cache=blocks,
    )


def carry_block_cache(model_patcher, degrees: dict[str, int], steps: int, analyse: bool, stock: dict) -> dict:
    """The job's block_cache spec: the MODEL's cache schedule (XDiTCacheSchedule) and/or the analysis; refuses
    what the pool cannot run, naming what to change."""
    schedule = model_patcher.attachments.get(block_cache.SCHEDULE_ATTACHMENT)
    if schedule is None and not analyse:
        return {}
    node = "XDiTRedundancyAnalysis" if analyse else "XDiTCacheSchedule"
    if analyse:
        block_cache.refuse_analysis_degrees(degrees)
    if stock.get("holder"):
        raise UnsupportedByXDiT(f"{node} and EasyCache/LazyCache both cache this MODEL; remove one of them")
    if stock.get("compile"):  # its per-block bookkeeping is Python state dynamo would guard on and recompile for
        raise UnsupportedByXDiT(f"{node} does not run on a TorchCompileModel MODEL; remove TorchCompileModel")
    spec: dict = {"analyse": analyse}
    if schedule is not None:
        if schedule["steps"] != steps:
            raise UnsupportedByXDiT(f"XDiTCacheSchedule: the schedule was made for {schedule['steps']} steps and the sampler runs {steps}; "
                                    f"set the scheduler's steps to {schedule['steps']} or analyse the model at {steps} steps")
        spec["reuse"] = {int(s): list(b) for s, b in schedule["reuse"].items()}
    return spec



# --- worker side ----------------------------------------------------------------------------------------------

def rebuild_model_sampling(carried: dict, model_config) -> torch.nn.Module:
    bases = tuple(getattr(comfy.model_sampling, name) for name in carried["bases"])
    sampling = type("ModelSamplingAdvanced", bases, {})(model_config)
    sampling.load_state_dict(carried["buffers"])
    for key, value in carried["attributes"].items():
        setattr(sampling, key, value)
    return sampling


def run_job(model_patcher, job: SamplingJob, callback: Callable[[int, torch.Tensor, torch.Tensor, int], None],
            state=None, report: dict | None = None) -> torch.Tensor:
    """guider.sample on `model_patcher` (the worker's parallel model, computing over ParallelState `state`; None in
    one process), exactly as SamplerCustomAdvanced calls it. `report` receives the analysis (block_cache.py) and
    how many block evaluations ran and were reused."""
    model = model_patcher.clone()
    if job.model_sampling is not None:
        model.add_object_patch("model_sampling", rebuild_model_sampling(job.model_sampling, model.model.model_config))
    model.model_options.update(job.model_option_flags)
    if job.stale_options:
        model.model_options["transformer_options"] = {**model.model_options.get("transformer_options", {}), OPTIONS_KEY: dict(job.stale_options)}
    stock_patches.apply(model, job.stock_patches, state, resident=model_patcher)
    blocks = block_cache.apply(model, job.block_cache, adapter_for(model.model), state)
    guider = GUIDERS[job.guider](model)
    guider.inner_set_conds(rebuild_conds(job.conds))
    guider.set_cfg(job.cfg)
    sampler = comfy.samplers.sampler_object(job.sampler_name)
    sampler.extra_options = dict(job.sampler_extra_options)
    sampler.inpaint_options = dict(job.sampler_inpaint_options)
    samples = guider.sample(job.noise, job.latent, sampler, job.sigmas, denoise_mask=job.denoise_mask, callback=callback, disable_pbar=True, seed=job.seed)
    if blocks is not None and report is not None:
        report["blocks_ran"], report["blocks_reused"] = blocks.ran, blocks.reused
        if blocks.analyse:
            report["block_changes"] = blocks.table()
    return samples
