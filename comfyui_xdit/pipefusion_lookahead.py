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

The sampler's update runs on its own latent, in float32; the model sees that latent cast to its dtype. For a bf16
or fp16 model (every GPU run) an update computed from the model's tokens would round differently and miss every
time, so an APPLY_MODEL wrapper hands the model's input as the sampler holds it to the first stage, which
patchifies it the family's way (FamilyCall.image_tokens) and predicts from that.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

import comfy.k_diffusion.sampling
import comfy.model_sampling

from parallel_core import ParallelState
from parallel_core.sharding import padded_piece

# A family's forward for given timesteps: call_at(timesteps) -> TokenCall (stale_forwards).
CallAt = Callable[[torch.Tensor], Callable]
# A family's patchify of a latent into its image tokens, as its forward makes them (no dtype cast).
ImageTokens = Callable[[torch.Tensor], torch.Tensor]
# transformer_options entry: the model call's latent as the sampler holds it (sampler_input_wrapper).
SAMPLER_INPUT_KEY = "comfyui_xdit.sampler_input"


@dataclass(frozen=True)
class FamilyCall:
    """The family's forward at any timesteps, this call's timesteps, and the other tensors its output depends on
    besides the tokens (pooled text, guidance): the next call must repeat them for a prediction to be used."""

    call_at: CallAt
    timesteps: torch.Tensor
    fixed_inputs: tuple
    image_tokens: ImageTokens | None = None


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


def sampler_input_wrapper(state: ParallelState) -> Callable:
    """An APPLY_MODEL wrapper putting the call's latent as the sampler holds it (before ComfyUI casts it to the model's
    dtype) into transformer_options[SAMPLER_INPUT_KEY]; this rank's data-parallel share of it, as the data-parallel
    wrapper (inside this one) hands the model."""

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        latent = padded_piece(x, 0, state.data.size, state.data.rank)
        return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, SAMPLER_INPUT_KEY: latent}, **kwargs)

    return apply_model


def sampler_tokens(image: torch.Tensor, transformer_options: dict, family_call: FamilyCall) -> torch.Tensor:
    """The call's image tokens with the sampler's precision: the family's patchify of the sampler's latent where the
    model computes in a narrower dtype and those tokens round to exactly `image`; else `image` itself."""
    latent = transformer_options.get(SAMPLER_INPUT_KEY)
    if latent is None or family_call.image_tokens is None or latent.dtype == image.dtype:
        return image
    tokens = family_call.image_tokens(latent)
    if tokens.shape != image.shape or not torch.equal(tokens.to(image.dtype), image):
        return image
    return tokens


def euler_input(image: torch.Tensor, output: torch.Tensor, sigmas: torch.Tensor, nxt: NextCall, model_sampling) -> torch.Tensor:
    """The next call's image tokens after ComfyUI's sample_euler step: denoised as the model computes it from this
    call's output (made float as ComfyUI makes it), then x + to_d(x, sigma, denoised) * (sigma_next - sigma), in
    `image`'s dtype (the sampler's tokens, sampler_tokens). Elementwise, so a patch's tokens give that patch's next
    input."""
    denoised = model_sampling.calculate_denoised(sigmas, output.to(image.dtype), image)
    return image + comfy.k_diffusion.sampling.to_d(image, nxt.sigma, denoised) * (nxt.sigma_next - nxt.sigma)
