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
