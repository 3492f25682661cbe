"""XDiTUNetLoader: UNETLoader's inputs and output, with the weights loaded in the worker pool."""
from __future__ import annotations

import dataclasses
import os

import comfy.model_management
import folder_paths

from comfyui_xdit import cluster_config
from comfyui_xdit.block_stages import BALANCE_TOOLTIP, check_balance
from comfyui_xdit.degrees import DEGREE_INPUTS, DEGREE_TOOLTIPS, resolve_degrees, resolve_world_size
from comfyui_xdit.errors import UnsupportedByXDiT
from comfyui_xdit.families import adapter_for
from comfyui_xdit.job_spec import PoolModelRef
from comfyui_xdit.parallel_model import validate_for_model
from comfyui_xdit.pool_client import keep_sigterm_hook, pool_for
from comfyui_xdit.shell_model import POOL_ATTACHMENT, WEIGHT_DTYPES, build_shell
from comfyui_xdit.weight_sharding import CHOICES as SHARDING_CHOICES
from comfyui_xdit.weight_sharding import check_choice as check_sharding
from comfyui_xdit.weight_sharding import check_shardable
from parallel_core import BALANCES, DEFAULT_BALANCE
from ray_backend.capacity import check_world_fits
from ray_backend.cluster import ClusterConnectCancelled, ClusterUnreachable, cluster_gpus, cluster_memory_bytes, ensure_ray
from ray_backend.clusters import LOCAL, ClusterNotConfigured
from ray_backend.errors import PoolFailure

# ray_address came after the first four degrees before patch_degree existed; it keeps its widget place.
_RAY_ADDRESS_AFTER = "pipefusion_degree"


def _optional_inputs() -> dict:
    inputs: dict = {"world_size": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "workers in the pool; 0 = every visible GPU, or 2 CPU workers when there is none"})}
    for name, tooltip in DEGREE_TOOLTIPS.items():
        inputs[f"{name}_degree"] = ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": tooltip})
        if f"{name}_degree" == _RAY_ADDRESS_AFTER:
            # A name, never an address: the operator maps names to clusters (README: Ray clusters and security), so a
            # workflow from anywhere cannot make ComfyUI connect somewhere. Same input name and place as the old address.
            inputs["ray_address"] = (cluster_config.choices(), {"default": LOCAL, "tooltip": "Ray cluster: 'local' = a private cluster on this machine; other names are the clusters the operator configured (XDIT_RAY_CLUSTERS or user/__comfyui_xdit/clusters.json)"})
    # Appended after the degrees: saved workflows store widget values by position.
    inputs["weight_sharding"] = (list(SHARDING_CHOICES), {"default": "none", "advanced": True, "tooltip": "blocks = each worker keeps only 1/N of every transformer block's weights and gathers a block whole just before it runs (exact; for models bigger than one device; not with PipeFusion)"})
    inputs["pipefusion_balance"] = (list(BALANCES), {"default": DEFAULT_BALANCE, "advanced": True, "tooltip": BALANCE_TOOLTIP})
    return inputs


def _degree_arguments(degrees: dict[str, int]) -> dict[str, int]:
    """Loader inputs (ulysses_degree=...) as resolve_degrees' keywords (ulysses=...)."""
    return {name.removesuffix("_degree"): value for name, value in degrees.items()}


class XDiTUNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                "weight_dtype": (list(WEIGHT_DTYPES), {"advanced": True}),
            },
            "optional": _optional_inputs(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders/xdit"
    DESCRIPTION = "Loads a diffusion model into a pool of workers that denoise one image together (drop-in for Load Diffusion Model)."

    @classmethod
    def VALIDATE_INPUTS(cls, world_size=0, ulysses_degree=0, ring_degree=0, cfg_degree=0, pipefusion_degree=0, patch_degree=0, data_degree=0,
                        ray_address=LOCAL, weight_sharding="none", pipefusion_balance=DEFAULT_BALANCE):
        # Checked before the prompt runs; the family, heads, blocks and GPU counts are checked again when the model is
        # loaded. Only the inputs named here skip ComfyUI's own checks (a **kwargs would skip unet_name's too), so the
        # names are spelled out; tests check the degrees are exactly DEGREE_INPUTS.
        try:
            cluster_config.target_for(ray_address)
        except ClusterNotConfigured as error:
            return str(error)
        degrees = dict(zip(DEGREE_INPUTS, (ulysses_degree, ring_degree, cfg_degree, pipefusion_degree, patch_degree, data_degree)))
        for name, value in {"world_size": world_size, **degrees}.items():
            if not isinstance(value, int) or value < 0:
                return f"{name} must be 0 (auto) or a positive whole number, got {value!r}"
        if world_size:
            try:
                resolve_degrees(world_size, num_heads=None, **_degree_arguments(degrees))
            except ValueError as error:
                return str(error)
        try:
            check_sharding(weight_sharding, pipefusion_degree if isinstance(pipefusion_degree, int) else 1)
            check_balance(pipefusion_balance)
        except UnsupportedByXDiT as error:
            return str(error)
        return True

    def load_unet(self, unet_name, weight_dtype, world_size=0, ray_address=LOCAL, weight_sharding="none", pipefusion_balance=DEFAULT_BALANCE,
                  **degree_inputs):
        target = cluster_config.target_for(ray_address)  # an unconfigured cluster is refused before anything runs
        check_balance(pipefusion_balance)
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        shell = build_shell(path, weight_dtype)
        adapter = adapter_for(shell.model)
        num_heads = adapter.num_heads(shell.model.diffusion_model)
        connect(target)
        world = resolve_world_size(world_size, cluster_gpus())
        check_world_fits(world, cluster_gpus(), cluster_memory_bytes(), os.path.getsize(path))
        config = resolve_degrees(world, num_heads, supported=adapter.capabilities.supported(), **_degree_arguments(degree_inputs))
        validate_for_model(config, world, shell, pipefusion_balance)
        check_sharding(weight_sharding, config.pipefusion_degree)
        degrees = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
        ref = PoolModelRef(path=path, weight_dtype=weight_dtype, degrees=degrees, world_size=world, cluster=target.name, num_heads=num_heads,
                           weight_sharding=weight_sharding, pipefusion_balance=pipefusion_balance)
        shell.set_attachments(POOL_ATTACHMENT, ref)
        if weight_sharding == "blocks":
            check_shardable(path, weight_dtype, shell)
        try:
            pool_for(ref, comfy.model_management.processing_interrupted).warm(ref, dict(degrees))
        except PoolFailure as error:  # a worker died or hung while the pool started or loaded the model
            raise RuntimeError(f"XDiTUNetLoader: XDiT worker pool failed: {error}. The pool was stopped; "
                               f"queue the prompt again to start a fresh one.") from error
        return (shell,)


def connect(target) -> None:
    """Connect to the chosen cluster in bounded time; ComfyUI's Cancel stops the attempt."""
    try:
        ensure_ray(target, comfy.model_management.processing_interrupted)
        keep_sigterm_hook()
    except ClusterConnectCancelled:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise
    except ClusterUnreachable as error:
        raise RuntimeError(f"XDiTUNetLoader: {error}. Nothing was changed; the private local cluster (if any) keeps running.") from error
