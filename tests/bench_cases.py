"""Rank functions for the bench tests (module-level, so spawned gloo ranks can import them)."""
from __future__ import annotations


def diffusers_parallel_vs_single(rank: int, world_size: int, spec: dict) -> dict[str, float]:
    """diffusers' Flux at a tiny shape: max |Ulysses-2 / Ring-2 output - its own 1-rank output| on this rank."""
    from comfyui_xdit.bench import diffusers_flux

    model = diffusers_flux.flux_transformer(spec["hidden"], 1, 1, seed=0)
    inputs = diffusers_flux.flux_inputs(spec["latent"], spec["text_tokens"], seed=1)
    reference = diffusers_flux.forward(model, inputs)
    errors = {}
    for name, degrees in diffusers_flux.DIFFUSERS_METHODS.items():
        if degrees is not None:
            out = diffusers_flux.forward(diffusers_flux.parallel_copy(model, degrees), inputs)
            errors[name] = (out - reference).abs().max().item() / reference.abs().max().item()
    return errors
