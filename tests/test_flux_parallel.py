"""Every family inside real ComfyUI on gloo ranks: the parallel model's latents equal stock sampling to fp32 rounding.

One suite, parametrised over families (flux_cases.CONFIGS): Flux.1 (every exact method), Flux.2 (same adapter
code, its own token grid), SD3 and SD3.5 (MMDiT, with and without dual-attention blocks), Qwen-Image (its own hooks,
5-D latents; with reference images as Qwen-Image-Edit), Chroma and Chroma Radiance (in-process at tiny width;
Radiance in pixel space), Flux.1 Kontext (reference latents, also under displaced
patch parallel), HiDream I1 (built in-process; text at the
rear of its joint attention), Lumina 2 and Z-Image (NextDiT, caption and image refiners before the joint layers),
Wan 2.1 (T2V, I2V) and Wan 2.2's TI2V 5B on video latents, and SD1.5 and SDXL U-Nets, which have no sequence-parallel adapter
and run on the generic CFG and data parallel wrappers. test_gpu_parallel.py runs the same cases on CUDA ranks over
NCCL.
"""
from __future__ import annotations

import functools

import pytest
import torch

import flux_cases
from parallel_core.local_launch import run_on_ranks

RUNS = [(family, world) for family, by_world in flux_cases.CONFIGS.items() for world in by_world]
# (config tag/case, counter) that must have moved bytes on every rank: guards against a silently unpatched model.
TRAFFIC: dict[str, list[tuple[str, str]]] = {
    "flux": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/basic-euler", "ring_send/ring"),
             ("cfg2/cfg-euler", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "flux2": [("ulysses2/cfg-dpmpp2m-18x22", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
              ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg")],
    "sd15": [("cfg2/cfg-euler-10x12-batch2", "broadcast/cfg"), ("data2/cfg-euler-10x12-batch2", "all_gather/data")],
    "sdxl": [("cfg2/cfg-euler-10x12-batch2", "broadcast/cfg"), ("data2/cfg-euler-10x12-batch2", "all_gather/data")],
    "sd3": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/basic-euler", "ring_send/ring"),
            ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "sd35": [("ulysses2/cfg-euler", "all_to_all/ulysses"), ("ring2/cfg-euler", "ring_send/ring"),
             ("cfg2/cfg-euler", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "qwen_image": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                   ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "qwen_image_edit": [("ulysses2/edit-cfg-euler-18x22-ref12x14", "all_to_all/ulysses"),
                        ("ring2/edit-cfg-euler-18x22-ref12x14", "ring_send/ring")],
    "hidream": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "wan21": [("ulysses2/video-basic-euler-3x10x14", "all_to_all/ulysses"), ("ring2/video-cfg-dpmpp2m-3x10x14", "ring_send/ring"),
              ("cfg2/video-cfg-dpmpp2m-3x10x14", "broadcast/cfg"), ("data2/video-basic-euler-3x10x14-batch2", "all_gather/data")],
    "wan21_i2v": [("ulysses2/video-image-cfg-euler-3x10x14", "all_to_all/ulysses"), ("ring2/video-image-cfg-euler-3x10x14", "ring_send/ring"),
                  ("cfg2/video-image-cfg-euler-3x10x14", "broadcast/cfg")],
    "wan22_5b": [("ulysses2/video-image-cfg-euler-3x10x14", "all_to_all/ulysses"), ("ring2/video-image-cfg-euler-3x10x14", "ring_send/ring"),
                 ("cfg2/video-image-cfg-euler-3x10x14", "broadcast/cfg"), ("data2/video-basic-dpmpp2m-3x10x14-batch2", "all_gather/data")],
    "flux_kontext": [("ulysses2/edit-cfg-euler-18x22-ref12x14", "all_to_all/ulysses"),
                     ("ring2/edit-cfg-euler-18x22-ref12x14", "ring_send/ring"),
                     ("cfg2/edit-cfg-euler-18x22-ref12x14", "broadcast/cfg"),
                     ("patch2/edit-cfg-euler-18x22-ref12x14", "all_gather/patch")],
    "chroma": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
               ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "chroma_radiance": [("ulysses2/cfg-dpmpp2m-18x22", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                        ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
}
TRAFFIC["zimage"] = [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                     ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")]
TRAFFIC["flux_scaled_fp8"] = [("ulysses2/cfg-dpmpp2m-18x22", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                              ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")]
TRAFFIC["lumina2"] = [("ulysses2/cfg-dpmpp2m-18x22", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                      ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/cfg-dpmpp2m-18x22", "all_gather/data")]


@pytest.fixture(scope="module")
def model_path(tiny_flux_paths, tiny_model_path):
    return lambda family: flux_cases.model_spec(family, tiny_flux_paths, tiny_model_path)


def _run(family: str, world_size: int, model_path) -> list[dict]:
    """family_rank's per-rank results for `family`; the entries of one SHARED_LAUNCH group run in one launch."""
    group = flux_cases.SHARED_LAUNCH.get(family)
    members = tuple(f for f, g in flux_cases.SHARED_LAUNCH.items() if g == group and world_size in flux_cases.CONFIGS[f]) if group else (family,)
    loads = tuple((model_path(f), flux_cases.WEIGHT_DTYPE.get(f, "default")) for f in members)
    return _launch(members, world_size, loads)[family]


@functools.lru_cache(maxsize=None)
def _launch(families: tuple[str, ...], world_size: int, loads: tuple[tuple[str, str], ...]) -> dict[str, list[dict]]:
    first = families[0]  # a shared launch's entries run the same configs and cases
    assert all(flux_cases.CONFIGS[f][world_size] == flux_cases.CONFIGS[first][world_size] and flux_cases.FAMILY_CASES[f] == flux_cases.FAMILY_CASES[first] for f in families)
    per_rank = run_on_ranks(flux_cases.models_rank, world_size, list(loads), flux_cases.CONFIGS[first][world_size],
                            flux_cases.case_dicts(first), timeout_s=900)
    return {family: [results[index] for results in per_rank] for index, family in enumerate(families)}


@pytest.mark.parametrize(("family", "world_size"), RUNS)
def test_parallel_model_matches_stock_sampling(family, world_size, model_path):
    failures = flux_cases.differences_from_stock(_run(family, world_size, model_path), family, world_size)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("family", "world_size"), RUNS)
def test_unpatched_model_is_stock_again_after_parallel_runs(family, world_size, model_path):
    rank0 = _run(family, world_size, model_path)[0]
    for name, latent in rank0["stock"].items():
        assert torch.equal(rank0["stock_again"][name], latent), f"{name}: the original ModelPatcher changed behaviour"


@pytest.mark.parametrize("family", list(TRAFFIC))
def test_parallel_runs_actually_communicate(family, model_path):
    """Each method moved data over its own dimension on every rank."""
    per_rank = _run(family, 2, model_path)
    for key, counter in TRAFFIC[family]:
        sent = [r["bytes"][key].get(counter, 0) for r in per_rank]
        assert all(b > 0 for b in sent), f"{key}: {counter} bytes per rank {sent}"


def test_wan_gathers_its_hidden_states_once_per_model_call(model_path):
    """Inside the block loop each rank holds only its rows: the sequence group gathers the hidden states once per model
    call, after the last block (a gather per block would multiply these bytes by the block count)."""
    from comfyui_xdit.testing.tiny_models import WAN_BASE

    case = flux_cases.CASE_BY_NAME["video-basic-euler-3x10x14"]  # euler, BasicGuider, batch 1: one model call a step
    tokens = case.frames * (case.height // 2) * (case.width // 2)
    one_gather = -(-tokens // 2) * WAN_BASE["dim"] * 4  # this rank's fp32 rows
    for result in _run("wan21", 2, model_path):
        assert result["bytes"][f"ulysses2/{case.name}"]["all_gather/sequence"] == case.steps * one_gather


def test_pipefusion_refuses_flux_kontext_reference_latents(model_path):
    from parallel_core.local_launch import RankFailed

    with pytest.raises(RankFailed, match="PipeFusion on Flux does not take reference latents .*set pipefusion_degree to 1"):
        run_on_ranks(flux_cases.family_rank, 2, model_path("flux_kontext"), [{"pipefusion_degree": 2}],
                     flux_cases.case_dicts("flux_kontext"), timeout_s=600)


@pytest.mark.parametrize("variant", [*flux_cases.QUANT_FILE, *flux_cases.WEIGHT_DTYPE])
def test_stock_loads_the_quantized_variants_quantized(variant, model_path):
    """Stock ComfyUI's own load of each variant (rank 0's stock model) holds its block weights quantized: ComfyUI's
    mixed-precision layers in the file's format and storage dtype, or plain layers in the fp8 weight_dtype."""
    from comfy.quant_ops import QUANT_ALGOS

    loaded = _run(variant, 2, model_path)[0]["block_weights"]
    if variant in flux_cases.QUANT_FILE:
        fmt = flux_cases.QUANT_FILE[variant].removeprefix("metadata:").replace("scaled_fp8", "float8_e4m3fn")
        assert loaded == {"formats": [fmt], "dtypes": [str(QUANT_ALGOS[fmt]["storage_t"])]}
    else:
        dtype = {"fp8_e4m3fn": "torch.float8_e4m3fn", "fp8_e4m3fn_fast": "torch.float8_e4m3fn", "fp8_e5m2": "torch.float8_e5m2"}
        assert loaded == {"formats": [], "dtypes": [dtype[flux_cases.WEIGHT_DTYPE[variant]]]}
