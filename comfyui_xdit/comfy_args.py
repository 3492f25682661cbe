"""ComfyUI's command-line arguments that choose how a model computes, carried from the ComfyUI process to its workers.

A worker imports ComfyUI with default arguments. A user who starts ComfyUI with e.g. --use-sage-attention,
--bf16-unet, --force-channels-last or --fast would otherwise get those on the stock path and not on the pool: other
attention kernels, another weight dtype, another memory format. These arguments travel in the workers' environment
and are set before the worker imports comfy.model_management (which reads them once, at import). The others
(addresses, folders, memory and device policy, --cpu-vae included: a GPU worker's VAE takes part in its NCCL
collectives) belong to each process and stay the worker's own.
"""
from __future__ import annotations

import json
import os
from typing import Any

COMFY_ARGS_ENV = "XDIT_COMFY_ARGS"

COMPUTE_ARGS = (
    # precision: ComfyUI picks the model's and the VAE's dtype from these when a loader says "default"
    "force_fp32", "force_fp16", "fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "fp16_vae", "fp32_vae", "bf16_vae",
    "fp16_intermediates", "supports_fp8_compute",
    # kernels: attention implementation and upcasting, memory format, Triton, determinism, --fast's features
    "use_split_cross_attention", "use_quad_cross_attention", "use_pytorch_cross_attention", "use_sage_attention",
    "use_flash_attention", "disable_xformers", "force_upcast_attention", "dont_upcast_attention", "force_channels_last",
    "enable_triton_backend", "disable_triton_backend", "deterministic", "fast",
)


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):  # --fast: a set of PerformanceFeature
        return sorted(getattr(v, "value", v) for v in value)
    return value


def compute_args_env() -> dict[str, str]:
    """In the ComfyUI process: the environment entry that carries its compute arguments to a worker (those set to
    something else than ComfyUI's default; none: no entry)."""
    import comfy.cli_args

    args, parser = comfy.cli_args.args, comfy.cli_args.parser
    carried = {name: _plain(getattr(args, name)) for name in COMPUTE_ARGS
               if hasattr(args, name) and _plain(getattr(args, name)) not in (parser.get_default(name), [])}
    return {COMFY_ARGS_ENV: json.dumps(carried, sort_keys=True)} if carried else {}


def apply_carried_args() -> dict[str, Any]:
    """In a worker, before comfy.model_management is imported: set the arguments the ComfyUI process carried (none
    when it carried none); returns what was set. An argument this worker's ComfyUI does not have is refused by name:
    the worker would compute differently from the process that sent the job."""
    carried = json.loads(os.environ.get(COMFY_ARGS_ENV) or "{}")
    if not carried:
        return {}
    import comfy.cli_args

    args = comfy.cli_args.args
    unknown = sorted(name for name in carried if not hasattr(args, name))
    if unknown:
        raise RuntimeError(f"this worker's ComfyUI has no argument(s) {unknown} that the ComfyUI process uses; "
                           f"run the same ComfyUI version on every machine of the cluster")
    for name, value in carried.items():
        if name == "fast":
            value = {comfy.cli_args.PerformanceFeature(v) for v in value}
        setattr(args, name, value)
    return carried
