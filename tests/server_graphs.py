"""API-format graphs for the server tests: stock graphs and their XDiT twins (loader and sampler swapped), for the
tiny Flux, the tiny SD1.5 U-Net and the tiny Qwen-Image."""
from __future__ import annotations

import time

import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.testing.server_launcher import TINY_UNET_NAMES
from comfyui_xdit.workflow_tools import OFFLINE_VAE_NAME


def flux_graph(xdit: bool, guider: str = "basic", seed: int = 5, steps: int = 3, prefix: str = "latent", size: int = 128,
               sampler: str = "euler", sampler_inputs: dict | None = None, **loader_inputs) -> dict:
    """The API-format graph; `xdit` swaps only the loader and the sampler node (with `sampler_inputs`)."""
    loader = {"class_type": "XDiTUNetLoader" if xdit else "UNETLoader",
              "inputs": {"unet_name": TINY_UNET_NAMES["dev"], "weight_dtype": "default", **(loader_inputs if xdit else {})}}
    graph = {
        "1": loader,
        "2": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": size, "height": size}},
        "3": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 100, "text_tokens": 7, "context_dim": 64, "pooled_dim": 32}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "5": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 200, "text_tokens": 7, "context_dim": 64, "pooled_dim": 32}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "simple", "steps": steps, "denoise": 1.0}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "11": {"class_type": "XDiTSamplerCustomAdvanced" if xdit else "SamplerCustomAdvanced",
               "inputs": {"noise": ["9", 0], "guider": ["6", 0], "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["10", 0],
                          **(sampler_inputs if xdit and sampler_inputs else {})}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}},
    }
    if guider == "cfg":
        graph["6"] = {"class_type": "CFGGuider", "inputs": {"model": ["2", 0], "positive": ["4", 0], "negative": ["5", 0], "cfg": 3.5}}
    else:
        graph["6"] = {"class_type": "BasicGuider", "inputs": {"model": ["2", 0], "conditioning": ["4", 0]}}
    return graph


def ksampler_graph(xdit: bool, cfg: float = 1.0, seed: int = 5, steps: int = 3, prefix: str = "latent", size: int = 128,
                   sampler: str = "euler", scheduler: str = "simple", advanced: dict | None = None, **loader_inputs) -> dict:
    """A KSampler graph (KSamplerAdvanced with `advanced`'s extra inputs); `xdit` swaps only the loader and sampler."""
    graph = flux_graph(xdit, prefix=prefix, size=size, **loader_inputs)
    for node_id in ("6", "7", "8", "9", "11"):
        del graph[node_id]
    inputs = {"model": ["2", 0], "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
              "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["10", 0]}
    if advanced is None:
        graph["11"] = {"class_type": "XDiTKSampler" if xdit else "KSampler", "inputs": {**inputs, "seed": seed, "denoise": 1.0}}
    else:
        graph["11"] = {"class_type": "XDiTKSamplerAdvanced" if xdit else "KSamplerAdvanced", "inputs": {**inputs, "noise_seed": seed, **advanced}}
    return graph


# The conftest's server holds the tiny SD1.5 U-Net (testing/tiny_models.py) under this name.
TINY_SD15_NAME = "tiny-sd15.safetensors"


def _cfg_graph(xdit: bool, unet_name: str, context_dim: int, cfg: float, scheduler: str, latent: dict, seed: int, steps: int,
               prefix: str, loader_inputs: dict, model_sampling: dict | None = None) -> dict:
    """Loader -> [model sampling] -> CFGGuider with seeded stand-in conds -> XDiT/stock SamplerCustomAdvanced -> SaveLatent."""
    model = ["2", 0] if model_sampling else ["1", 0]
    graph = {
        "1": {"class_type": "XDiTUNetLoader" if xdit else "UNETLoader",
              "inputs": {"unet_name": unet_name, "weight_dtype": "default", **(loader_inputs if xdit else {})}},
        "3": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 100, "text_tokens": 7, "context_dim": context_dim, "pooled_dim": 32}},
        "5": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 200, "text_tokens": 7, "context_dim": context_dim, "pooled_dim": 32}},
        "6": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["3", 0], "negative": ["5", 0], "cfg": cfg}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps, "denoise": 1.0}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "10": latent,
        "11": {"class_type": "XDiTSamplerCustomAdvanced" if xdit else "SamplerCustomAdvanced",
               "inputs": {"noise": ["9", 0], "guider": ["6", 0], "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["10", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}},
    }
    if model_sampling:
        graph["2"] = {**model_sampling, "inputs": {"model": ["1", 0], **model_sampling["inputs"]}}
    return graph


def sd15_graph(xdit: bool, seed: int = 5, steps: int = 3, prefix: str = "latent", size: int = 80, batch: int = 2,
               **loader_inputs) -> dict:
    """A CFG graph on the SD1.5 U-Net (no sequence-parallel adapter: CFG and data parallel only)."""
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}}
    return _cfg_graph(xdit, TINY_SD15_NAME, 768, 5.0, "normal", latent, seed, steps, prefix, loader_inputs)


