"""flux_step --profile's sorting of profiler events into categories (bench/profile_categories.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from comfyui_xdit.bench.profile_categories import (CATEGORIES, MODEL, MODULATION, ROPE, breakdown, categorize,
                                                   diffusers_label, label)

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("op, ancestors, expected", [
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [label(MODEL), "aten::scaled_dot_product_attention"], "attention"),
    ("aten::addmm", [label(MODEL), "aten::linear"], "linear"),
    ("aten::copy_", [label(MODEL), "aten::contiguous", "aten::clone"], "layout_copies"),
    ("aten::copy_", [label(MODEL), "c10d::alltoall_base_"], "collectives"),  # a collective's own copies are the collective's
    ("aten::mul", [label(MODEL), "comfy_kitchen::apply_rope"], "rope"),
    ("aten::addmm", [label(MODEL), label(MODULATION), "aten::linear"], "modulation"),  # labelled ranges claim their linears
    ("aten::cat", [label(MODEL), label(ROPE)], "rope"),
    ("aten::gelu", [label(MODEL)], "model_other"),
    ("aten::property_fill", [label(MODEL)], "model_other"),  # "rope" inside another word is not RoPE
    ("aten::add", [], "sampler"),
    ("c10d::broadcast_", [], "collectives"),
    ("xdit.comm/ring_send_wait", [label(MODEL)], "collectives"),  # parallel_core.comm's range: the time blocked waiting
    ("aten::copy_", [label(MODEL), "xdit.comm/all_to_all"], "collectives"),
    (label(MODULATION), [label(MODEL)], "modulation"),  # a range's own Python time
])
def test_categorize(op, ancestors, expected):
    assert categorize(op, ancestors) == expected


def test_breakdown_counts_each_events_self_time_once():
    def event(name, self_us, parent=None):
        return SimpleNamespace(name=name, self_cpu_time_total=self_us, cpu_parent=parent)

    model = event(label(MODEL), 100)
    linear = event("aten::linear", 10, model)
    events = [model, linear, event("aten::addmm", 2000, linear), event("aten::gelu", 500, model), event("aten::add", 300)]
    totals = breakdown(events)
    assert list(totals) == list(CATEGORIES)
    assert totals["linear"] == pytest.approx(2.01) and totals["model_other"] == pytest.approx(0.6)
    assert totals["sampler"] == pytest.approx(0.3) and sum(totals.values()) == pytest.approx(2.91)


@pytest.mark.parametrize("name, class_name, parent, expected", [
    ("", "FluxTransformer2DModel", None, MODEL),
    ("time_text_embed", "CombinedTimestepGuidanceTextProjEmbeddings", "FluxTransformer2DModel", MODULATION),
    ("transformer_blocks.0.norm1.linear", "Linear", "AdaLayerNormZero", MODULATION),  # ComfyUI's img_mod
    ("transformer_blocks.0.norm1_context.linear", "Linear", "AdaLayerNormZero", MODULATION),  # txt_mod
    ("single_transformer_blocks.1.norm.linear", "Linear", "AdaLayerNormZeroSingle", MODULATION),
    ("norm_out.linear", "Linear", "AdaLayerNormContinuous", MODULATION),  # the final layer's adaLN_modulation
    ("transformer_blocks.0.norm1", "AdaLayerNormZero", "FluxTransformerBlock", None),  # its norm is model work
    ("pos_embed", "FluxPosEmbed", "FluxTransformer2DModel", ROPE),
    ("transformer_blocks.0.attn.to_q", "Linear", "FluxAttention", None),
    ("x_embedder", "Linear", "FluxTransformer2DModel", None),
])
def test_diffusers_label(name, class_name, parent, expected):
    assert diffusers_label(name, class_name, parent) == expected

