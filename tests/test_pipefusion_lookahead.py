"""PipeFusion lookahead's replay (pipefusion_lookahead.py) against ComfyUI's own samplers, without ranks: from the
first patch's recorded values alone, a replay with the run's seed finds exactly the next input the real run gives
that patch, for samplers that draw noise as for deterministic ones; and the first patch's map into the sampler's
latent reproduces the family's patchify, padding included."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from parallel_core.sharding import padded_piece

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def comfy(comfy_root):
    """ComfyUI's samplers and model sampling, and this pack's lookahead (which imports ComfyUI)."""
    import comfy.model_sampling
    import comfy.samplers
    from comfy.ldm.flux.model import Flux

    from comfyui_xdit import pipefusion_lookahead

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        """A flow model's sampling, as ComfyUI builds Flux's."""

    def flux_tokens(latent: torch.Tensor) -> torch.Tensor:
        """Stock Flux's patchify (2x2 patches, the latent padded to whole patches)."""
        return Flux.process_img(SimpleNamespace(patch_size=2, params=SimpleNamespace(axes_dim=[4, 6, 6])), latent)[0]

    return SimpleNamespace(samplers=comfy.samplers, FlowSampling=FlowSampling, flux_tokens=flux_tokens,
                           first_patch_of=pipefusion_lookahead.first_patch_of, SamplerReplay=pipefusion_lookahead.SamplerReplay)


@pytest.mark.parametrize("shape, data_size", [((1, 4, 8, 8), 1), ((3, 4, 7, 9), 2), ((2, 3, 5, 6), 3)])
def test_the_first_patch_map_reproduces_the_family_s_patchify(comfy, shape, data_size):
    first_patch_of, flux_tokens = comfy.first_patch_of, comfy.flux_tokens
    latent = torch.randn(shape)
    for rank in range(data_size):
        piece_tokens = flux_tokens(padded_piece(latent, 0, data_size, rank))
        band = slice(0, piece_tokens.shape[1] // 2)
        patch = first_patch_of(latent, flux_tokens, band, data_size, rank)
        assert torch.equal(patch.tokens(latent), piece_tokens[:, band])
        # Each known element once, in bounds (a rank holding only padding rows knows none).
        assert patch.known.unique().numel() == patch.known.numel() and bool((patch.known >= 0).all())
        rebuilt = patch.latent_with(patch.known_values(patch.tokens(latent)))
        assert torch.equal(rebuilt.view(-1)[patch.known], latent.view(-1)[patch.known])
        assert int((rebuilt != 0).sum()) == patch.known.numel()


class _Model:
    """A stand-in model for a real sampler run: an elementwise denoiser, recording every call's input and output."""

    def __init__(self, model_sampling):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling),
                                           model_patcher=SimpleNamespace(get_model_object={"model_sampling": model_sampling}.__getitem__))

    def __call__(self, x, sigma, **extra_args):
        denoised = torch.tanh(x) * 0.7 + torch.cos(3 * x) * sigma.view(-1, 1, 1, 1) * 0.2
        self.calls.append((x.clone(), sigma.clone(), denoised))
        return denoised


NOISE_SAMPLERS = ["euler_ancestral", "lcm", "dpmpp_sde", "dpmpp_2m_sde", "er_sde", "dpmpp_2s_ancestral"]


@pytest.mark.parametrize("sampler_name", NOISE_SAMPLERS + ["euler", "dpmpp_2m", "heun"])
def test_a_replay_with_the_run_s_seed_finds_each_next_input_of_the_first_patch(comfy, sampler_name):
    first_patch_of, flux_tokens = comfy.first_patch_of, comfy.flux_tokens
    model_sampling = comfy.FlowSampling()
    sampler = comfy.samplers.ksampler(sampler_name)
    schedule = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    latent = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(3))
    model = _Model(model_sampling)
    sampler.sampler_function(model, latent.clone(), schedule, extra_args={"seed": 11}, callback=None, disable=True, **sampler.extra_options)
    band = slice(0, 8)  # two of the four token rows
    patch = first_patch_of(latent, flux_tokens, band, 2, 0)
    replay, history = comfy.SamplerReplay(sampler, 11, model_sampling, schedule, patch), []
    global_state = torch.get_rng_state()
    for x, sigma, denoised in model.calls:
        if history:
            found = replay.next_call(history)
            assert found is not None, f"{sampler_name}: no replay at call {len(history)}"
            assert torch.equal(found[0], patch.tokens(x)) and torch.equal(found[1], sigma), f"{sampler_name}: call {len(history)} mispredicted"
        history.append((patch.known_values(patch.tokens(x)), patch.known_values(patch.tokens(denoised))))
    assert replay.next_call(history) is None, "the replay went past the run's last call"
    assert len(model.calls) >= 4 and torch.equal(torch.get_rng_state(), global_state)
    if sampler_name in NOISE_SAMPLERS:  # another seed draws other noise: the replay no longer follows the run
        other = comfy.SamplerReplay(sampler, 12, model_sampling, schedule, patch)
        found = other.next_call(history[:2])
        other.stop()
        assert found is None or not torch.equal(found[0], patch.tokens(model.calls[2][0]))


