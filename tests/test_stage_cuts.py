"""PipeFusion's stage cutter (parallel_core.stage_cuts): the compute model from shapes, and cuts by memory, by compute
within the memory goal's slack, and by compute alone, checked against their definitions by brute force."""
from __future__ import annotations

import itertools
import random

import pytest

import parallel_core as pc
from parallel_core.stage_cuts import MEMORY_SLACK, parameter_cap

pytestmark = pytest.mark.fast

H = 3072  # Flux.1-dev's width, shapes as ComfyUI builds its blocks
DOUBLE = pc.BlockProfile(36 * H * H, (("image", 12 * H * H), ("one", 12 * H * H), ("text", 12 * H * H)), "joint", H)
SINGLE = pc.BlockProfile(15 * H * H, (("all", 12 * H * H), ("one", 3 * H * H)), "joint", H)
FLUX_DEV = [DOUBLE] * 19 + [SINGLE] * 38
TOKENS = pc.Tokens(image=4096, text=512)


def _cuts(count: int, stages: int):
    """Every cut of `count` blocks into `stages` contiguous non-empty runs."""
    for bounds in itertools.combinations(range(1, count), stages - 1):
        edges = (0, *bounds, count)
        yield [range(a, b) for a, b in zip(edges, edges[1:])]


def _heaviest(plan, weights) -> int:
    return max(sum(weights[i] for i in stage) for stage in plan)


