"""Every family inside real ComfyUI on gloo ranks: the parallel model's latents equal stock sampling to fp32 rounding.

One suite, parametrised over families (flux_cases.CONFIGS): Flux.1 (every exact method), Flux.2 (same adapter
code, its own token grid), SD3 and SD3.5 (MMDiT, with and without dual-attention blocks), Qwen-Image (its own hooks,
5-D latents; with reference images as Qwen-Image-Edit; PipeFusion and displaced patch parallel on its class built
in-process with two blocks), Chroma and Chroma Radiance (in-process at tiny width;
Radiance in pixel space), Flux.1 Kontext (reference latents, also under displaced
patch parallel), HiDream I1 (built in-process; text at the
rear of its joint attention), Lumina 2 and Z-Image (NextDiT, caption and image refiners before the joint layers),
Wan 2.1 (T2V, I2V), Wan 2.2's TI2V 5B and HunyuanVideo 1.0 and 1.5, LTX-Video, Mochi (in-process) and CogVideoX on video latents, and SD1.5 and SDXL U-Nets, which have no sequence-parallel adapter
and run on the generic CFG and data parallel wrappers. Configs with "weight_sharding": "blocks" (Flux, Wan 2.2 5B,
Chroma) run on block weights sharded over every rank and must equal the unsharded pool bit for bit.
test_gpu_parallel.py runs the same cases on CUDA ranks over NCCL.
"""
from __future__ import annotations

import functools
from dataclasses import asdict

import pytest
import torch

import flux_cases
from parallel_core.local_launch import run_on_ranks

