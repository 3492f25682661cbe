"""Naive patch splitting, the baseline the stale-activation methods are compared with: each band of image rows
runs the whole model alone, with the whole text, and never sees the other bands."""
from __future__ import annotations

import functools

import torch

from parallel_core import patch_bands

from ..stale_forwards import image_grid


def naive_patch_forward(original, patches: int, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                        timestep_zero_index=None, transformer_options=None, attn_mask=None):
    """Patches that never see each other: each band of image rows runs the whole model alone (with the text)."""
    rows, width = image_grid(img_ids)
    outputs = [original(img[:, top * width:bottom * width], img_ids[:, top * width:bottom * width], txt, txt_ids, timesteps, y,
                        guidance, None, transformer_options=transformer_options) for top, bottom in patch_bands(rows, patches)]
    return torch.cat(outputs, dim=1)


def naive_patch_model(model_patcher, patches: int):
    """A clone of a Flux ModelPatcher that splits every forward into `patches` independent bands."""
    diffusion_model = model_patcher.model.diffusion_model
    original = functools.partial(type(diffusion_model).forward_orig, diffusion_model)
    model = model_patcher.clone()
    model.add_object_patch("diffusion_model.forward_orig", functools.partial(naive_patch_forward, original, patches))
    return model
