"""The per-family bench's premise (bench/family_step.py): each bench shape has its real model's tokens per width at
1024 x 1024 (so attention's share of the FLOPs is the real one), heads that Ulysses-2 divides, and the real head
dimension. The bench itself checks its bytes against theory when it runs."""
from __future__ import annotations

import pytest

from comfyui_xdit.bench.family_step import image_tokens, shapes

pytestmark = pytest.mark.fast
REAL_HEAD_DIM = {"flux": 128, "flux2": 128, "sd3": 64, "qwen_image": 128}


@pytest.mark.parametrize("family", sorted(shapes()))
def test_bench_shape_keeps_the_real_models_tokens_per_width(family):
    shape = shapes()[family]
    bench = (image_tokens(shape) + shape.text_tokens) / shape.hidden
    real = (shape.real.image_tokens + shape.real.text_tokens) / shape.real.hidden
    assert abs(bench / real - 1) < 0.05, f"{family}: {bench:.3f} tokens per width vs the real model's {real:.3f}"
    assert shape.heads % 2 == 0 and shape.hidden // shape.heads == REAL_HEAD_DIM[family]


def test_video_scale_bench_runs_wan_480p_grids_at_the_token_counts_the_issue_names():
    from comfyui_xdit.bench.video_scale import degrees_for, theoretical_step_bytes, tokens_for

    # 832 x 480 pixels: 30 x 52 tokens a latent frame; 5, 11, 21, 42 latent frames ~ 8k, 16k, 32k, 64k tokens.
    assert [round(tokens_for(f) / 1024) for f in (5, 11, 21, 42)] == [8, 17, 32, 64]
    assert degrees_for(4, heads=2) == {"ulysses_degree": 2, "ring_degree": 2}
    assert degrees_for(2, heads=2) == {"ulysses_degree": 2, "ring_degree": 1}
    assert theoretical_step_bytes(1, 2, 256, 1, 5) == 0
    # Ulysses-2, one block: 4 all-to-alls of a (S/2 x 128)-channel half each way, then the gather of the head's output,
    # S/2 rows of 16 channels x 2 x 2 patch pixels.
    half = tokens_for(1) // 2
    assert theoretical_step_bytes(2, 2, 256, 1, 1) == 4 * half * 128 * 4 + half * 64 * 4