RUNS = [(family, world) for family, by_world in flux_cases.CONFIGS.items() for world in by_world]
# (config tag/case, counter) that must have moved bytes on every rank: guards against a silently unpatched model.
TRAFFIC: dict[str, list[tuple[str, str]]] = {
    "flux": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/basic-euler", "ring_send/ring"),
             ("cfg2/cfg-euler", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data"),
             ("ulysses2-weightblocks/basic-euler", "all_gather/world"), ("data2-weightblocks/basic-euler", "all_gather/world")],
    "flux2": [("ulysses2/cfg-dpmpp2m-18x22", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
              ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("pipefusion2/cfg-dpmpp2m-18x22", "send/pipefusion+broadcast/pipefusion"),
              ("patch2/cfg-dpmpp2m-18x22", "all_gather/patch")],
    "sd15": [("cfg2/cfg-euler-10x12-batch2", "broadcast/cfg"), ("data2/cfg-euler-10x12-batch2", "all_gather/data")],
    "sdxl": [("cfg2/cfg-euler-10x12-batch2", "broadcast/cfg"), ("data2/cfg-euler-10x12-batch2", "all_gather/data")],
    "sd3": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/basic-euler", "ring_send/ring"),
            ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data"),
            ("pipefusion2/cfg-dpmpp2m-18x22", "send/pipefusion+broadcast/pipefusion"), ("patch2/basic-euler", "all_gather/patch")],
    "sd35": [("ulysses2/cfg-euler", "all_to_all/ulysses"), ("ring2/cfg-euler", "ring_send/ring"),
             ("cfg2/cfg-euler", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "qwen_image": [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                   ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
    "qwen_image_stages": [("pipefusion2/cfg-dpmpp2m-18x22", "send/pipefusion+broadcast/pipefusion"),
                          ("patch2/basic-euler", "all_gather/patch")],
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
               ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data"),
               ("pipefusion2/cfg-dpmpp2m-18x22", "send/pipefusion+broadcast/pipefusion"), ("patch2/basic-euler", "all_gather/patch")],
    "chroma_radiance": [("ulysses2/cfg-dpmpp2m-18x22", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                        ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")],
}
TRAFFIC["zimage"] = [("ulysses2/basic-euler", "all_to_all/ulysses"), ("ring2/cfg-dpmpp2m-18x22", "ring_send/ring"),
                     ("cfg2/cfg-dpmpp2m-18x22", "broadcast/cfg"), ("data2/basic-dpmpp2m-18x22-batch2", "all_gather/data")]
TRAFFIC["hunyuan_video"] = [("ulysses2/video-cfg-dpmpp2m-3x10x14-padded-text", "all_to_all/ulysses"),
                            ("ring2/video-image-cfg-euler-3x10x14", "ring_send/ring"),
                            ("cfg2/video-cfg-dpmpp2m-3x10x14-padded-text", "broadcast/cfg"),
                            ("data2/video-basic-euler-3x10x14-batch2", "all_gather/data")]
TRAFFIC["hunyuan_video15"] = [("ulysses2/video-image-cfg-euler-3x5x7", "all_to_all/ulysses"),
                              ("ring2/video-image-cfg-euler-3x5x7", "ring_send/ring"),
                              ("cfg2/video-image-cfg-euler-3x5x7", "broadcast/cfg"),
                              ("data2/video-basic-dpmpp2m-3x5x7-batch2", "all_gather/data")]
TRAFFIC["ltxv"] = [("ulysses2/video-image-cfg-euler-3x5x7", "all_to_all/ulysses"), ("ring2/video-cfg-dpmpp2m-3x5x7-padded-text", "ring_send/ring"),
                   ("cfg2/video-image-cfg-euler-3x5x7", "broadcast/cfg"), ("data2/video-cfg-dpmpp2m-3x5x7-padded-text", "all_gather/data")]
TRAFFIC["mochi"] = [("ulysses2/video-cfg-dpmpp2m-3x10x14-padded-text", "all_to_all/ulysses"), ("ring2/video-basic-euler-3x10x14-batch2", "ring_send/ring"),
                    ("cfg2/video-cfg-dpmpp2m-3x10x14-padded-text", "broadcast/cfg"), ("data2/video-basic-euler-3x10x14-batch2", "all_gather/data")]
TRAFFIC["cogvideox"] = [("ulysses2/video-basic-euler-3x10x14-batch2", "all_to_all/ulysses"), ("ring2/video-cfg-dpmpp2m-3x10x14", "ring_send/ring"),
                        ("cfg2/video-cfg-dpmpp2m-3x10x14", "broadcast/cfg"), ("data2/video-basic-euler-3x10x14-batch2", "all_gather/data")]
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
    per_rank = _run(family, world_size, model_path)
    for degrees in flux_cases.CONFIGS[family][world_size]:  # the worst error of each method, for the record (-s)
        key = flux_cases.tag(degrees)
        worst = max(((r["parallel"][f"{key}/{name}"] - per_rank[0]["stock"][name]).abs().max().item()
                     for r in per_rank for name in flux_cases.FAMILY_CASES[family]
                     if r["parallel"][f"{key}/{name}"].shape == per_rank[0]["stock"][name].shape), default=float("nan"))
        print(f"{family} world {world_size} {key}: max abs error {worst:.2e} vs stock")
    for name, one_item in per_rank[0].get("stock_one_item_calls", {}).items():
        print(f"{family} {name}: stock with one-item calls moves by {(one_item - per_rank[0]['stock'][name]).abs().max().item():.2e}")
    failures = flux_cases.differences_from_stock(per_rank, family, world_size)
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
        sent = [sum(r["bytes"][key].get(c, 0) for c in counter.split("+")) for r in per_rank]  # "a+b": either op
        assert all(b > 0 for b in sent), f"{key}: {counter} bytes per rank {sent}"


STALE_FAMILIES = [family for family, by_world in flux_cases.CONFIGS.items()
                  if any(d.get("pipefusion_degree", 1) > 1 or d.get("patch_degree", 1) > 1 for d in by_world[2])]


@pytest.mark.parametrize("family", STALE_FAMILIES)
def test_stale_methods_after_warmup_report_their_error(family, model_path):
    """At the sampler's defaults (one warmup step, then stale keys/values) PipeFusion and displaced patch parallel are
    approximate: their error against stock is printed; it is not zero (the stale path ran), smaller than the latent,
    and every rank holds the same latent."""
    per_rank = _run(family, 2, model_path)
    approximate = per_rank[0]["after_warmup"]
    assert approximate, f"{family}: no stale-method run at the sampler's defaults"
    for key, latent in approximate.items():
        reference = per_rank[0]["stock"][key.split("/", 1)[1]]
        err, size = (latent - reference).abs().max().item(), reference.abs().max().item()
        print(f"{family} {key} after warmup: max abs error {err:.3e} vs stock (latent max {size:.2f})")
        assert 0 < err < size, f"{key}: max abs error {err:.3e}, latent max {size:.2f}"
        assert all(torch.equal(r["after_warmup"][key], latent) for r in per_rank[1:]), f"{key}: ranks disagree"


# The families whose hooks give PipeFusion the forward at other timesteps (pipefusion_lookahead.FamilyCall).
LOOKAHEAD_FAMILIES = {"flux2", "chroma", "qwen_image_stages"}


@pytest.mark.parametrize("family", STALE_FAMILIES)
def test_pipefusion_lookahead_changes_no_latent(family, model_path):
    """PipeFusion's first stage running the next call's first patch ahead changes only when it works: the latent is
    bit-identical to the run without it, on every rank; where the family's hooks support it, every call after the
    second used a verified prediction, with one cond per call (BasicGuider) as with CFGGuider's cond and uncond in one
    batch (its guided denoised value combined on the first stage)."""
    per_rank = _run(family, 2, model_path)
    for key, used_missed in per_rank[0]["lookahead"].items():
        for rank, result in enumerate(per_rank):
            assert torch.equal(result["after_warmup"][key], result["without_lookahead"][key]), f"{key} rank {rank}: lookahead changed the latent"
        case = flux_cases.CASE_BY_NAME[key.split("/", 1)[1]]
        print(f"{family} {key}: lookahead (used, missed) {used_missed}")
        expected = (case.steps - 2, 0) if family in LOOKAHEAD_FAMILIES else (0, 0)
        assert used_missed == expected, f"{key}: lookahead (used, missed) {used_missed}, expected {expected}"


@pytest.mark.parametrize("family", ["flux", *sorted(LOOKAHEAD_FAMILIES)])
def test_pipefusion_lookahead_serves_a_bf16_model(family, model_path):
    """A bf16 model (as a GPU runs these families) sees the sampler's float32 latent rounded to bf16. The first
    stage predicts the next input from the sampler's own latent, patchified the family's way, not from the rounded
    tokens (that missed at once and turned lookahead off: (0, 1)), so every call after the second uses its
    prediction, and the latent is bit-identical to the run without lookahead on every rank."""
    case = flux_cases.CASE_BY_NAME["basic-euler"]
    per_rank = run_on_ranks(flux_cases.bf16_lookahead_rank, 2, model_path(family), asdict(case), timeout_s=600)
    for rank, result in enumerate(per_rank):
        assert result["inference_dtype"] == "torch.bfloat16", f"rank {rank} computed in {result['inference_dtype']}"
        assert torch.equal(result["with"], result["without"]), f"rank {rank}: lookahead changed the latent"
    assert per_rank[0]["lookahead"] == (case.steps - 2, 0)


def test_wan_gathers_only_the_heads_output_once_per_model_call(model_path):
    """Each rank holds only its rows from block 0 through the head: the sequence group gathers once per model call,
    the head's output (16 channels x 2 x 2 patch pixels a token), not the hidden states (the model's width, 512 here;
    a gather per block would multiply the bytes by the block count)."""
    from comfyui_xdit.testing.tiny_models import WAN_VARIANTS

    case = flux_cases.CASE_BY_NAME["video-basic-euler-3x10x14"]  # euler, BasicGuider, batch 1: one model call a step
    tokens = case.frames * (case.height // 2) * (case.width // 2)
    one_gather = -(-tokens // 2) * WAN_VARIANTS["t2v"][0]["out_dim"] * 4 * 4  # this rank's fp32 rows of patch pixels
    for result in _run("wan21", 2, model_path):
        assert result["bytes"][f"ulysses2/{case.name}"]["all_gather/sequence"] == case.steps * one_gather


def test_pipefusion_refuses_flux_kontext_reference_latents(model_path):
    from parallel_core.local_launch import RankFailed

    with pytest.raises(RankFailed, match="PipeFusion on Flux does not take reference latents .*set pipefusion_degree to 1"):
        run_on_ranks(flux_cases.family_rank, 2, model_path("flux_kontext"), [{"pipefusion_degree": 2}],
                     flux_cases.case_dicts("flux_kontext"), timeout_s=600)


@pytest.mark.parametrize("degree", ["pipefusion", "patch"])
def test_stale_methods_refuse_qwen_image_edit_reference_images(degree, model_path):
    from parallel_core.local_launch import RankFailed

    with pytest.raises(RankFailed, match="PipeFusion and patch parallel on Qwen-Image do not take reference images .*"
                                         "set pipefusion_degree and patch_degree to 1"):
        run_on_ranks(flux_cases.family_rank, 2, model_path("qwen_image_stages"), [{f"{degree}_degree": 2}],
                     flux_cases.case_dicts("qwen_image_edit"), timeout_s=600)


def test_hunyuan_video_gathers_its_image_rows_once_per_model_call(model_path):
    """Inside the block loop each rank holds only its rows (the text's travel with the image's through the
    all-to-all): the sequence group gathers the image rows once per model call, after the last block."""
    from comfyui_xdit.testing.tiny_models import HUNYUAN_VIDEO_BASE as config

    case = flux_cases.CASE_BY_NAME["video-basic-euler-3x10x14-batch2"]  # euler, BasicGuider: one model call a step
    tokens = case.frames * (case.height // 2) * (case.width // 2)
    image_rows = case.batch * -(-tokens // 2) * config["hidden_size"] * 4  # this rank's fp32 rows
    for result in _run("hunyuan_video", 2, model_path):
        assert result["bytes"][f"ulysses2/{case.name}"]["all_gather/sequence"] == case.steps * image_rows


def test_mochi_never_gathers_its_text(model_path):
    """Mochi's text rows ride in Ulysses' all-to-all (and Ring's blocks) with the visual rows: per block each rank
    sends q, k, v and receives the output of [its visual piece, its piece of the 7 valid text tokens] and nothing
    more, and the only gather is the visual rows once per model call, after the last block."""
    from comfyui_xdit.testing.tiny_models import MOCHI_UNET_CONFIG as config

    case = flux_cases.CASE_BY_NAME["video-basic-euler-3x10x14-batch2"]  # euler, BasicGuider: one model call a step
    visual = -(-case.frames * (case.height // 2) * (case.width // 2) // 2)
    row = case.batch * config["hidden_size_x"] * 4  # one fp32 token row of every sample
    rows_sent = config["depth"] * 4 * (visual + -(-flux_cases.TEXT_TOKENS // 2)) // 2  # q, k, v, out: half to the other rank
    for result in _run("mochi", 2, model_path):
        assert result["bytes"][f"ulysses2/{case.name}"] == {"all_gather/sequence": case.steps * visual * row,
                                                            "all_to_all/ulysses": case.steps * rows_sent * row}
        assert set(result["bytes"][f"ring2/{case.name}"]) == {"all_gather/sequence", "ring_send/ring"}


SHARDED_RUNS = [(family, world) for family, world in RUNS
                if any("weight_sharding" in degrees for degrees in flux_cases.CONFIGS[family][world])]


@pytest.mark.parametrize(("family", "world_size"), SHARDED_RUNS)
def test_sharded_weights_equal_the_unsharded_pool_and_hold_their_share(family, world_size, model_path):
    """Gathering is a byte copy: a config on sharded weights gives the unsharded pool's latents bit for bit, each rank
    keeps 1/P of the block weights (plus alignment padding), and every model call gathers each block once."""
    per_rank = _run(family, world_size, model_path)
    for degrees in flux_cases.CONFIGS[family][world_size]:
        if "weight_sharding" not in degrees:
            continue
        twin = {k: v for k, v in degrees.items() if k != "weight_sharding"}
        for name in flux_cases.FAMILY_CASES[family]:
            for rank, result in enumerate(per_rank):
                if twin in flux_cases.CONFIGS[family][world_size]:
                    assert torch.equal(result["parallel"][f"{flux_cases.tag(degrees)}/{name}"],
                                       result["parallel"][f"{flux_cases.tag(twin)}/{name}"]), f"{degrees} {name} rank {rank}"
                sent = result["bytes"][f"{flux_cases.tag(degrees)}/{name}"]["all_gather/world"]
                held = result["sharded"]["resident"]
                assert sent > 0 and sent % (held * (world_size - 1)) == 0, f"{degrees} {name}: {sent} bytes is no whole number of block passes"
    for result in per_rank:
        held, whole = result["sharded"]["resident"], result["sharded"]["whole"]
        assert whole / world_size <= held < whole / world_size * 1.01 + 4096, result["sharded"]


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
