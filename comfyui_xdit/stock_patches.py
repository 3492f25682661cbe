"""ComfyUI's own EasyCache, LazyCache (comfy_extras/nodes_easycache.py) and TorchCompileModel
(comfy_api.torch_helpers.set_torch_compile_wrapper) on the pool.

`carry` (ComfyUI process) recognises their wrappers, cache holder and compile options by the identity of ComfyUI's
own code (source file + qualified name, never by calling what it finds) and turns them into plain data: the holder's
constructor parameters, which wrapper sits where, the compile options. `apply` (worker) puts ComfyUI's own holder
class and wrapper functions back on the worker's parallel clone. Anything else stays refused by job.py.

Why every rank decides alike:
- LazyCache wraps PREDICT_NOISE, above every parallel split: each rank sees the whole x and the whole prediction
  (gathered over sequence ranks, broadcast over cfg ranks, gathered over data ranks), bit for bit the same.
- EasyCache wraps DIFFUSION_MODEL and decides on the call's first cond's rows and the whole call's output. Sequence
  parallelism shards inside the diffusion model (an object-patched forward, or a family's own DIFFUSION_MODEL
  wrapper, which is put inside EasyCache's), but cfg and data parallelism split the conds above it. With EasyCache
  on, they move inside it (parallel_glue.batch_rows_wrapper): every rank makes the call one process makes, computes
  its share of the rows, and gathers the outputs, so EasyCache sees what it sees in one process.
"""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import torch

from .cfg_parallel import WRAPPER_KEY as CFG_WRAPPER_KEY
from .errors import UnsupportedByXDiT
from .parallel_glue import BATCH_ROWS_WRAPPER_KEY, DATA_WRAPPER_KEY, batch_rows_wrapper

_EASYCACHE = "comfy_extras.nodes_easycache"
_COMPILE = "comfy_api.torch_helpers.torch_compile"
# Wrapper functions the workers may run, by name: (module, qualified name), as ComfyUI defines them.
WRAPPERS: dict[str, tuple[str, str]] = {
    "easycache_sample_wrapper": (_EASYCACHE, "easycache_sample_wrapper"),
    "easycache_calc_cond_batch_wrapper": (_EASYCACHE, "easycache_calc_cond_batch_wrapper"),
    "easycache_forward_wrapper": (_EASYCACHE, "easycache_forward_wrapper"),
    "lazycache_predict_noise_wrapper": (_EASYCACHE, "lazycache_predict_noise_wrapper"),
}
COMPILE_WRAPPER = (_COMPILE, "apply_torch_compile_factory.<locals>.apply_torch_compile_wrapper")
GUARD_FILTERS: dict[str, tuple[str, str]] = {"skip_torch_compile_dict": ("comfy_extras.nodes_torch_compile", "skip_torch_compile_dict")}
HOLDERS: dict[str, tuple[str, str]] = {"EasyCacheHolder": (_EASYCACHE, "EasyCacheHolder"), "LazyCacheHolder": (_EASYCACHE, "LazyCacheHolder")}
HOLDER_PARAMETERS = ("reuse_threshold", "start_percent", "end_percent", "subsample_factor", "offload_cache_diff", "verbose", "output_channels")
HOLDER_OPTION = "easycache"  # the transformer_options entry both cache nodes store their holder in
COMPILED_ATTACHMENT = "comfyui_xdit.compiled_modules"
COMPILE_OPTION = "torch_compile_kwargs"  # the model_options entry set_torch_compile_wrapper records its arguments in
_COMPILE_ARGUMENTS = ("backend", "mode", "fullgraph", "dynamic")
# Degrees these patches are not tested with: cached or compiled steps and the stale activations of PipeFusion /
# patch parallel (stale_steps.py) would have to agree on which steps ran.
_STALE_DEGREES = ("pipefusion_degree", "patch_degree")


def _identity(module: str, qualname: str) -> tuple[str, str]:
    # Source file + name, not object identity: the server loads comfy_extras node files under module names of its
    # own making, so its functions are other objects than an `import comfy_extras...` of the same file.
    return os.path.realpath(importlib.import_module(module).__file__), qualname