def link_tiny_model(server, path, name: str) -> None:
    """Offer the tiny checkpoint `path` to the server as diffusion_models/`name` (once per session)."""
    link = server.models_dir("diffusion_models") / name
    if not link.exists():
        link.symlink_to(path)


def saved_latent(server, result) -> torch.Tensor:
    (file,) = [f for f in result.files if f.kind == "latents"]
    return load_file(str(server.output_dir / file.subfolder / file.filename))["latent_tensor"]


# test_server_qwen_image.py links the tiny Qwen-Image (testing/tiny_models.py) into the server under this name.
TINY_QWEN_IMAGE_NAME = "tiny-qwen-image.safetensors"


def qwen_image_graph(xdit: bool, seed: int = 5, steps: int = 3, prefix: str = "latent", width: int = 176, height: int = 144,
                     **loader_inputs) -> dict:
    """The shipped Qwen-Image workflow's sampling path (ModelSamplingAuraFlow, CFGGuider) on the tiny model, with seeded
    stand-in conditioning 3584 wide (Qwen2.5-VL's); the default size gives an uneven 9 x 11 token grid."""
    latent = {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    return _cfg_graph(xdit, TINY_QWEN_IMAGE_NAME, 3584, 2.5, "simple", latent, seed, steps, prefix, loader_inputs,
                      model_sampling={"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 3.1}})


# The Wan 2.2 video VAE at the width stock detection fixes (testing/tiny_vae.write_wan22_vae): 1.4 GB on disk, written
# once a session and only for the tests that ask for it; 2.8 GB in fp32 in every process that loads it.
WAN22_VAE_NAME = "wan22-vae.safetensors"


def link_wan22_vae(server, tiny_model_path) -> str:
    """Offer the seeded Wan 2.2 VAE to the server as vae/WAN22_VAE_NAME (written on first use); returns the name."""
    link = server.models_dir("vae") / WAN22_VAE_NAME
    if not link.exists():
        link.symlink_to(tiny_model_path("wan22_vae"))
    return WAN22_VAE_NAME


def drop_cached_outputs(server, client) -> None:
    """Run a one-node prompt: ComfyUI's RAM-pressure cache drops the earlier prompts' outputs (a VAE they loaded) once
    a node of the current prompt has run, which in a prompt of big loaders may be after the first of them."""
    client.run({"1": {"class_type": "LoadLatent", "inputs": {"latent": _fresh_latent(server)}},
                "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "dropped_outputs"}}}, timeout=120)


def release_pool_vae(server, client) -> None:
    """Free the Wan 2.2 VAE's copies after a test module: a prompt decoding a new latent with the tiny Flux VAE on a
    2-worker pool. The pool stops workers past 2 and the others swap their resident VAE for the tiny one; ComfyUI drops
    the earlier prompts' VAEs (drop_cached_outputs)."""
    client.run({"1": {"class_type": "LoadLatent", "inputs": {"latent": _fresh_latent(server)}},
                "2": {"class_type": "XDiTVAELoader", "inputs": {"vae_name": OFFLINE_VAE_NAME, "world_size": 2}},
                "3": {"class_type": "XDiTVAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
                "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}, timeout=300)


def _fresh_latent(server) -> str:
    # A new file each time: the nodes reading it are not served from ComfyUI's cache.
    name = f"fresh_{time.time_ns()}.latent"
    save_file({"latent_tensor": torch.zeros((1, 16, 2, 2)), "latent_format_version_0": torch.tensor([])},
              str(server.base / "input" / name))
    return name