def test_block_flops_count_each_stream_at_its_tokens_and_attention_per_query_key_pair():
    profile = pc.BlockProfile(0, (("image", 10), ("text", 20), ("all", 30), ("one", 40)), "joint", 8)
    tokens = pc.Tokens(image=6, text=2)
    linear = 2 * (10 * 6 + 20 * 2 + 30 * 8 + 40 * 1)
    assert pc.block_flops(profile, tokens) == linear + 4 * 8 * 8 * 8
    assert pc.block_flops(pc.BlockProfile(0, (), "cross", 8), tokens) == 4 * 8 * (6 * 6 + 6 * 2)
    assert pc.block_flops(pc.BlockProfile(0, (), "image", 8), tokens) == 4 * 8 * 6 * 6
    assert pc.block_flops(pc.BlockProfile(0, (("all", 5),), "joint", 0), tokens) == 2 * 5 * 8
    # Flux's double and single blocks do the same work per token; the double's extra weights modulate one vector.
    assert pc.block_flops(DOUBLE, TOKENS) / pc.block_flops(SINGLE, TOKENS) == pytest.approx(1, abs=1e-3)
    with pytest.raises(ValueError, match="unknown token stream 'video'"):
        pc.block_flops(pc.BlockProfile(0, (("video", 1),)), tokens)
    with pytest.raises(ValueError, match="unknown attention kind 'sparse'"):
        pc.block_flops(pc.BlockProfile(0, (), "sparse", 8), tokens)


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
def test_balanced_cut_evens_compute_within_the_memory_slack(stages):
    params = [b.parameters for b in FLUX_DEV]
    flops = [pc.block_flops(b, TOKENS) for b in FLUX_DEV]
    memory, balanced, speed = (pc.cut_stages(params, flops, stages, b) for b in ("memory", "balanced", "speed"))
    for plan in (memory, balanced, speed):
        assert [i for stage in plan for i in stage] == list(range(len(FLUX_DEV)))
    assert memory == pc.partition_stages(params, stages)
    assert _heaviest(balanced, params) <= (1 / stages + MEMORY_SLACK) * sum(params)
    assert _heaviest(speed, flops) <= _heaviest(balanced, flops) <= _heaviest(memory, flops)
    assert _heaviest(memory, params) <= _heaviest(balanced, params)
    # Whole blocks of equal compute: the speed cut is as even as 57 blocks allow.
    assert max(len(stage) for stage in speed) == -(-len(FLUX_DEV) // stages)


def test_flux_dev_cuts_at_two_stages():
    params = [b.parameters for b in FLUX_DEV]
    flops = [pc.block_flops(b, TOKENS) for b in FLUX_DEV]
    lengths = {b: [len(s) for s in pc.cut_stages(params, flops, 2, b)] for b in pc.BALANCES}
    assert lengths == {"memory": [17, 40], "balanced": [19, 38], "speed": [28, 29]}


def test_cuts_are_the_best_cuts_by_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        count, stages = rng.randint(1, 9), rng.randint(1, 4)
        if stages > count:
            continue
        params = [rng.choice([0, 1, 5, 20, 50]) for _ in range(count)]
        flops = [rng.choice([0, 3, 7, 40]) for _ in range(count)]
        every = list(_cuts(count, stages))
        for balance in ("balanced", "speed"):
            cap = parameter_cap(params, stages, balance)
            plan = pc.cut_stages(params, flops, stages, balance)
            assert _heaviest(plan, params) <= cap
            allowed = [c for c in every if _heaviest(c, params) <= cap]
            fastest = min(_heaviest(c, flops) for c in allowed)
            assert _heaviest(plan, flops) == fastest
            assert _heaviest(plan, params) == min(_heaviest(c, params) for c in allowed if _heaviest(c, flops) == fastest)
        memory = pc.cut_stages(params, flops, stages, "memory")
        assert _heaviest(memory, params) == min(_heaviest(c, params) for c in every)


def test_a_block_too_big_for_the_slack_raises_the_cap_to_the_memory_cut():
    params, flops = [100, 1, 1, 1], [1, 1, 1, 1]  # the first block alone is 97% of the parameters
    assert parameter_cap(params, 2, "balanced") == 100
    assert pc.cut_stages(params, flops, 2, "balanced") == [range(0, 1), range(1, 4)]
    assert pc.cut_stages(params, flops, 2, "speed") == [range(0, 2), range(2, 4)]
    # Even parameters, the compute in the first blocks: the balanced cut moves as far as 55% of the parameters allow.
    params, flops = [1] * 20, [5] * 4 + [1] * 16
    assert pc.cut_stages(params, flops, 2, "memory") == [range(0, 10), range(10, 20)]
    assert pc.cut_stages(params, flops, 2, "balanced") == [range(0, 9), range(9, 20)]
    assert pc.cut_stages(params, flops, 2, "speed") == [range(0, 4), range(4, 20)]


def test_as_many_stages_as_blocks_and_degenerate_inputs():
    params, flops = [3, 1, 4, 1, 5], [9, 2, 6, 5, 3]
    for balance in pc.BALANCES:
        assert pc.cut_stages(params, flops, 5, balance) == [range(i, i + 1) for i in range(5)]
        assert pc.cut_stages(params, flops, 1, balance) == [range(0, 5)]
        empty = pc.cut_stages([0] * 4, [0] * 4, 2, balance)  # weightless blocks: any cut will do
        assert len(empty) == 2 and [i for s in empty for i in s] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="pipefusion_degree 6 is more stages than the model's 5 transformer blocks; use at most 5"):
        pc.cut_stages(params, flops, 6)
    with pytest.raises(ValueError, match="pipefusion_degree must be a whole number >= 1, got 0"):
        pc.cut_stages(params, flops, 0)
    with pytest.raises(ValueError, match="more stages than the model's 0 transformer blocks"):
        pc.cut_stages([], [], 1)
    with pytest.raises(ValueError, match="5 blocks' parameters but 4 blocks' compute"):
        pc.cut_stages(params, flops[:4], 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        pc.cut_stages([1, -1], [1, 1], 2)
    with pytest.raises(ValueError, match="pipefusion_balance must be one of balanced, memory, speed, got 'fast'"):
        pc.cut_stages(params, flops, 2, "fast")


def test_shares_sum_to_one():
    plan = [range(0, 2), range(2, 5)]
    assert pc.stage_shares(plan, [1, 1, 1, 1, 4]) == [0.25, 0.75]
    assert pc.stage_shares(plan, [0] * 5) == [0.0, 0.0]


def test_uneven_stages_idle_more_than_the_equal_bubble():
    assert pc.pipeline_bubbles([0.5, 0.5], 4) == pytest.approx([pc.pipeline_bubble(2, 4)] * 2)
    assert pc.pipeline_time([0.5, 0.5], 4) == pytest.approx(5 / 8)  # 1.6x over one rank
    # 71% of the work on the second stage (the memory cut of the bench's tiny Flux): it paces every patch.
    assert pc.pipeline_time([2 / 7, 5 / 7], 4) == pytest.approx((1 + 3 * 5 / 7) / 4)
    bubbles = pc.pipeline_bubbles([2 / 7, 5 / 7], 4)
    assert bubbles[0] > pc.pipeline_bubble(2, 4) > bubbles[1] > 0
    assert pc.pipeline_time([1.0], 3) == 1 and pc.pipeline_bubbles([1.0], 3) == [0]
    # Lookahead: a call between two that look ahead has no fill and no drain with equal stages; the first pipelined
    # call still fills (its extra patch runs while the last stage drains), the last still drains.
    assert pc.pipeline_time([0.5, 0.5], 4, skip_first=True, ahead=True) == pytest.approx(0.5)
    assert pc.pipeline_time([0.5, 0.5], 4, ahead=True) == pytest.approx(5 / 8)
    assert pc.pipeline_time([0.5, 0.5], 4, skip_first=True) == pytest.approx(0.5)
    assert pc.pipeline_bubbles([0.5, 0.5], 2, lookahead=True) == [pytest.approx(0), pytest.approx(0)]
    # Uneven stages: the heavier stage paces the call, whichever it is.
    assert pc.pipeline_time([0.25, 0.75], 2, skip_first=True, ahead=True) == pytest.approx(0.75)
    assert pc.pipeline_time([0.75, 0.25], 2, skip_first=True, ahead=True) == pytest.approx(0.75)


def test_block_profiles_come_from_comfyuis_module_shapes(comfy_root):
    """Flux.1-dev and a 4-block SD3 as ComfyUI builds them (meta device): each linear layer counted at the tokens the
    adapter says it runs on, so Flux's cut matches the hand-made profiles above."""
    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops
    import torch

    from comfyui_xdit.block_stages import profiles, stage_plan
    from comfyui_xdit.families import registered
    from comfyui_xdit.testing.tiny_models import SD3_CONFIG, flux_config

    config = flux_config("dev", "tiny", hidden_size=H, num_heads=24, depth=19, depth_single_blocks=38, vec_in_dim=768, context_in_dim=4096)
    flux = comfy.ldm.flux.model.Flux(dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init, **config)
    every = profiles(flux, registered("Flux"))
    assert len(every) == 57
    assert (dict(every[0].linear_macs), every[0].attention, every[0].attention_width) == (dict(DOUBLE.linear_macs), "joint", H)
    assert (dict(every[-1].linear_macs), every[-1].attention, every[-1].attention_width) == (dict(SINGLE.linear_macs), "joint", H)
    assert {b: [len(s) for s in stage_plan(flux, registered("Flux"), 2, b)] for b in pc.BALANCES} == \
        {"memory": [17, 40], "balanced": [19, 38], "speed": [28, 29]}

    w = 64 * 4  # SD3's width rule: 64 per block
    sd3 = mmdit.MMDiT(**{**SD3_CONFIG, "depth": 4, "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": w}}},
                      dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    blocks = profiles(sd3, registered("SD3"))
    # Every joint block: image and text streams (attention in, out, 4x MLP) and two 6-way modulations; the last
    # block's text stream stops after attention (its qkv and a 2-way modulation only).
    assert dict(blocks[0].linear_macs) == {"image": 12 * w * w, "text": 12 * w * w, "one": 12 * w * w}
    assert dict(blocks[-1].linear_macs) == {"image": 12 * w * w, "text": 3 * w * w, "one": 8 * w * w}
    assert blocks[0].attention_width == w