def _identity_of(obj: Any) -> tuple[str, str] | None:
    try:
        target = obj if inspect.isclass(obj) else obj.__code__
        path = inspect.getfile(target) if inspect.isclass(obj) else target.co_filename
        return os.path.realpath(path), obj.__qualname__
    except (AttributeError, TypeError):
        return None


def _name_in(table: dict[str, tuple[str, str]], obj: Any) -> str | None:
    identity = _identity_of(obj)
    return next((name for name, (module, qualname) in table.items() if _identity(module, qualname) == identity), None)


def _lookup(table: dict[str, tuple[str, str]], name: str) -> Any:
    module, qualname = table[name]  # only names from ComfyUI's own code, never what a job says
    return getattr(importlib.import_module(module), qualname)


def recognised_wrapper(function: Any) -> bool:
    return _name_in(WRAPPERS, function) is not None or _identity_of(function) == _identity(*COMPILE_WRAPPER)


def _holder_of(model_patcher) -> dict | None:
    holder = model_patcher.model_options.get("transformer_options", {}).get(HOLDER_OPTION)
    if holder is None:
        return None
    name = _name_in(HOLDERS, type(holder))
    if name is None:
        raise UnsupportedByXDiT(f"the MODEL's transformer option '{HOLDER_OPTION}' holds a {type(holder).__name__} from "
                                "another node pack; XDiT runs only ComfyUI's EasyCache and LazyCache nodes on its workers")
    return {"class": name, "parameters": {p: getattr(holder, p) for p in HOLDER_PARAMETERS}}


def _compile_of(model_patcher, function) -> dict:
    """set_torch_compile_wrapper's arguments, from its wrapper's closure and the arguments it recorded. torch.compile
    pops `guard_filter_fn` out of the recorded options, so the workers always use TorchCompileModel's own filter
    (it drops guards on transformer_options only: fewer recompiles, the same results)."""
    compiled = inspect.getclosurevars(function).nonlocals.get("compiled_module_dict", {})
    recorded = model_patcher.model_options.get(COMPILE_OPTION) or {}
    options = {k: v for k, v in (recorded.get("options") or {}).items() if k != "guard_filter_fn"}
    plain = (str, bool, int, float, type(None))
    if not all(isinstance(v, plain) for v in options.values()) or not all(isinstance(recorded.get(a), plain) for a in _COMPILE_ARGUMENTS):
        raise UnsupportedByXDiT(f"TorchCompileModel: compile options {sorted(options) or recorded} are not plain data XDiT can send to its workers")
    return {"keys": sorted(compiled), "options": options, **{a: recorded.get(a) for a in _COMPILE_ARGUMENTS}}


def carry(model_patcher, degrees: dict[str, int]) -> dict:
    """The recognised stock patches on `model_patcher` as plain data ({} when there are none); raises, naming the
    node and the degree to change, for a combination the pool does not run."""
    wrappers, compile_options = [], None
    for kind, by_key in model_patcher.wrappers.items():
        for key, functions in by_key.items():
            for function in functions:
                if _identity_of(function) == _identity(*COMPILE_WRAPPER):
                    compile_options = _compile_of(model_patcher, function)
                elif (name := _name_in(WRAPPERS, function)) is not None:
                    wrappers.append([kind, key, name])
    holder = _holder_of(model_patcher)
    if not (wrappers or holder or compile_options):
        return {}
    if wrappers and holder is None:
        raise UnsupportedByXDiT(f"the MODEL carries EasyCache/LazyCache wrappers without their '{HOLDER_OPTION}' holder; apply the EasyCache or LazyCache node again")
    nodes = ([holder["class"].removesuffix("Holder")] if holder else []) + (["TorchCompileModel"] if compile_options else [])
    stale = [d for d in _STALE_DEGREES if degrees.get(d, 1) > 1]
    if stale:
        raise UnsupportedByXDiT(f"{' and '.join(nodes)} cannot run with {'/'.join(f'{d} {degrees[d]}' for d in stale)} "
                                f"(stale activations) on XDiT yet; set {' and '.join(stale)} to 1 or remove {' and '.join(nodes)}")
    return {"wrappers": wrappers, "holder": holder, "compile": compile_options}


