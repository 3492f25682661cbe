"""Qwen-Image LoRAs in one process: every key format ComfyUI maps for it is matched by the node's check and merged by
the workers' MergedLoras exactly as stock LoraLoaderModelOnly patches the weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from comfyui_xdit.job_spec import LoraRef, PoolModelRef
from comfyui_xdit.testing.tiny_qwen_image_loras import FORMATS, write_qwen_image_lora

STRENGTH = 0.7


@pytest.fixture(scope="module")
def qwen(comfy_root, tiny_model_path):
    """The tiny Qwen-Image as the node checks it (meta shell), as a worker holds it (MergedLoras) and as stock loads it."""
    import comfy.sd

    from comfyui_xdit.lora_merge import MergedLoras
    from comfyui_xdit.shell_model import build_shell

    path = tiny_model_path("qwen_image")
    resident = comfy.sd.load_diffusion_model(str(path))
    shell = build_shell(path, "default", PoolModelRef(str(path), "default", (("ulysses_degree", 1),), 1, "", 1))
    return {"path": path, "shell": shell, "resident": resident, "merged": MergedLoras(resident),
            "stock": comfy.sd.load_diffusion_model(str(path))}


def _stock_weights(stock, lora_path, keys: set[str]) -> dict[str, torch.Tensor]:
    """Weights `keys` as stock LoraLoaderModelOnly has them while sampling (ComfyUI patches, then restores)."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_lora_for_models(stock, None, comfy.utils.load_torch_file(str(lora_path), safe_load=True), STRENGTH, 0)[0]
    model.patch_model(device_to=torch.device("cpu"))
    try:
        weights = model.model.diffusion_model.state_dict()
        return {k: weights[k].clone() for k in keys}
    finally:
        model.unpatch_model()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_is_mapped_and_merged_exactly_like_stock(qwen, tmp_path, fmt):
    from comfyui_xdit.lora import checked_lora, map_lora, read_shapes

    path = write_qwen_image_lora(tmp_path / f"{fmt}.safetensors", qwen["path"], fmt, seed=1)
    mapped = map_lora(qwen["shell"], read_shapes(path), path.name)
    assert mapped.unmatched == () and mapped.keys == len(load_file(str(path)))
    ref = checked_lora(qwen["shell"], str(path), STRENGTH)
    assert ref == LoraRef(str(path), STRENGTH, (path.stat().st_size, path.stat().st_mtime_ns))

    targets = {key if isinstance(key, str) else key[0] for key in mapped.patches}
    keys = {k[len("diffusion_model."):] for k in targets}
    assert len(keys) == 8, f"{fmt}: every attention projection of the block is patched ({sorted(keys)})"
    base = {k: v.clone() for k, v in qwen["stock"].model.diffusion_model.state_dict().items() if k in keys}
    qwen["merged"].apply((ref,))
    ours = qwen["resident"].model.diffusion_model.state_dict()
    stock = _stock_weights(qwen["stock"], path, keys)
    assert all(not torch.equal(stock[k], base[k]) for k in keys), f"{fmt}: the LoRA changed every weight it targets"
    assert [k for k in keys if not torch.equal(ours[k], stock[k])] == [], f"{fmt}: merged weights differ from stock"
    qwen["merged"].apply(())
    loaded = qwen["resident"].model.diffusion_model.state_dict()  # read again: a merge may swap the tensors
    assert [k for k in keys if not torch.equal(loaded[k], base[k])] == [], "no LoRA gives the loaded weights back, bit for bit"