def test_a_replay_that_no_longer_follows_the_run_ends_its_thread(comfy):
    """A recorded input the replay did not compute (another sampler ran) ends the replay and its thread; so does
    stop() while it waits for an answer. Noise a replay draws from the global generator does not move it."""
    import threading

    model_sampling, schedule = comfy.FlowSampling(), torch.tensor([1.0, 0.6, 0.3, 0.0])
    latent = torch.randn(1, 4, 8, 8)
    patch = comfy.first_patch_of(latent, comfy.flux_tokens, slice(0, 8), 1, 0)
    values = patch.known_values(patch.tokens(latent))
    threads = threading.active_count()
    replay = comfy.SamplerReplay(comfy.samplers.ksampler("euler"), 1, model_sampling, schedule, patch)
    assert replay.next_call([(values, values)]) is not None and threading.active_count() == threads + 1
    assert replay.next_call([(values, values), (values + 1, values)]) is None
    assert threading.active_count() == threads and replay.next_call([(values, values)]) is None
    waiting = comfy.SamplerReplay(comfy.samplers.ksampler("euler"), 1, model_sampling, schedule, patch)
    assert waiting.next_call([(values, values)]) is not None
    waiting.stop()
    assert threading.active_count() == threads
    # A sampler without a seed draws from the global generator: the replay's draws are undone.
    unseeded = comfy.SamplerReplay(comfy.samplers.ksampler("euler_ancestral"), None, model_sampling, schedule, patch)
    state = torch.get_rng_state()
    assert unseeded.next_call([(values, values)]) is not None and torch.equal(torch.get_rng_state(), state)
    unseeded.stop()


@pytest.mark.parametrize("conds", [[0], [0, 1], [1, 0]])
def test_a_cfg_batch_is_recorded_as_the_guided_denoised_value(comfy, conds):
    """A CFG batch's model call holds the sampler's latent once per cond: the first patch's rows are checked against
    every copy, and the value recorded for the replay is ComfyUI's cfg_function of the conds' denoised values (one
    cond: its own), bit for bit."""
    from comfyui_xdit.pipefusion_lookahead import FamilyCall, Lookahead

    model_sampling, scale = comfy.FlowSampling(), 4.5
    latent, sigmas = torch.randn(2, 4, 6, 8), torch.tensor([0.7, 0.7])
    call_latent = torch.cat([latent] * len(conds))
    tokens = comfy.flux_tokens(call_latent)
    band = slice(0, 6)
    output = torch.randn(tokens[:, band].shape)
    lookahead = Lookahead(cfg=scale)
    family_call = FamilyCall(call_at=None, timesteps=sigmas, fixed_inputs=(), image_tokens=comfy.flux_tokens)
    rows = lookahead.sampler_rows("s", call_latent, family_call, tokens[:, band], band, 1, 0, len(conds))
    assert rows is not None and torch.equal(rows, tokens[:2, band])
    lookahead.record("s", rows, output, sigmas, model_sampling, conds)
    denoised = [model_sampling.calculate_denoised(sigmas, chunk, rows) for chunk in output.chunk(len(conds))]
    expected = denoised[0] if len(conds) == 1 else comfy.samplers.cfg_function(
        None, denoised[conds.index(0)], denoised[conds.index(1)], scale, rows, sigmas)
    patch = lookahead.patches["s"]
    assert torch.equal(lookahead.history["s"][0][1], patch.known_values(expected))
    if len(conds) > 1:  # the copies must agree: another latent in the uncond's rows is a miss
        changed = tokens[:, band].clone()
        changed[-1, 0, 0] += 1
        assert lookahead.sampler_rows("s", call_latent, family_call, changed, band, 1, 0, len(conds)) is None and lookahead.off


def test_lookahead_serves_one_cond_or_a_plain_cfg_batch_on_a_rank_holding_both(comfy):
    from comfyui_xdit.pipefusion_lookahead import serves

    flow, eps = comfy.FlowSampling(), comfy.samplers.comfy.model_sampling.EPS()
    assert serves({"cond_or_uncond": [1]}, flow, None, 2)
    assert serves({"cond_or_uncond": [1, 0]}, flow, 3.5, 1)
    assert not serves({"cond_or_uncond": [1, 0]}, flow, None, 1)  # not a plain CFGGuider: its scale is unknown
    assert not serves({"cond_or_uncond": [0, 1]}, flow, 3.5, 2)  # a data-parallel share may hold one cond only
    assert not serves({"cond_or_uncond": [0, 0]}, flow, 3.5, 1) and not serves({"cond_or_uncond": [0, 1, 2]}, flow, 3.5, 1)
    assert not serves({"cond_or_uncond": [0]}, eps, None, 1) and not serves({}, flow, None, 1)