# --- worker side ----------------------------------------------------------------------------------------------

def _put_outermost(model_patcher, kind: str, entries: list[tuple[str, Any]]) -> None:
    """Wrappers of `kind` with `entries` first (outermost), in order, then those already on the model."""
    ordered: dict[str, list] = {}
    for key, function in entries:
        ordered.setdefault(key, []).append(function)
    for key, functions in model_patcher.wrappers.get(kind, {}).items():
        ordered.setdefault(key, []).extend(functions)
    model_patcher.wrappers[kind] = ordered


def apply(model_patcher, carried: dict, state=None, resident=None) -> None:
    """Re-apply `carried` (from `carry`) to `model_patcher`, a clone of `resident` (the worker's parallel model,
    which keeps compiled modules from job to job) that has the job's other patches; `state` is its ParallelState
    (None in one process)."""
    if not carried:
        return
    wrappers_mp = comfy.patcher_extension.WrappersMP
    holder = carried["holder"]
    if holder is not None:
        holder_class = _lookup(HOLDERS, holder["class"])
        options = model_patcher.model_options.setdefault("transformer_options", {})
        options[HOLDER_OPTION] = holder_class(**holder["parameters"])
    by_kind: dict[str, list[tuple[str, Any]]] = {}
    for kind, key, name in carried["wrappers"]:
        by_kind.setdefault(kind, []).append((key, _lookup(WRAPPERS, name)))
    whole_call = wrappers_mp.DIFFUSION_MODEL in by_kind
    if whole_call and state is not None and state.cfg.size * state.data.size > 1:
        # cfg and data parallel move inside the whole-call wrapper (see the module's docstring).
        model_patcher.remove_wrappers_with_key(wrappers_mp.CALC_COND_BATCH, CFG_WRAPPER_KEY)
        model_patcher.remove_wrappers_with_key(wrappers_mp.APPLY_MODEL, DATA_WRAPPER_KEY)
        by_kind[wrappers_mp.DIFFUSION_MODEL].append((BATCH_ROWS_WRAPPER_KEY, batch_rows_wrapper(state)))
    for kind, entries in by_kind.items():
        _put_outermost(model_patcher, kind, entries)
    if carried["compile"] is not None:
        _compile(model_patcher, carried["compile"], resident or model_patcher)
    if holder is not None:
        # The caches' OUTER_SAMPLE wrapper reads start/end sigmas off the model's model_sampling before sampling
        # loads the model: in one process that is the graph's ModelSampling* patch on every run after the first
        # (the first run after a load reads the unpatched one). Loading first makes every job read the patched one.
        comfy.model_management.load_models_gpu([model_patcher])


def _compile(model_patcher, carried: dict, resident) -> None:
    """set_torch_compile_wrapper's work, with the compiled modules kept on the worker's resident model: a new
    torch.compile object per job would make dynamo compile its frames again on every job."""
    from comfy_api.torch_helpers import torch_compile

    arguments = {a: carried[a] for a in _COMPILE_ARGUMENTS}
    arguments["options"] = {**carried["options"], "guard_filter_fn": _lookup(GUARD_FILTERS, "skip_torch_compile_dict")}
    compiled = resident.attachments.setdefault(COMPILED_ATTACHMENT, {})
    key = (tuple(carried["keys"]), tuple(sorted(carried["options"].items())), *(carried[a] for a in _COMPILE_ARGUMENTS))
    if key not in compiled:
        # torch.compile pops the filter out of the options it is given: each module gets its own copy.
        compiled[key] = {k: torch.compile(resident.get_model_object(k), **{**arguments, "options": dict(arguments["options"])})
                         for k in carried["keys"]}
    model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, torch_compile.COMPILE_KEY)
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, torch_compile.COMPILE_KEY,
                                       torch_compile.apply_torch_compile_factory(compiled[key]))
    model_patcher.model_options[torch_compile.TORCH_COMPILE_KWARGS] = arguments
