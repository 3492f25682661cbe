"""PipeFusion's lookahead: the first stage starts the next model call's first patch while the last stage finishes
this call's last one, so the pipeline no longer fills and drains once per sampling step.

ComfyUI's sampler owns the step loop, so a model call returns only when its last patch is through; the next call's
input is the sampler's update of the whole latent. On a flow model that update is elementwise for ComfyUI's samplers
(euler, heun, dpmpp_2m, deis, ..., and the ones that add noise: euler_ancestral, dpmpp_sde, lcm, ...): the first
patch's next input needs only the first patch's outputs, which the last stage has long finished. So the last stage
sends this call's back to the first, and the first stage, after its last patch of this call, finds the next input by
running the sampler itself (ComfyUI's own sampler function, the same operations on the same values), answering its
model calls with the outputs recorded in this run and stopping it at the first call past them. It runs its blocks on
that input, holding back the rows for the next stage. When the next call comes, its real inputs are compared with
the predicted ones: equal, and the held rows go out at once (the first patch is not computed again); different (a
post-CFG hook that changes the prediction, a sampler that mixes elements), and the prediction is dropped and
the call runs as without lookahead, which stays off for the rest of that sampling run. Either way the result is
bit-identical to the pipeline without lookahead: the first stage runs the same computations in the same order (this
call's patches, then the next call's first), only earlier.

The replay runs on a latent of the sampler's whole shape, dtype and device, with the run's seed, so a sampler that
draws noise (from the seed's generator or Brownian tree, whose draws depend only on those) draws the same noise as
the real run. Only the first patch's elements of that latent are known (recorded from the real run; the rest stay
zero, which an elementwise update never mixes in), and only they are compared with and predicted. The sampler holds
its latent in float32 while a bf16 or fp16 model (every GPU run) sees it rounded, so an APPLY_MODEL wrapper hands
the sampler's latent to the first stage, which finds where its first patch's tokens come from by running the
family's patchify (FamilyCall.image_tokens) on the latent's element indices.

A CFG batch (a plain CFGGuider's cond and uncond in one model call, as ComfyUI batches them) holds the sampler's latent
once per cond; the first stage gets both conds' first-patch outputs back and combines their denoised values as
ComfyUI's cfg_function does without hooks, so the replay sees the guided denoised value the sampler saw.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

import comfy.model_sampling
import comfy.samplers

from parallel_core import ParallelState
from parallel_core.sharding import padded_piece

# A family's forward for given timesteps: call_at(timesteps) -> TokenCall (stale_forwards).
CallAt = Callable[[torch.Tensor], Callable]
# A family's patchify of a latent into its image tokens, as its forward makes them (no dtype cast).
ImageTokens = Callable[[torch.Tensor], torch.Tensor]
# transformer_options entry: the model call's whole latent as the sampler holds it (sampler_input_wrapper).
SAMPLER_INPUT_KEY = "comfyui_xdit.sampler_input"


@dataclass(frozen=True)
class FamilyCall:
    """The family's forward at any timesteps, this call's timesteps, the other tensors its output depends on besides
    the tokens (pooled text, guidance: the next call must repeat them for a prediction to be used), and its
    patchify."""

    call_at: CallAt
    timesteps: torch.Tensor
    fixed_inputs: tuple
    image_tokens: ImageTokens


@dataclass(frozen=True)
class FirstPatch:
    """Where this rank's first-patch image tokens come from in the sampler's whole latent."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    token_index: torch.Tensor  # the tokens' shape: each element's flat index into the latent, -1 for padding rows
    first: torch.Tensor  # positions in token_index.flatten() of each latent element's first token (patch padding repeats some)
    known: torch.Tensor  # the latent's flat indices at those positions: the elements this rank records and predicts

    def tokens(self, latent: torch.Tensor) -> torch.Tensor:
        """The first patch's tokens of `latent`, at its precision (data-parallel padding rows zero, as padded_piece)."""
        return latent.reshape(-1)[self.token_index.clamp(min=0)].masked_fill_(self.token_index < 0, 0)

    def known_values(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.flatten()[self.first]

    def latent_with(self, values: torch.Tensor) -> torch.Tensor:
        """A whole latent holding `values` at the known elements and zero elsewhere."""
        latent = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        latent.view(-1)[self.known] = values.to(self.dtype)
        return latent


def first_patch_of(latent: torch.Tensor, image_tokens: ImageTokens, band: slice, data_size: int, data_rank: int) -> FirstPatch:
    """Where the tokens `band` of this data-parallel rank's share of `latent` come from: the family's patchify run on
    the latent's element indices (1-based in float64, exact to 2**53 elements; data-parallel padding reads 0)."""
    indices = torch.arange(1, latent.numel() + 1, dtype=torch.float64, device=latent.device).view(latent.shape)
    token_index = image_tokens(padded_piece(indices, 0, data_size, data_rank))[:, band].round().long() - 1
    flat = token_index.flatten()
    elements, occurrence = torch.unique(flat, return_inverse=True)
    positions = torch.arange(flat.numel(), device=flat.device)
    first = torch.full_like(elements, flat.numel()).scatter_reduce_(0, occurrence, positions, "amin")[elements >= 0]
    return FirstPatch(latent.shape, latent.dtype, latent.device, token_index, first, flat[first])


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
    seed: int | None = None  # the running sampler's seed (extra_args["seed"]), which seeds its noise
    cfg: float | None = None  # the running guider's CFG scale, where it is a plain CFGGuider (sampler_wrapper)
    # First stage, per stream: where the first patch's tokens come from in the sampler's latent, each call's (input,
    # denoised) values of the latent's known elements in this sampling run, and the sampler's replay.
    patches: dict[Hashable, FirstPatch] = field(default_factory=dict)
    history: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    replays: dict[Hashable, SamplerReplay] = field(default_factory=dict)

    def clear(self) -> None:
        self.stop_replays()
        self.predictions.clear()
        self.patches.clear()
        self.history.clear()
        self.off = False

    def stop_replays(self) -> None:
        for replay in self.replays.values():
            replay.stop()
        self.replays.clear()

    def miss(self) -> None:
        """A prediction failed or could not be made: off for the rest of this sampling run."""
        self.missed += 1
        self.off = True
        self.predictions.clear()
        self.stop_replays()

    def sampler_rows(self, stream: Hashable, latent: torch.Tensor | None, family_call: FamilyCall, rows: torch.Tensor,
                     band: slice, data_size: int, data_rank: int, copies: int = 1) -> torch.Tensor | None:
        """The first patch's tokens `rows` at the sampler's precision, taken from the call's `latent` (the sampler's
        latent `copies` times over: once per cond of a CFG batch), for one copy; None (and a miss) where the family's
        patchify of it does not give exactly the tokens the model sees."""
        if latent is not None:
            latent = latent[:latent.shape[0] // copies]
        patch = self.patches.get(stream)
        if latent is not None and (patch is None or patch.shape != latent.shape):
            patch = self.patches[stream] = first_patch_of(latent, family_call.image_tokens, band, data_size, data_rank)
        tokens = None if latent is None else patch.tokens(latent)
        if tokens is None or tokens.shape[0] * copies != rows.shape[0] or not torch.equal(torch.cat([tokens.to(rows.dtype)] * copies), rows):
            self.miss()
            return None
        return tokens

    def record(self, stream: Hashable, rows: torch.Tensor, output: torch.Tensor, sigmas: torch.Tensor, model_sampling,
               conds: list[int]) -> None:
        """This call's first-patch input rows (sampler_rows) and their denoised value, as ComfyUI computes it from
        the model's output (made float as ComfyUI makes it; `output` holds one chunk per entry of `conds`, the call's
        cond_or_uncond) and, for a CFG batch, guides it (cfg_function's formula)."""
        denoised = [model_sampling.calculate_denoised(sigmas, chunk, rows) for chunk in output.to(rows.dtype).chunk(len(conds))]
        if len(conds) > 1:
            cond, uncond = denoised[conds.index(0)], denoised[conds.index(1)]
            denoised = [uncond + (cond - uncond) * self.cfg]
        patch = self.patches[stream]
        self.history.setdefault(stream, []).append((patch.known_values(rows), patch.known_values(denoised[0])))

    def next_input(self, stream: Hashable, model_sampling, schedule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first patch's tokens and the sigmas of this stream's call after the recorded ones, from its replay of
        the running sampler (started at the first prediction); None where there is none."""
        replay = self.replays.get(stream)
        if replay is None:
            replay = self.replays[stream] = SamplerReplay(self.sampler, self.seed, model_sampling, schedule, self.patches[stream])
        return replay.next_call(self.history[stream])

    def take(self, stream: Hashable, image: torch.Tensor, image_ids: torch.Tensor, text: torch.Tensor,
             timesteps: torch.Tensor, fixed_inputs: tuple) -> Prediction | None:
        """This stream's prediction if the call's real inputs are exactly the predicted ones; else None (and a miss)."""
        prediction = self.predictions.pop(stream, None)
        if prediction is None:
            return None
        if (_same(prediction.image, image) and _same(prediction.image_ids, image_ids) and _same(prediction.text, text)
                and _same(prediction.timesteps, timesteps)
                and len(prediction.fixed_inputs) == len(fixed_inputs)
                and all(_same(a, b) for a, b in zip(prediction.fixed_inputs, fixed_inputs))):
            self.used += 1
            return prediction
        self.miss()
        return None


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def serves(transformer_options: dict, model_sampling, cfg: float | None, data_size: int) -> bool:
    """Whether lookahead can serve this call's stream at all: a flow model (the model's input is the sampler's
    latent), and one cond per call, or a plain CFGGuider's cond and uncond batched (`cfg` its scale) on a rank that
    holds both (no data parallel: a share of a CFG batch may hold one cond only, and the update needs both)."""
    conds = sorted(transformer_options.get("cond_or_uncond") or ())
    cfg_batch = conds == [0, 1] and cfg is not None and data_size == 1
    return isinstance(model_sampling, comfy.model_sampling.CONST) and (len(conds) == 1 or cfg_batch)


def looks_ahead(transformer_options: dict, step: int, warmup_steps: int) -> bool:
    """Whether the first stage tries to predict the call after this one, in a stream lookahead `serves` (every rank
    decides alike: the last stage then sends the first patch's output back): inside a schedule, with a next call
    that is neither a warmup call nor past the last step."""
    schedule = transformer_options.get("sample_sigmas")
    return (transformer_options.get("sigmas") is not None and schedule is not None
            and step + 1 >= warmup_steps and step + 2 < len(schedule))


class _Stopped(BaseException):
    """Raised in the replayed sampler's model call to end a replay that is no longer needed (a BaseException, so a
    sampler's own `except Exception` cannot keep the replay going)."""


_STOP = object()


class _FedModel:
    """The sampler's model in a replay: each call hands its input to the first stage and returns the answer it gets
    back. Samplers read the model sampling through inner_model, as from ComfyUI's KSamplerX0Inpaint."""

    def __init__(self, model_sampling, ask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self._ask = ask
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling),
                                           model_patcher=SimpleNamespace(get_model_object={"model_sampling": model_sampling}.__getitem__))

    def __call__(self, latent: torch.Tensor, sigmas: torch.Tensor, **extra_args) -> torch.Tensor:
        return self._ask(latent, sigmas)


class SamplerReplay:
    """ComfyUI's sampler function run again beside the real run, on a latent of the real one's shape holding the first
    patch's recorded values, with the run's seed. It runs on its own thread, which the first stage advances one model
    call at a time: each call of its model is answered with the run's recorded denoised values while its input's
    known elements are the recorded ones, and its call after the recorded ones is the prediction. Never restarted, so
    a sampling run costs one more run of the sampler's update (and noise draws), not one per call."""

    def __init__(self, sampler, seed: int | None, model_sampling, schedule: torch.Tensor, patch: FirstPatch):
        self._function = getattr(sampler, "sampler_function", None)
        self._options = getattr(sampler, "extra_options", {})
        self._seed, self._model_sampling, self._schedule, self._patch = seed, model_sampling, schedule, patch
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # first stage -> replay: denoised latent, or _STOP
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # replay -> first stage: (latent, sigmas); None: it ended
        self._thread: threading.Thread | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the replay's call waiting for an answer
        self._answered = 0  # recorded calls answered
        # A thread starts on the device's default stream: the replay queues its work on the first stage's, after the
        # work that made the recorded values.
        self._stream = torch.cuda.current_stream(patch.device) if patch.device.type == "cuda" else None
        self._ended = self._function is None  # not a KSAMPLER: nothing to replay

    def next_call(self, history: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first patch's tokens (at the sampler's precision) and the sigmas of the sampler's call after the run's
        recorded ones (`history`, which only grows); None where the replay cannot follow the run (another input
        than the recorded one, no further call, anything the sampler raises)."""
        if self._ended or not history:
            return None
        device = self._patch.device
        # The replay only runs while the first stage waits here: whatever it draws from the global generators (a
        # sampler without a seed) is undone, so the real run's draws stay as without lookahead.
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device],
                                   device_type="cuda" if device.type == "cpu" else device.type):
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(history[0][0],), daemon=True, name="comfyui-xdit-sampler-replay")
                self._thread.start()
            while True:
                if self._pending is None:
                    self._pending = self._calls.get()
                    if self._pending is None:
                        self._ended = True
                        return None
                latent, sigmas = self._pending
                if self._answered == len(history):
                    return self._patch.tokens(latent), sigmas
                recorded = history[self._answered]
                if not torch.equal(latent.reshape(-1)[self._patch.known], recorded[0]):
                    self.stop()
                    return None
                self._pending = None
                self._answers.put(self._patch.latent_with(recorded[1]))
                self._answered += 1

    def stop(self) -> None:
        """End the replay's thread (it waits in a model call, or has ended)."""
        self._ended = True
        if self._thread is not None:
            self._answers.put(_STOP)
            self._thread.join()
            self._thread = None

    def _ask(self, latent: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        if self._ended:  # stopped: any further model call ends the replay at once
            raise _Stopped()
        self._calls.put((latent, sigmas))
        answer = self._answers.get()
        if answer is _STOP:
            raise _Stopped()
        return answer

    def _run(self, start: torch.Tensor) -> None:
        try:
            with torch.inference_mode(), (torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()):
                self._function(_FedModel(self._model_sampling, self._ask), self._patch.latent_with(start), self._schedule,
                               extra_args={} if self._seed is None else {"seed": self._seed}, callback=None, disable=True,
                               **self._options)
        except _Stopped:
            return
        except Exception:  # the sampler is code run on stand-ins: whatever it raises means only "no replay"
            pass
        self._calls.put(None)


def sampler_wrapper(lookahead: Lookahead) -> Callable:
    """A SAMPLER_SAMPLE wrapper telling `lookahead` which sampler runs, with which seed and CFG scale, for its replays."""

    def sample(executor, *args, **kwargs):
        # the executor runs KSAMPLER.sample(model_wrap, sigmas, extra_args, callback, noise, ...)
        extra_args = kwargs.get("extra_args", args[2] if len(args) > 2 else None)
        guider = kwargs.get("model_wrap", args[0] if args else None)
        lookahead.sampler = executor.class_obj
        lookahead.seed = extra_args.get("seed") if isinstance(extra_args, dict) else None
        # Only a plain CFGGuider's scale is known to be what guides the denoised value (other guiders predict their own way).
        plain = getattr(type(guider), "predict_noise", None) is comfy.samplers.CFGGuider.predict_noise
        lookahead.cfg = guider.cfg if plain and isinstance(getattr(guider, "cfg", None), (int, float)) else None
        try:
            return executor(*args, **kwargs)
        finally:
            lookahead.sampler = lookahead.seed = lookahead.cfg = None
            lookahead.stop_replays()

    return sample


def sampler_input_wrapper() -> Callable:
    """An APPLY_MODEL wrapper putting the call's whole latent as the sampler holds it (before ComfyUI casts it to the
    model's dtype, and before the data-parallel wrapper inside this one shares it out) into
    transformer_options[SAMPLER_INPUT_KEY]."""

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, SAMPLER_INPUT_KEY: x}, **kwargs)

    return apply_model
