"""PipeFusion and displaced patch parallel for Flux inside real ComfyUI on gloo ranks.

Exact (<= 1e-5 against stock sampling) when every step is a warmup step, for every hybrid; at the sampler's
defaults the error against stock is reported and must be at least 10x smaller (mean squared error) than naive
patch splitting with the same patches; each PipeFusion rank holds <= 1/P + 5% of the block parameters with the
default (compute-balanced) cut, and every cut (memory, balanced, speed) is exact; bytes per step equal the methods'
definitions; LoRA merges onto stage-loaded models.
"""
from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch

import pipefusion_cases
from comfyui_xdit.bench.stale_bytes import displaced_call_bytes, looks_ahead, pipefusion_call_bytes
from parallel_core import patch_bands
from parallel_core.local_launch import run_on_ranks

FP32_TOL = 1e-5
REPO = pipefusion_cases.Path(__file__).resolve().parents[1]
CASES = {
    "cfg": {"name": "cfg", "guider": "cfg", "steps": 3},
    "basic-18x22": {"name": "basic-18x22", "sampler": "dpmpp_2m", "height": 18, "width": 22, "seed": 1},
    "basic-batch2": {"name": "basic-batch2", "batch": 2, "seed": 2},
    # Long enough that stale activations are one step old in most steps, as at real step counts.
    "quality": {"name": "quality", "steps": 20, "height": 32, "width": 32, "seed": 3},
}
EXACT_CONFIGS = {
    2: [{"pipefusion_degree": 2}, {"patch_degree": 2}],
    4: [{"pipefusion_degree": 4}, {"pipefusion_degree": 2, "ulysses_degree": 2}, {"pipefusion_degree": 2, "ring_degree": 2},
        {"pipefusion_degree": 2, "cfg_degree": 2}, {"pipefusion_degree": 2, "data_degree": 2}, {"patch_degree": 4},
        {"patch_degree": 2, "cfg_degree": 2}],
}


