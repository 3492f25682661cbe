"""The torch switches a job carries to the workers: read from this process, applied around a block, and this
process's own restored after it (ray_backend/torch_switches.py; test_pool_faults.py checks them on real workers).

Each scenario runs in a fresh interpreter: torch's precision switches cannot all be put back by hand once set (the
legacy and per-backend forms then disagree), and the test process must not compute with them afterwards.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_backend.torch_switches import TorchSwitches

pytestmark = pytest.mark.fast

REPO_ROOT = Path(__file__).resolve().parents[1]


def a_job_computes_with_the_senders_switches_and_the_worker_keeps_its_own() -> None:
    own = TorchSwitches.of_this_process()
    assert own.as_dict()["mkldnn.enabled"] is True and own.as_dict()["deterministic_algorithms"] == (False, False)
    # What ComfyUI's --deterministic and --fast fp16_accumulation, a node turning oneDNN off and one asking for TF32
    # set in the sending process; the receiving process is simulated by putting this one back first.
    torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_fp16_accumulation = True
    torch.set_float32_matmul_precision("high")
    sent = pickle.loads(pickle.dumps(TorchSwitches.of_this_process()))  # as Ray carries it
    with own.applied():
        assert TorchSwitches.of_this_process() == own
        with sent.applied():
            assert not torch.backends.mkldnn.enabled
            assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
            assert torch.backends.cuda.matmul.allow_fp16_accumulation
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # what "high" means for CUDA matmuls
        assert TorchSwitches.of_this_process() == own


def precision_set_per_backend_travels_too() -> None:
    # Once a process sets fp32 precision per backend, torch refuses to read it through get_float32_matmul_precision.
    own = TorchSwitches.of_this_process()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    sent = TorchSwitches.of_this_process()
    assert sent.as_dict()["cuda.matmul.fp32_precision"] == "tf32" and sent.as_dict()["cudnn.conv.fp32_precision"] == "ieee"
    with own.applied():
        assert torch.backends.cudnn.conv.fp32_precision == own.as_dict()["cudnn.conv.fp32_precision"]
        with sent.applied():
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def a_switch_this_torch_does_not_know_is_left_alone() -> None:
    own = TorchSwitches.of_this_process()
    newer = TorchSwitches(own.values + (("cuda.some_future_switch", True),))
    with newer.applied():
        assert TorchSwitches.of_this_process() == own


@pytest.mark.parametrize("scenario", [a_job_computes_with_the_senders_switches_and_the_worker_keeps_its_own,
                                      precision_set_per_backend_travels_too,
                                      a_switch_this_torch_does_not_know_is_left_alone], ids=lambda f: f.__name__)
def test_switches(scenario) -> None:
    code = f"import test_torch_switches as t; t.{scenario.__name__}(); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, text=True, capture_output=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
