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


def test_the_demo_ratio_is_explained_for_the_machine_it_ran_on():
    cpu = [{"cuda": False, "threads": 1}] * 2
    assert "2 CPU cores shared by 2 workers (1 thread each)" in ratio_meaning(cpu, 1.02, 2, 0.5)
    assert "about 1x is expected on CPU" in ratio_meaning(cpu, 1.02, 2, 0.5)
    assert "noisy" not in ratio_meaning(cpu, 1.02, 2, 0.5) and "load average 7.5 on 2 cores" in ratio_meaning(cpu, 1.02, 2, 7.5)
    assert "below 1x is expected" in ratio_meaning([{"cuda": False, "threads": 1}] * 4, 0.8, 2, 0.5)
    assert "1.90x is the pool's speedup" in ratio_meaning([{"cuda": True, "threads": 1}] * 2, 1.9, 16, 0.5)
