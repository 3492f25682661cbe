"""XDiTVAELoader, XDiTVAEDecode, XDiTVAEEncode: VAELoader's / VAEDecode's / VAEEncode's inputs and outputs, with
decoding and encoding split by image rows over the worker pool (exact: comfyui_xdit/vae_parallel.py).

The loader returns a stock VAE loaded in this process too, so every stock node still accepts it; it carries the
pool's handle (POOL_VAE_ATTRIBUTE), which only the XDiT VAE nodes read. Given any other VAE they run the stock code.
"""
from __future__ import annotations

import dataclasses
import os

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import nodes as comfy_nodes  # ComfyUI's nodes.py (the pack's own folder is not on sys.path under this name)

from comfyui_xdit import cluster_config
from comfyui_xdit.degrees import resolve_world_size
from comfyui_xdit.job_spec import PoolVaeRef, VaeJob
from comfyui_xdit.pool_client import live_world, pool_for
from comfyui_xdit.safetensors_files import SAFETENSORS_SUFFIXES
from comfyui_xdit.vae_parallel import check_input, join_pieces, unsupported_reason
from comfyui_xdit.vae_service import vae_degrees
from ray_backend.cluster import cluster_gpus
from ray_backend.clusters import LOCAL, ClusterNotConfigured
from ray_backend.errors import JobInterrupted, PoolFailure

from .unet_loader import connect

POOL_VAE_ATTRIBUTE = "xdit_pool_vae"


class XDiTVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"vae_name": (folder_paths.get_filename_list("vae"),)},
            "optional": {
                "world_size": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "workers in the pool; 0 = the pool that is up when decoding (the model's, whatever its world), else every visible GPU or 2 CPU workers"}),
                "ray_address": (cluster_config.choices(), {"default": LOCAL, "tooltip": "Ray cluster: 'local' = a private cluster on this machine; other names are the clusters the operator configured"}),
            },
        }

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "advanced/loaders/xdit"
    DESCRIPTION = "Loads a VAE here and into the worker pool, where XDiT VAE Decode/Encode split it over the workers (drop-in for Load VAE)."

    @classmethod
    def VALIDATE_INPUTS(cls, world_size=0, ray_address=LOCAL):
        try:
            cluster_config.target_for(ray_address)
        except ClusterNotConfigured as error:
            return str(error)
        if not isinstance(world_size, int) or world_size < 0:
            return f"world_size must be 0 (auto) or a positive whole number, got {world_size!r}"
        return True

    def load_vae(self, vae_name, world_size=0, ray_address=LOCAL):
        target = cluster_config.target_for(ray_address)
        path = folder_paths.get_full_path_or_raise("vae", vae_name)
        if os.path.splitext(path)[1].lower() not in SAFETENSORS_SUFFIXES:
            raise ValueError(f"XDiTVAELoader: vae_name {vae_name!r} is not a .safetensors file; the pool loads safetensors only (use the stock Load VAE for it)")
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        vae = comfy.sd.VAE(sd=sd, metadata=metadata)
        vae.throw_exception_if_invalid()
        reason = unsupported_reason(vae)
        if reason is not None:
            raise ValueError(f"XDiTVAELoader: vae_name {vae_name!r} cannot be split over the pool: {reason}; use the stock Load VAE for it")
        connect(target)
        ref = _on_live_pool(PoolVaeRef(path=path, world_size=world_size or resolve_world_size(0, cluster_gpus()), cluster=target.name,
                                       follows_pool=not world_size))
        pool = pool_for(ref, comfy.model_management.processing_interrupted)
        try:
            pool.warm(ref, vae_degrees(ref.world_size))
        except PoolFailure as error:
            raise RuntimeError(f"XDiTVAELoader: XDiT worker pool failed: {error}. The pool was stopped; queue the prompt again to start a fresh one.") from error
        setattr(vae, POOL_VAE_ATTRIBUTE, ref)
        return (vae,)


def _on_live_pool(ref: PoolVaeRef) -> PoolVaeRef:
    """`ref` with the world of the pool that is up, when its world was auto: a workflow whose VAE loader says 0 decodes
    on the pool its model runs on (no resize between sampling and decoding), whatever world the model loader set."""
    world = live_world(ref.cluster) if ref.follows_pool else None
    return dataclasses.replace(ref, world_size=world) if world else ref


def _on_pool(node: str, vae, ref: PoolVaeRef, kind: str, tensor):
    try:
        check_input(vae, kind, tensor)  # here, before the job leaves for the pool
    except ValueError as error:
        raise ValueError(f"{node}: {error}") from error
    ref = _on_live_pool(ref)
    job = VaeJob(vae=ref, kind=kind, tensor=tensor.cpu())
    pool = pool_for(ref, comfy.model_management.processing_interrupted)
    try:
        result = pool.run(job, vae_degrees(ref.world_size), should_interrupt=comfy.model_management.processing_interrupted)
    except JobInterrupted:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise
    except PoolFailure as error:
        raise RuntimeError(f"{node}: XDiT worker pool failed: {error}. The pool was stopped; queue the prompt again to start a fresh one.") from error
    return join_pieces(kind, [output["tensor"] for output in result["output"]])


class XDiTVAEDecode(comfy_nodes.VAEDecode):
    DESCRIPTION = "Decodes latents on the XDiT worker pool, split by rows (exact); any other VAE is decoded as VAE Decode does."
    CATEGORY = "latent/xdit"

    def decode(self, vae, samples):
        ref = getattr(vae, POOL_VAE_ATTRIBUTE, None)
        if ref is None:
            return super().decode(vae, samples)
        latent = samples["samples"]
        if latent.is_nested:
            latent = latent.unbind()[0]
        images = _on_pool("XDiTVAEDecode", vae, ref, "decode", latent)
        if images.ndim == 5:  # a video VAE's (batch, frames, ...) combined into frames, as VAEDecode does
            images = images.reshape(-1, *images.shape[-3:])
        return (images,)


class XDiTVAEEncode(comfy_nodes.VAEEncode):
    DESCRIPTION = "Encodes images on the XDiT worker pool, split by rows (exact); any other VAE encodes as VAE Encode does."
    CATEGORY = "latent/xdit"

    def encode(self, vae, pixels):
        ref = getattr(vae, POOL_VAE_ATTRIBUTE, None)
        if ref is None:
            return super().encode(vae, pixels)
        return ({"samples": _on_pool("XDiTVAEEncode", vae, ref, "encode", pixels)},)