@pytest.fixture(scope="module")
def pipeline_flux(comfy_root, tmp_path_factory) -> str:
    """The tiny Flux dev with 4 double + 10 single blocks (tiny_models size 'pipeline')."""
    path = tmp_path_factory.mktemp("pipeline_flux") / "flux-pipeline.safetensors"
    subprocess.run([sys.executable, "-m", "comfyui_xdit", "make-tiny-model", "--family", "flux", "--size", "pipeline", "--out", str(path)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return str(path)


# Stage cuts other than the default (balanced by compute within the memory slack: 5 + 9 blocks at 2 stages, the
# parameter cut's 2 + 2 + 5 + 5 at 4), on the uneven grid: the parameter cut (4 + 10) and the compute cut (7 + 7,
# and 3 + 3 + 4 + 4 at 4 stages).
OTHER_CUTS = {2: [("memory", {"pipefusion_degree": 2}), ("speed", {"pipefusion_degree": 2})], 4: [("speed", {"pipefusion_degree": 4})]}


def _exact_runs(world_size: int) -> list[dict]:
    return ([{"degrees": d, "case": CASES[c], "options": pipefusion_cases.EXACT}
             for d in EXACT_CONFIGS[world_size] for c in ("cfg", "basic-18x22", "basic-batch2")]
            + [{"degrees": d, "case": CASES["basic-18x22"], "options": pipefusion_cases.EXACT, "balance": balance}
               for balance, d in OTHER_CUTS[world_size]])


@functools.lru_cache(maxsize=None)
def _run(world_size: int, model_path: str, kind: str) -> tuple[list[dict], list[dict]]:
    if kind == "exact":
        runs, naive = _exact_runs(world_size), []
    else:  # the sampler's defaults, for the error bound and the bytes
        runs = [{"degrees": {"pipefusion_degree": 2}, "case": CASES["quality"], "options": pipefusion_cases.DEFAULTS},
                {"degrees": {"patch_degree": 2}, "case": CASES["quality"], "options": pipefusion_cases.DEFAULTS}]
        naive = [2, 4]
    return runs, run_on_ranks(pipefusion_cases.pipefusion_rank, world_size, model_path, runs, naive, timeout_s=900)


def _psnr(latent: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((latent - reference) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10((reference.max() - reference.min()).item() ** 2 / mse)


@pytest.mark.parametrize("world_size", [2, 4])
def test_full_warmup_is_exact_for_every_hybrid(world_size, pipeline_flux):
    runs, per_rank = _run(world_size, pipeline_flux, "exact")
    failures = []
    for index, run in enumerate(runs):
        reference = per_rank[0]["stock"][str(run["case"])]
        for rank, result in enumerate(per_rank):
            err = (result["latents"][index] - reference).abs().max().item()
            if not err <= FP32_TOL:
                failures.append(f"{run['degrees']} {run.get('balance', 'balanced')} {run['case']['name']} rank {rank}: max abs error {err:.3e}")
    assert not failures, "\n".join(failures)


def test_a_stage_loaded_for_another_cut_is_refused(pipeline_flux):
    messages = run_on_ranks(pipefusion_cases.mismatched_cut_rank, 2, pipeline_flux, timeout_s=600)
    assert messages == ["Flux: this rank holds blocks 0-3 but PipeFusion stage 0 of 2 runs blocks 0-6",
                        "Flux: this rank holds blocks 4-13 but PipeFusion stage 1 of 2 runs blocks 7-13"], messages


def test_defaults_beat_naive_patches_tenfold(pipeline_flux):
    runs, per_rank = _run(2, pipeline_flux, "defaults")
    name = str(CASES["quality"])
    reference = per_rank[0]["stock"][name]
    report = []
    for index, (run, patches) in enumerate(zip(runs, (4, 2))):  # PipeFusion's auto patches at 2 stages: 4
        latent = per_rank[0]["latents"][index]
        naive = per_rank[0]["naive"][f"{patches}/{name}"]
        mse, naive_mse = ((latent - reference) ** 2).mean().item(), ((naive - reference) ** 2).mean().item()
        report.append(f"{run['degrees']}: max err {(latent - reference).abs().max():.3f} PSNR {_psnr(latent, reference):.1f} dB; "
                      f"naive {patches} patches: max err {(naive - reference).abs().max():.3f} PSNR {_psnr(naive, reference):.1f} dB")
        assert 0 < mse, "a stale method reproduced stock exactly: the stale path did not run"
        assert naive_mse >= 10 * mse, "\n".join(report)
        assert torch.equal(per_rank[1]["latents"][index], latent), "ranks disagree"
    print("\n".join(report))


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_stage_holds_its_share_of_block_parameters(world_size, pipeline_flux):
    """The default cut keeps each stage within the memory goal (1/P + 5% of the block parameters), the memory cut
    within 5% of an equal share; the default moves blocks to the stage doing less compute (2 stages: stage 0 holds
    the 4 double blocks plus a single one, more than half the parameters, where the memory cut gives it less)."""
    runs, per_rank = _run(world_size, pipeline_flux, "exact")
    first_stage: dict[str, float] = {}
    for index, run in enumerate(runs):
        stages, balance = run["degrees"].get("pipefusion_degree", 1), run.get("balance", "balanced")
        if stages == 1:
            continue
        holdings = [result["held"][index] for result in per_rank]
        for held, total in holdings:
            bound = {"balanced": (1 / stages + 0.05) * total, "memory": 1.05 * total / stages, "speed": total}[balance]
            assert 0 < held <= bound, (run["degrees"], balance, held, total)
        if run["degrees"] == {"pipefusion_degree": 2}:
            first_stage[balance] = holdings[0][0] / holdings[0][1]
        if run["degrees"] == {"pipefusion_degree": world_size}:  # every rank a different stage
            assert sum(held for held, _ in holdings) == holdings[0][1]
    if world_size == 2:
        assert first_stage["memory"] < 0.5 < first_stage["balanced"] < first_stage["speed"], first_stage


def test_bytes_per_step_match_the_definitions(pipeline_flux):
    runs, per_rank = _run(2, pipeline_flux, "defaults")
    case = CASES["quality"]
    steps, width, text = case["steps"], case["width"] // 2, pipefusion_cases.flux_cases.TEXT_TOKENS
    rows = case["height"] // 2
    for stage, result in enumerate(per_rank):
        expected: dict[str, int] = {}
        for call, bands in enumerate([[(0, rows)]] + [patch_bands(rows, 4)] * (steps - 1)):  # warmup, then 4 patches
            for key, value in pipefusion_call_bytes(stage, 2, 1, text, width, bands, hidden=256, out_features=64,
                                                    looks_ahead=looks_ahead(call, steps)).items():
                expected[key] = expected.get(key, 0) + value
        assert result["bytes"][0] == expected
        expected = {}
        for call in range(steps):
            for key, value in displaced_call_bytes(2, 1, text, rows * width, 14, 2, 128, 64, synchronous=call == 0).items():
                expected[key] = expected.get(key, 0) + value
        assert result["bytes"][1] == expected


LOOKAHEAD_CASES = {"euler": {"name": "lookahead-euler", "steps": 6, "seed": 4},
                   "dpmpp_2m": {"name": "lookahead-dpmpp2m", "sampler": "dpmpp_2m", "steps": 4, "seed": 5},
                   "cfg": {"name": "lookahead-cfg", "guider": "cfg", "steps": 4, "seed": 6}}
LOOKAHEAD_CONFIGS = {2: [{"pipefusion_degree": 2}],
                     4: [{"pipefusion_degree": 4}, {"pipefusion_degree": 2, "ulysses_degree": 2}, {"pipefusion_degree": 2, "ring_degree": 2},
                         {"pipefusion_degree": 2, "cfg_degree": 2}, {"pipefusion_degree": 2, "data_degree": 2}]}


@pytest.mark.parametrize("world_size", [2, 4])
def test_lookahead_changes_nothing_but_when_the_first_stage_works(world_size, pipeline_flux):
    """The first stage running the next call's first patch ahead gives bit-identical latents on every rank, with
    every hybrid: used at every call it can serve (all but the first two: the warmup call, and the one after it,
    whose prediction the third uses) under euler, dpmpp_2m and euler_ancestral on a batch of 2 (its noise drawn for
    the whole batch; data parallel gives each rank one row of it) and for a CFG batch (both conds in one call, their
    denoised values guided on the first stage), missed once and then off for CFG under cfg parallel (each rank's
    call holds one cond, the update needs both), never tried for a CFG batch shared out by data parallel (a rank's
    share may hold one cond)."""
    runs = [{"degrees": d, "case": case, "options": options} for d in LOOKAHEAD_CONFIGS[world_size]
            for case in LOOKAHEAD_CASES.values() for options in ({}, {"lookahead": False})]
    per_rank = run_on_ranks(pipefusion_cases.pipefusion_rank, world_size, pipeline_flux, runs, timeout_s=900)
    failures = []
    for index in range(0, len(runs), 2):
        run = runs[index]
        for rank, result in enumerate(per_rank):
            if not torch.equal(result["latents"][index], result["latents"][index + 1]):
                failures.append(f"{run['degrees']} {run['case']['name']} rank {rank}: lookahead changed the latent")
            assert result["lookahead"][index + 1] == (0, 0), "lookahead ran while switched off"
        first_stage = per_rank[0]["lookahead"][index]
        name, served = run["case"]["name"], (run["case"]["steps"] - 2, 0)
        cfg_parallel, data_parallel = run["degrees"].get("cfg_degree", 1) > 1, run["degrees"].get("data_degree", 1) > 1
        expected = {"lookahead-euler": served, "lookahead-dpmpp2m": served,
                    "lookahead-cfg": (0, 1) if cfg_parallel else (0, 0) if data_parallel else served}[name]
        if first_stage != expected:
            failures.append(f"{run['degrees']} {name}: (used, missed) {first_stage}, expected {expected}")
    assert not failures, "\n".join(failures)


# ComfyUI's samplers beyond euler and dpmpp_2m, at 4 steps: (used, missed) on the first stage. Every one is served at
# every call but the warmup call and the one after it (one call a step: 4 - 2), including those with two calls a step
# (heun, dpm_2, dpmpp_sde, dpmpp_2s_ancestral: 7 calls; the last step's call shares its sigma with the call before it,
# which therefore does not look ahead: 4; heunpp2 makes its second call only where the next sigma is not the last: 5),
# their own model wrappers (uni_pc) and multistep histories (deis, ipndm, lms, res_multistep), and those that draw noise
# (euler_ancestral, lcm, dpmpp_sde, dpmpp_2m_sde, er_sde, dpmpp_2s_ancestral): the replay draws the run's noise from
# its seed, and its model sampling is the one the run samples with (ModelSamplingFlux's shift sets where
# dpmpp_sde's Brownian tree is queried and er_sde's first sigma).
SAMPLER_LOOKAHEAD = {"heun": (4, 0), "heunpp2": (5, 0), "dpm_2": (4, 0), "deis": (2, 0), "uni_pc": (2, 0),
                     "uni_pc_bh2": (2, 0), "ipndm": (2, 0), "ipndm_v": (2, 0), "lms": (2, 0), "res_multistep": (2, 0),
                     "gradient_estimation": (2, 0), "ddim": (2, 0), "euler_ancestral": (2, 0), "lcm": (2, 0),
                     "dpmpp_sde": (4, 0), "dpmpp_2m_sde": (2, 0), "er_sde": (2, 0), "dpmpp_2s_ancestral": (4, 0)}


def test_lookahead_serves_every_sampler(pipeline_flux):
    """Lookahead replays ComfyUI's own sampler with the run's seed, so it follows any elementwise update rule, noise
    included: with and without it the latents are bit-identical on both ranks for every sampler, and the prediction
    is used at every call it can serve."""
    runs = [{"degrees": {"pipefusion_degree": 2}, "case": {"name": f"lookahead-{sampler}", "sampler": sampler, "steps": 4, "seed": 7},
             "options": options} for sampler in SAMPLER_LOOKAHEAD for options in ({}, {"lookahead": False})]
    per_rank = run_on_ranks(pipefusion_cases.pipefusion_rank, 2, pipeline_flux, runs, timeout_s=600)
    failures = []
    for index in range(0, len(runs), 2):
        sampler = runs[index]["case"]["sampler"]
        for rank, result in enumerate(per_rank):
            if not torch.equal(result["latents"][index], result["latents"][index + 1]):
                failures.append(f"{sampler} rank {rank}: lookahead changed the latent")
        if per_rank[0]["lookahead"][index] != SAMPLER_LOOKAHEAD[sampler]:
            failures.append(f"{sampler}: (used, missed) {per_rank[0]['lookahead'][index]}, expected {SAMPLER_LOOKAHEAD[sampler]}")
    assert not failures, "\n".join(failures)


def test_loras_merge_onto_stage_models(pipeline_flux, tmp_path):
    from comfyui_xdit.testing.tiny_loras import flux_lora, flux_shapes, write_flux_lora

    shapes = flux_shapes(pipeline_flux)
    everywhere = write_flux_lora(tmp_path / "all.safetensors", shapes, "kohya", rank=4, seed=1)
    doubles_only = tmp_path / "doubles.safetensors"  # stage 1 of 2 holds no block this LoRA touches
    from safetensors.torch import save_file

    save_file({k: v for k, v in flux_lora(shapes, "kohya", rank=4, seed=2).items() if "double_blocks" in k}, str(doubles_only))
    runs = [{"degrees": {"pipefusion_degree": 2}, "case": CASES["cfg"], "options": pipefusion_cases.EXACT}]
    per_rank = run_on_ranks(pipefusion_cases.pipefusion_rank, 2, pipeline_flux, runs, [], [str(everywhere), str(doubles_only)], timeout_s=600)
    reference = per_rank[0]["stock"][str(CASES["cfg"])]
    base_runs, base = _run(2, pipeline_flux, "exact")
    assert (reference - base[0]["stock"][str(CASES["cfg"])]).abs().max() > 1e-3, "the LoRAs changed nothing"
    for result in per_rank:
        assert (result["latents"][0] - reference).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("with_lora", [False, True])
def test_quantized_checkpoints_load_per_stage_and_run_exactly(pipeline_flux, tmp_path, with_lora):
    """A scaled-fp8 file: each PipeFusion stage reads only its blocks' fp8 weights and scales, and at full warmup
    samples what stock samples from the same file. With a LoRA merged into the quantized weights (stock dequantizes,
    adds and quantizes again, seeded by the key; the workers call the same code) under PipeFusion and Ulysses too."""
    from comfyui_xdit.testing.tiny_loras import flux_shapes, write_flux_lora
    from comfyui_xdit.testing.tiny_quant import quantize_file

    path = quantize_file(pipeline_flux, tmp_path / "flux-pipeline-scaled-fp8.safetensors", "scaled_fp8")
    loras = [str(write_flux_lora(tmp_path / "lora.safetensors", flux_shapes(pipeline_flux), "kohya", rank=4, seed=1))] if with_lora else []
    configs = [{"pipefusion_degree": 2}, {"ulysses_degree": 2}] if with_lora else [{"pipefusion_degree": 2}]
    cases = ["cfg"] if with_lora else ["cfg", "basic-18x22"]
    runs = [{"degrees": d, "case": CASES[c], "options": pipefusion_cases.EXACT} for d in configs for c in cases]
    per_rank = run_on_ranks(pipefusion_cases.pipefusion_rank, 2, str(path), runs, [], loras, timeout_s=600)
    for index, run in enumerate(runs):
        reference = per_rank[0]["stock"][str(run["case"])]
        for rank, result in enumerate(per_rank):
            err = (result["latents"][index] - reference).abs().max().item()
            assert err <= FP32_TOL, f"{run['degrees']} {run['case']['name']} rank {rank}: max abs error {err:.3e}"


@pytest.mark.parametrize("family", ["flux2", "sd3"])
def test_other_families_stage_models_are_exact_and_hold_their_share(family, tiny_model_path):
    """Flux.2 (Flux.1's hooks, 4-axis positions) and SD3 (joint blocks) on stage-loaded models: each rank reads only
    its stage's blocks from the tiny file and PipeFusion at full warmup matches stock sampling."""
    case = {"name": f"{family}-basic-18x22", "height": 18, "width": 22, "seed": 4, "steps": 2}
    runs = [{"degrees": {"pipefusion_degree": 2}, "case": case, "options": pipefusion_cases.EXACT}]
    per_rank = run_on_ranks(pipefusion_cases.pipefusion_rank, 2, str(tiny_model_path(family)), runs, timeout_s=600)
    reference = per_rank[0]["stock"][str(case)]
    held = [result["held"][0] for result in per_rank]
    assert all(0 < mine < total for mine, total in held) and sum(mine for mine, _ in held) == held[0][1], held
    for result in per_rank:
        assert (result["latents"][0] - reference).abs().max().item() <= FP32_TOL
