"""The first prompt's breakdown and the opt-in start of the pool with ComfyUI (XDIT_PRESTART_WORKERS), as logic."""
from __future__ import annotations

import pytest

from comfyui_xdit.pool_client import PRESTART_ENV, prestart_world
from comfyui_xdit.testing.demo import cold_start_lines, ratio_meaning

pytestmark = pytest.mark.fast

COLD = {"ray_s": 2.0, "workers_s": 3.0, "group_s": 4.0, "new_workers": 2, "loads_s": 1.0, "first_job_s": 5.0, "first_step_s": 1.5,
        "ranks": [{"process_s": 2.5, "service_s": 3.5}, {"process_s": 2.8, "service_s": 3.9}]}


@pytest.mark.parametrize(("value", "world"), [(None, None), ("", None), ("0", None), (" 2 ", 2), ("4", 4), ("auto", 0), ("AUTO", 0)])
def test_prestart_setting_values(value, world):
    assert prestart_world(value) == world


@pytest.mark.parametrize("value", ["yes", "-1", "2.5"])
def test_a_bad_prestart_setting_names_the_variable_and_the_choices(value):
    with pytest.raises(ValueError, match=rf"{PRESTART_ENV}=.*positive number.*'auto'"):
        prestart_world(value)


def test_breakdown_of_a_prompt_that_started_the_pool():
    lines = cold_start_lines(20.0, COLD, None)
    assert lines[0] == "  first prompt 20.00 s:"
    assert "    Ray start: 2.00 s" in lines and "slowest 2.80 s" in lines[2] and "slowest import 3.90 s" in lines[3]
    assert lines[-1].endswith(f"{20.0 - (2 + 3 + 4 + 1 + 5):.2f} s")  # what the pool did not account for


def test_breakdown_of_a_prompt_after_the_pool_started_with_comfyui():
    lines = cold_start_lines(8.0, COLD, 9.5)
    assert lines[0] == "  pool started with ComfyUI, before the prompt: 9.50 s"
    prompt = lines[lines.index("  first prompt 8.00 s:"):]
    assert not any("Ray start" in line for line in prompt)
    assert prompt[-1].endswith(f"{8.0 - (1 + 5):.2f} s")


def test_breakdown_of_a_prompt_whose_queueing_started_the_pool():
    lines = cold_start_lines(12.0, {**COLD, "started_for": "queued prompt"}, None, 7.5)
    assert lines[0] == "  first prompt 12.00 s:"
    assert lines[1].startswith("    pool start, from when the prompt was queued (Ray 2.00 s, 2 worker processes 3.00 s, group and imports 4.00 s)")
    assert lines[1].endswith(": 7.50 s")
    assert lines[-1].endswith(f"{12.0 - (7.5 + 1 + 5):.2f} s")  # ComfyUI's own work that did not overlap the start


def test_the_demo_ratio_is_explained_for_the_machine_it_ran_on():
    cpu = [{"cuda": False, "threads": 1}] * 2
    assert "2 CPU cores shared by 2 workers (1 thread each)" in ratio_meaning(cpu, 1.02, 2, 0.5)
    assert "about 1x is expected on CPU" in ratio_meaning(cpu, 1.02, 2, 0.5)
    assert "noisy" not in ratio_meaning(cpu, 1.02, 2, 0.5) and "load average 7.5 on 2 cores" in ratio_meaning(cpu, 1.02, 2, 7.5)
    assert "below 1x is expected" in ratio_meaning([{"cuda": False, "threads": 1}] * 4, 0.8, 2, 0.5)
    assert "1.90x is the pool's speedup" in ratio_meaning([{"cuda": True, "threads": 1}] * 2, 1.9, 16, 0.5)