def test_qwen_image_block_profile_counts_each_layer_on_its_stream(comfy_root):
    """Qwen-Image's real block (width 3072, meta device): image projections and MLP on image tokens, the add_* text
    projections and text MLP on text tokens, the two 6-way modulations once per sample."""
    import comfy.ldm.qwen_image.model as qwen
    import comfy.ops
    import torch

    from comfyui_xdit.block_stages import profiles
    from comfyui_xdit.families import registered

    model = qwen.QwenImageTransformer2DModel(num_layers=2, dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init)
    w = model.inner_dim
    block = profiles(model, registered("QwenImage"))[0]
    # Per stream: q, k, v and out projections (4 w^2) and a 4x MLP (8 w^2); modulation: w -> 6w.
    assert dict(block.linear_macs) == {"image": 12 * w * w, "text": 12 * w * w, "one": 12 * w * w}
    assert (block.attention, block.attention_width) == ("joint", 3072)


def test_the_text_carrying_patch_is_shortened_to_the_others_tokens():
    # The stale-methods bench: 32 rows of 32 tokens and 256 text tokens travelling with the first patch.
    bands = pc.patch_bands(32, 4, 32, 256)
    assert bands == [(0, 2), (2, 12), (12, 22), (22, 32)]
    assert pc.band_tokens(bands, 32, 256) == [320] * 4
    # Even bands would put 512 of 1280 tokens in the first patch: stage 2 of 2 then paces at 0.7 of one rank's call.
    assert pc.pipeline_time([0.5, 0.5], pc.band_tokens(pc.patch_bands(32, 4), 32, 256)) == pytest.approx(0.7)
    assert pc.pipeline_time([0.5, 0.5], pc.band_tokens(bands, 32, 256)) == pytest.approx(pc.pipeline_time([0.5, 0.5], 4))
    # Text heavier than a patch: the first band keeps one row; no text: the even cut; the rest within the imbalance
    # rule (a one-row first band would leave 7 rows in bands of 3 and 2).
    assert pc.patch_bands(32, 8, 32, 256)[0] == (0, 1)
    assert pc.patch_bands(16, 4, 16, 0) == pc.patch_bands(16, 4)
    assert pc.patch_bands(8, 4, 8, 512) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_unequal_patches_pace_the_pipeline():
    # A stage starts a patch once it is free and the previous stage handed the patch over.
    assert pc.pipeline_time([0.5, 0.5], [2, 1, 1]) == pytest.approx(0.5 * 0.5 + 0.5)
    assert pc.pipeline_time([0.5, 0.5], [1, 1, 2]) == pytest.approx(0.5 * 0.5 + 0.5)
    assert pc.pipeline_time([0.5, 0.5], [1, 1]) == pytest.approx(pc.pipeline_time([0.5, 0.5], 2))
