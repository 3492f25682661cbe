"""LoRAs of the DiT families beside Flux (test_lora.py) in one process: every key format ComfyUI maps for the family
is matched by the node's check and merged by the workers' MergedLoras exactly as stock LoraLoaderModelOnly patches
the weights. Parametrised over tiny_dit_loras.FAMILIES: Qwen-Image, SD3 and SD3.5 (MMDiT, whose diffusers names
are slices of ComfyUI's fused weights), Flux.2, Wan 2.1 and 2.2, Lumina 2 and Z-Image, HiDream. HiDream and
Z-Image are fixed at billions of parameters by detection: theirs are built in-process (tiny_models.IN_PROCESS),
three seeded copies standing for the node's shell, a worker's model and stock's."""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from comfyui_xdit.job_spec import LoraRef, PoolModelRef
from comfyui_xdit.testing.tiny_dit_loras import FAMILIES, trained_modules, write_dit_lora

STRENGTH = 0.7
CASES = [(family, fmt) for family, loras in FAMILIES.items() for fmt in sorted(loras.formats)]


@pytest.fixture(scope="module")
def models(comfy_root, tiny_model_path):
    """models(family): the tiny model as the node checks it (meta shell), as a worker holds it (MergedLoras) and as
    stock loads it; one family at a time (Qwen-Image's are 1.5 GB each)."""
    import comfy.sd

    from comfyui_xdit.lora_merge import MergedLoras
    from comfyui_xdit.shell_model import build_shell
    from comfyui_xdit.testing.tiny_loras import flux_shapes as checkpoint_shapes
    from comfyui_xdit.testing.tiny_models import IN_PROCESS, IN_PROCESS_PREFIX, load_tiny_model

    @functools.lru_cache(maxsize=1)
    def load(family: str) -> dict:
        if family in IN_PROCESS:
            shell, resident, stock = (load_tiny_model(IN_PROCESS_PREFIX + family) for _ in range(3))
            shapes = {k: tuple(v.shape) for k, v in stock.model.diffusion_model.state_dict().items()}
            return {"model": shapes, "shell": shell, "resident": resident, "merged": MergedLoras(resident), "stock": stock, "shapes": shapes}
        path = tiny_model_path(family)
        resident = comfy.sd.load_diffusion_model(str(path))
        shell = build_shell(path, "default", PoolModelRef(str(path), "default", (("ulysses_degree", 1),), 1, "", 1))
        return {"model": path, "shell": shell, "resident": resident, "merged": MergedLoras(resident),
                "stock": comfy.sd.load_diffusion_model(str(path)), "shapes": checkpoint_shapes(path)}

    return load


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


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_every_format_is_mapped_and_merged_exactly_like_stock(models, tmp_path, family, fmt):
    from comfyui_xdit.lora import checked_lora, map_lora, read_shapes

    model = models(family)
    path = write_dit_lora(tmp_path / f"{fmt}.safetensors", family, model["model"], fmt, seed=1)
    mapped = map_lora(model["shell"], read_shapes(path), path.name)
    assert mapped.unmatched == () and mapped.keys == len(load_file(str(path)))
    ref = checked_lora(model["shell"], str(path), STRENGTH)
    assert ref == LoraRef(str(path), STRENGTH, (path.stat().st_size, path.stat().st_mtime_ns))

    targets = {key if isinstance(key, str) else key[0] for key in mapped.patches}
    keys = {k[len("diffusion_model."):] for k in targets}
    trained = {f"{module}.weight" for module in trained_modules(family, model["shapes"], fmt)}
    assert keys == trained, f"{family} {fmt}: patched {sorted(keys ^ trained)} unlike the trained modules"
    base = {k: v.clone() for k, v in model["stock"].model.diffusion_model.state_dict().items() if k in keys}
    model["merged"].apply((ref,))
    ours = model["resident"].model.diffusion_model.state_dict()
    stock = _stock_weights(model["stock"], path, keys)
    assert all(not torch.equal(stock[k], base[k]) for k in keys), f"{family} {fmt}: the LoRA changed every weight it targets"
    assert [k for k in keys if not torch.equal(ours[k], stock[k])] == [], f"{family} {fmt}: merged weights differ from stock"
    model["merged"].apply(())
    loaded = model["resident"].model.diffusion_model.state_dict()  # read again: a merge may swap the tensors
    assert [k for k in keys if not torch.equal(loaded[k], base[k])] == [], "no LoRA gives the loaded weights back, bit for bit"


def test_a_lumina2_lora_whose_key_value_slices_do_not_fit_is_refused_before_work(models, tmp_path):
    """ComfyUI maps diffusers' to_k/to_v onto Lumina 2's fused q/k/v as if it had as many key/value heads as query
    heads; with its 8 of 24 the slice runs past the weight. The node refuses such a file, naming the weight."""
    from safetensors.torch import save_file

    from comfyui_xdit.errors import UnsupportedByXDiT
    from comfyui_xdit.lora import checked_lora

    model = models("lumina2")
    hidden, in_dim = model["shapes"]["layers.0.attention.out.weight"][0], model["shapes"]["layers.0.attention.qkv.weight"][1]
    assert model["shapes"]["layers.0.attention.qkv.weight"][0] < 3 * hidden, "the tiny Lumina 2 must keep its grouped key/value heads"
    path = tmp_path / "lumina2_to_k.safetensors"
    save_file({"transformer.layers.0.attention.to_k.lora_B.weight": torch.zeros(hidden, 4),
               "transformer.layers.0.attention.to_k.lora_A.weight": torch.zeros(4, in_dim)}, str(path))
    with pytest.raises(UnsupportedByXDiT, match="layers.0.attention.qkv"):
        checked_lora(model["shell"], str(path), STRENGTH)