@pytest.fixture(scope="module")
def loader_class(comfy_root):
    import importlib.util
    from pathlib import Path

    # By file: inside ComfyUI the pack's folder is the package, and `nodes` here is ComfyUI's own nodes.py.
    spec = importlib.util.spec_from_file_location("xdit_unet_loader", Path(__file__).resolve().parents[1] / "nodes" / "unet_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.XDiTUNetLoader


def _prompt(*loaders: dict) -> dict:
    nodes = {str(i): {"class_type": "XDiTUNetLoader", "inputs": {"unet_name": "m.safetensors", "weight_dtype": "default", **inputs}}
             for i, inputs in enumerate(loaders)}
    return {**nodes, "99": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}}


def test_a_queued_prompt_starts_the_local_pool_for_its_one_valid_world(loader_class):
    from comfyui_xdit.queued_start import local_pool_request

    assert local_pool_request(_prompt({"world_size": 2, "ray_address": "local", "ulysses_degree": 2}), loader_class) == (2, "m.safetensors")
    assert local_pool_request(_prompt({}), loader_class) == (0, "m.safetensors")  # auto: resolved as the loader does
    assert local_pool_request(_prompt({"world_size": 2}, {"world_size": 2}), loader_class) == (2, "m.safetensors")


@pytest.mark.parametrize("prompt", [
    _prompt({"world_size": 2, "ray_address": "nowhere"}),  # not a configured cluster: the prompt is refused
    _prompt({"world_size": 2, "ray_address": "operators"}),  # configured, but only the loader connects elsewhere
    _prompt({"world_size": -1}), _prompt({"world_size": 1025}), _prompt({"world_size": True}), _prompt({"world_size": "2"}),
    _prompt({"world_size": ["5", 0]}),  # a link: known only when the graph runs
    _prompt({"world_size": 2, "data_degree": 4}),  # the loader's own VALIDATE_INPUTS refuses it
    _prompt({"world_size": 2, "weight_sharding": "layers"}),
    _prompt({"world_size": 2}, {"world_size": 4}),  # two worlds: which one is the loader's to decide
    _prompt({"world_size": 2, "unet_name": ["1", 0]}),
    {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "m.safetensors"}}}, [], None,
])
def test_a_queued_prompt_starts_nothing_unless_every_loader_asks_validly_for_the_local_pool(prompt, loader_class, monkeypatch):
    from comfyui_xdit.queued_start import local_pool_request
    from ray_backend.clusters import CLUSTERS_ENV

    monkeypatch.setenv(CLUSTERS_ENV, "operators=127.0.0.1:6379")
    assert local_pool_request(prompt, loader_class) is None


@pytest.mark.parametrize("for_a_prompt", [True, False])
def test_a_failed_background_start_fails_the_next_get_only_when_it_was_for_a_prompt(for_a_prompt, monkeypatch):
    """A queued prompt's start that loses a worker fails that prompt (once), as if its loader had started the pool;
    a start with ComfyUI leaves the first prompt to start a pool afresh. WorkerPool is replaced because a worker
    dying mid-start needs Ray: the real case runs in test_server_faults."""
    from ray_backend import pool as pool_module
    from ray_backend.clusters import LOCAL_TARGET
    from ray_backend.errors import PoolFailure

    started = []

    def worker_pool(key, service_path, should_interrupt=None, service_env=None):
        started.append(key.world_size)
        if len(started) == 1:
            raise PoolFailure("rank 1 died while starting")
        return type("StartedPool", (), {"key": key, "alive": True, "cold_start": {}})()

    monkeypatch.setattr(pool_module, "WorkerPool", worker_pool)
    registry = pool_module.PoolRegistry("unused.service")
    with pytest.raises(PoolFailure):
        registry.start_if_none(LOCAL_TARGET, lambda: 2, "test", for_a_prompt)
    if for_a_prompt:
        with pytest.raises(PoolFailure, match="rank 1 died while starting"):
            registry.get(2, LOCAL_TARGET)
    assert registry.get(2, LOCAL_TARGET).key.world_size == 2
    assert started == [2, 2]
