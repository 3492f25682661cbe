"""PipeFusion's lookahead: the first stage starts the next model call's first patch while the last stage finishes
this call's last one, so the pipeline no longer fills and drains once per sampling step.

ComfyUI's sampler owns the step loop, so a model call returns only when its last patch is through; the next call's
input is the sampler's update of the whole latent. For a plain Euler step on a flow model that update is elementwise:
the first patch's next input needs only the first patch's output, which the last stage has long finished. So the last
stage sends it back to the first, and the first stage, after its last patch of this call, predicts that input the
way the sampler computes it (ComfyUI's own model_sampling and to_d, the same operations on the same values) and runs
its blocks on it, holding back the rows for the next stage. When the next call comes, its real inputs are compared
with the predicted ones: equal, and the held rows go out at once (the first patch is not computed again); different
(another sampler, a CFG batch, a post-CFG hook that changes the prediction), and the prediction is dropped and the
call runs as without lookahead, which stays off for the rest of that sampling run. Either way the result is
bit-identical to the pipeline without lookahead: the first stage runs the same computations in the same order
(this call's patches, then the next call's first), only earlier.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

import comfy.k_diffusion.sampling
import comfy.model_sampling

# A family's forward for given timesteps: call_at(timesteps) -> TokenCall (stale_forwards).
CallAt = Callable[[torch.Tensor], Callable]


@dataclass(frozen=True)
class FamilyCall:
    """The family's forward at any timesteps, this call's timesteps, and the other tensors its output depends on
    besides the tokens (pooled text, guidance): the next call must repeat them for a prediction to be used."""

    call_at: CallAt
    timesteps: torch.Tensor
    fixed_inputs: tuple


@dataclass
class Prediction:
    """The first stage's run of the next call's first patch: its predicted inputs, and the rows held for the next
    stage."""

    image: torch.Tensor
    image_ids: torch.Tensor
    text: torch.Tensor
    timesteps: torch.Tensor
    fixed_inputs: tuple
    held: list = field(default_factory=list)


@dataclass
class Lookahead:
    """One parallel model's lookahead state for a sampling run (emptied with its key/value tables)."""

    predictions: dict[Hashable, Prediction] = field(default_factory=dict)
    off: bool = False
    used: int = 0
    missed: int = 0

    def clear(self) -> None:
        self.predictions.clear()
        self.off = False

    def take(self, stream: Hashable, image: torch.Tensor, image_ids: torch.Tensor, text: torch.Tensor,
             timesteps: torch.Tensor, fixed_inputs: tuple) -> Prediction | None:
        """This stream's prediction if the call's real inputs are exactly the predicted ones; else None (and off)."""
        prediction = self.predictions.pop(stream, None)
        if prediction is None:
            return None
        if (_same(prediction.image, image) and _same(prediction.image_ids, image_ids) and _same(prediction.text, text)
                and _same(prediction.timesteps, timesteps)
                and len(prediction.fixed_inputs) == len(fixed_inputs)
                and all(_same(a, b) for a, b in zip(prediction.fixed_inputs, fixed_inputs))):
            self.used += 1
            return prediction
        self.missed += 1
        self.off = True
        self.predictions.clear()
        return None


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@dataclass(frozen=True)
class NextCall:
    sigma: torch.Tensor  # the current step's sigma (0-dim), as the Euler step uses it
    sigma_next: torch.Tensor  # the next step's (0-dim)
    options: dict  # the next call's transformer_options
    timesteps: torch.Tensor  # the next call's timesteps, as the model computes them from its sigmas


def next_call(transformer_options: dict, model_sampling, step: int, warmup_steps: int) -> NextCall | None:
    """What the next model call of this sampling run looks like if the sampler takes a plain Euler step from this
    one, when lookahead can serve it: a flow model (the model's input is the sampler's latent), one cond per call
    (a CFG batch mixes rows), a next call that is neither the last step's end nor a warmup step."""
    if not isinstance(model_sampling, comfy.model_sampling.CONST) or len(transformer_options.get("cond_or_uncond") or ()) != 1:
        return None
    sigmas, schedule = transformer_options.get("sigmas"), transformer_options.get("sample_sigmas")
    if sigmas is None or schedule is None or step + 1 < warmup_steps or step + 2 >= len(schedule):
        return None
    sigma, sigma_next = schedule[step], schedule[step + 1]
    if not bool((sigmas == sigma).all()) or float(sigma_next) <= 0:
        return None
    next_sigmas = torch.full_like(sigmas, float(sigma_next))
    options = {**transformer_options, "sigmas": next_sigmas}
    return NextCall(sigma, sigma_next, options, model_sampling.timestep(next_sigmas).float())


def euler_input(image: torch.Tensor, output: torch.Tensor, sigmas: torch.Tensor, nxt: NextCall, model_sampling) -> torch.Tensor:
    """The next call's image tokens after ComfyUI's sample_euler step: denoised as the model computes it from this
    call's output, then x + to_d(x, sigma, denoised) * (sigma_next - sigma). Elementwise, so a patch's tokens give
    that patch's next input."""
    denoised = model_sampling.calculate_denoised(sigmas, output, image)
    return image + comfy.k_diffusion.sampling.to_d(image, nxt.sigma, denoised) * (nxt.sigma_next - nxt.sigma)
