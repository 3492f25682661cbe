"""PipeFusion's lookahead: the first stage starts the next model call's first patch while the last stage finishes
this call's last one, so the pipeline no longer fills and drains once per sampling step.

ComfyUI's sampler owns the step loop, so a model call returns only when its last patch is through; the next call's
input is the sampler's update of the whole latent. For a deterministic sampler on a flow model (euler, heun,
dpmpp_2m, deis, ...) that update is elementwise: the first patch's next input needs only the first patch's outputs,
which the last stage has long finished. So the last stage sends this call's back to the first, and the first stage,
after its last patch of this call, finds the next input by running the sampler itself (ComfyUI's own sampler
function, the same operations on the same values) on the first patch's rows, answering its model calls with the
outputs recorded in this run and stopping it at the first call past them. It runs its blocks on that input, holding
back the rows for the next stage. When the next call comes, its real inputs are compared with the predicted ones:
equal, and the held rows go out at once (the first patch is not computed again); different (a sampler that adds
noise, a CFG batch, a post-CFG hook that changes the prediction), and the prediction is dropped and the call runs as
without lookahead, which stays off for the rest of that sampling run. Either way the result is bit-identical to the
pipeline without lookahead: the first stage runs the same computations in the same order (this call's patches, then
the next call's first), only earlier.

The sampler runs on its own latent, in float32; the model sees that latent cast to its dtype. For a bf16 or fp16
model (every GPU run) an update computed from the model's tokens would round differently and miss every time, so an
APPLY_MODEL wrapper hands the model's input as the sampler holds it to the first stage, which patchifies it the
family's way (FamilyCall.image_tokens) and records and predicts from that.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

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
    sampler: Any = None  # the running sampler (ComfyUI's KSAMPLER), while sampler_wrapper holds it
    # First stage: each call's (input, denoised) rows of the first patch in this sampling run, per stream.
    history: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def clear(self) -> None:
        self.predictions.clear()
        self.history.clear()
        self.off = False

    def record(self, stream: Hashable, rows: torch.Tensor, output: torch.Tensor, sigmas: torch.Tensor, model_sampling) -> None:
        """This call's first-patch input rows and their denoised value, as ComfyUI computes it from the model's
        output (made float as ComfyUI makes it)."""
        denoised = model_sampling.calculate_denoised(sigmas, output.to(rows.dtype), rows)
        self.history.setdefault(stream, []).append((rows, denoised))

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


def serves(transformer_options: dict, model_sampling) -> bool:
    """Whether lookahead can serve this call's stream at all: a flow model (the model's input is the sampler's
    latent) and one cond per call (a CFG batch mixes rows, and the update needs every cond's output)."""
    return isinstance(model_sampling, comfy.model_sampling.CONST) and len(transformer_options.get("cond_or_uncond") or ()) == 1


def looks_ahead(transformer_options: dict, step: int, warmup_steps: int) -> bool:
    """Whether the first stage tries to predict the call after this one, in a stream lookahead `serves` (every rank
    decides alike: the last stage then sends the first patch's output back): inside a schedule, with a next call
    that is neither a warmup call nor past the last step."""
    schedule = transformer_options.get("sample_sigmas")
    return (transformer_options.get("sigmas") is not None and schedule is not None
            and step + 1 >= warmup_steps and step + 2 < len(schedule))


class _Reached(Exception):
    """The replayed sampler's first model call past the recorded ones: its input and sigmas."""

    def __init__(self, latent: torch.Tensor, sigmas: torch.Tensor):
        super().__init__("reached the next call")
        self.latent, self.sigmas = latent, sigmas


class _Diverged(Exception):
    """The replayed sampler asked the model about another input than the recorded one."""


class _RecordedModel:
    """The sampler's model in a replay: answers each call with the recorded denoised rows while the input is the
    recorded one. Samplers read the model sampling through inner_model, as from ComfyUI's KSamplerX0Inpaint."""

    def __init__(self, model_sampling, history: list[tuple[torch.Tensor, torch.Tensor]]):
        self._calls = iter(history)
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling),
                                           model_patcher=SimpleNamespace(get_model_object={"model_sampling": model_sampling}.__getitem__))

    def __call__(self, latent: torch.Tensor, sigmas: torch.Tensor, **extra_args) -> torch.Tensor:
        recorded = next(self._calls, None)
        if recorded is None:
            raise _Reached(latent, sigmas)
        if not torch.equal(latent, recorded[0]):
            raise _Diverged()
        return recorded[1]


def replay(sampler, model_sampling, schedule: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sampler's input rows and sigmas at the call after the recorded ones, found by running the sampler again
    on the recorded rows; None where it cannot be replayed (not a KSAMPLER, no further call, a sampler that draws
    noise or does anything the recorded calls do not answer)."""
    function = getattr(sampler, "sampler_function", None)
    if function is None or not history:
        return None
    first = history[0][0]
    devices = [] if first.device.type == "cpu" else [first.device]
    # A sampler that draws noise must not move the real run's generators (its replay then misses anyway).
    with torch.random.fork_rng(devices=devices, device_type="cuda" if first.device.type == "cpu" else first.device.type):
        try:
            function(_RecordedModel(model_sampling, history), first, schedule, extra_args={}, callback=None, disable=True,
                     **getattr(sampler, "extra_options", {}))
        except _Reached as reached:
            return reached.latent, reached.sigmas
        except Exception:  # the sampler is code run on stand-ins: whatever it raises means only "no replay"
            return None
    return None


def sampler_wrapper(lookahead: Lookahead) -> Callable:
    """A SAMPLER_SAMPLE wrapper telling `lookahead` which sampler runs, for its replays."""

    def sample(executor, *args, **kwargs):
        lookahead.sampler = executor.class_obj
        try:
            return executor(*args, **kwargs)
        finally:
            lookahead.sampler = None

    return sample


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
