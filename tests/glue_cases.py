"""Rank-side cases for test_parallel_glue: the data-parallel APPLY_MODEL wrapper on gloo ranks, no ComfyUI."""
from __future__ import annotations

import torch

import parallel_core as pc
from comfyui_xdit.errors import UnsupportedByXDiT
from comfyui_xdit.parallel_glue import data_parallel_wrapper


def _model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    """A stand-in model call: per-row math mixing every per-sample input, plus one shared (unsplit) input."""
    seen = transformer_options.setdefault("rows_seen", [])
    seen.append(x.shape[0])
    return x * t[:, None, None, None] + c_crossattn.mean(dim=(1, 2))[:, None, None, None] + kwargs["y"].sum(1)[:, None, None, None] \
        + kwargs["shared"].sum()


def data_wrapper_cases(rank: int, world_size: int) -> dict:
    state = pc.init_parallel(pc.ParallelConfig(data_degree=world_size))
    wrapper = data_parallel_wrapper(state)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for batch in (1, 2, 3, 5):
        x = torch.randn(batch, 4, 3, 3, generator=generator)
        t = torch.rand(batch, generator=generator)
        context = torch.randn(batch, 7, 8, generator=generator)
        y = torch.randn(batch, 6, generator=generator)
        shared = torch.randn(batch + 1, generator=generator)  # not per-sample: every rank must see all of it
        full = _model(x, t, None, context, None, {}, y=y, shared=shared)
        options: dict = {}
        out = wrapper(_model, x, t, None, context, None, options, y=y, shared=shared)
        results[batch] = {"error": (out - full).abs().max().item(), "shape_ok": out.shape == full.shape,
                          "rows_seen": options["rows_seen"]}
    for name, kwargs in (("control", {"control": {"output": []}}), ("list", {"ref_latents": [torch.zeros(2, 4, 3, 3)]})):
        try:
            wrapper(_model, torch.zeros(2, 4, 3, 3), torch.zeros(2), None, torch.zeros(2, 7, 8), kwargs.pop("control", None),
                    {}, y=torch.zeros(2, 6), shared=torch.zeros(1), **kwargs)
            results[name] = "no error"
        except UnsupportedByXDiT as error:
            results[name] = str(error)
    return results
