"""The loader's auto degrees (0) and the errors for degree combinations that cannot run."""
from __future__ import annotations

import pytest

from comfyui_xdit.degrees import resolve_degrees, resolve_world_size
from parallel_core import ParallelConfig

pytestmark = pytest.mark.fast


def test_world_size_auto_is_every_gpu_or_two_cpu_workers():
    assert resolve_world_size(0, visible_gpus=8) == 8
    assert resolve_world_size(0, visible_gpus=0) == 2
    assert resolve_world_size(3, visible_gpus=8) == 3
    with pytest.raises(ValueError, match="world_size must be 0"):
        resolve_world_size(-1, 0)


@pytest.mark.parametrize(
    ("world", "heads", "given", "expected"),
    [
        (4, 24, {}, ParallelConfig(ulysses_degree=4)),
        (8, 24, {}, ParallelConfig(ulysses_degree=8)),
        (8, 6, {}, ParallelConfig(ulysses_degree=2, ring_degree=4)),  # as much Ulysses as divides the heads
        (4, 2, {}, ParallelConfig(ulysses_degree=2, ring_degree=2)),
        (4, 24, {"cfg": 2}, ParallelConfig(ulysses_degree=2, cfg_degree=2)),
        (4, 24, {"ring": 4}, ParallelConfig(ring_degree=4)),
        (8, 24, {"ulysses": 2}, ParallelConfig(ulysses_degree=2, ring_degree=4)),
        (2, 24, {"ulysses": 1, "ring": 1, "cfg": 2}, ParallelConfig(cfg_degree=2)),
    ],
)
def test_auto_degrees_fill_the_world(world, heads, given, expected):
    assert resolve_degrees(world, heads, **given) == expected


def test_patch_parallel_takes_no_sequence_parallel_by_default():
    assert resolve_degrees(4, 24, patch=2, cfg=2) == ParallelConfig(patch_degree=2, cfg_degree=2)
    assert resolve_degrees(2, 24, pipefusion=2) == ParallelConfig(pipefusion_degree=2)
    assert resolve_degrees(4, 24, patch=4) == ParallelConfig(patch_degree=4)
    with pytest.raises(ValueError, match="patch_degree 2 × cfg_degree 1 × pipefusion_degree 1 covers 2 of world_size 4 workers, .* raise patch_degree or cfg_degree so the product is 4"):
        resolve_degrees(4, 24, patch=2)


def test_degrees_that_do_not_divide_the_world_say_what_to_change():
    with pytest.raises(ValueError, match="ulysses_degree 4 = 4 does not divide world_size 2"):
        resolve_degrees(2, 24, ulysses=4)
    with pytest.raises(ValueError, match="ulysses_degree 1 × ring_degree 1 × cfg_degree 1 × pipefusion_degree 1 × patch_degree 1 × data_degree 1 = 1, but world_size is 4; set a degree to 0"):
        resolve_degrees(4, 24, ulysses=1, ring=1)
    with pytest.raises(ValueError, match="cfg_degree must be 0 \\(auto\\) or >= 1"):
        resolve_degrees(4, 24, cfg=-2)


def test_models_without_sequence_parallel_give_the_world_to_cfg_then_data():
    cfg_and_data = ("cfg", "data")
    assert resolve_degrees(2, None, supported=cfg_and_data) == ParallelConfig(cfg_degree=2)
    assert resolve_degrees(4, None, cfg=2, supported=cfg_and_data) == ParallelConfig(cfg_degree=2, data_degree=2)
    assert resolve_degrees(4, None, data=4, supported=cfg_and_data) == ParallelConfig(data_degree=4)
    with pytest.raises(ValueError, match="cfg_degree 2 × pipefusion_degree 1 × patch_degree 1 × data_degree 1 = 2, but world_size is 4"):
        resolve_degrees(4, None, cfg=2, data=1, supported=cfg_and_data)


def test_data_degree_is_a_loader_degree_like_the_others():
    assert resolve_degrees(4, 24, data=2) == ParallelConfig(ulysses_degree=2, data_degree=2)
    with pytest.raises(ValueError, match="data_degree 3 = 3 does not divide world_size 4"):
        resolve_degrees(4, 24, data=3)
