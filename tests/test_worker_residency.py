"""Which models a pool worker keeps loaded: up to RESIDENT_MODELS (two by default, so Wan 2.2 A14B's two experts stay
resident), the least recently used dropped for a new one. Real ComfyUI loads of tiny files, on one rank."""
from __future__ import annotations

from pathlib import Path

from comfyui_xdit.job_spec import PoolModelRef
from comfyui_xdit.worker_service import RESIDENT_MODELS, SamplingService
from parallel_core import ParallelConfig, init_parallel


def test_two_models_stay_resident_and_a_third_drops_the_least_recently_used(comfy_root, tiny_model_path):
    assert RESIDENT_MODELS == 2
    paths = [str(tiny_model_path(family)) for family in ("wan21", "wan21_i2v", "wan22_5b")]
    state = init_parallel(ParallelConfig())
    service = SamplingService("cpu")

    def use(path: str) -> tuple[int, list[str]]:
        ref = PoolModelRef(path=path, weight_dtype="default", degrees=(), world_size=1, cluster="local", num_heads=4)
        service.prepare(ref, state)
        stats = service.stats()
        return stats["model_loads"], [Path(key[0]).stem for key in stats["resident"]]

    first, second, third = paths
    assert use(first) == (1, ["wan21"])
    assert use(second) == (2, ["wan21", "wan21_i2v"])
    assert use(first) == (2, ["wan21_i2v", "wan21"])  # alternating two models loads neither again
    assert use(second) == (2, ["wan21", "wan21_i2v"])
    assert use(third) == (3, ["wan21_i2v", "wan22_5b"])  # the least recently used (wan21) made room
    assert use(first) == (4, ["wan22_5b", "wan21"])
