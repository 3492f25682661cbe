"""The torch switches a job carries to the workers: read from this process, applied around a block, and this
process's own restored after it (ray_backend/torch_switches.py; test_pool_faults.py checks them on real workers)."""
from __future__ import annotations

import pickle

import pytest
import torch

from ray_backend.torch_switches import TorchSwitches

pytestmark = pytest.mark.fast


def test_a_job_computes_with_the_senders_switches_and_the_worker_keeps_its_own():
    own = TorchSwitches.of_this_process()
    assert own.as_dict()["mkldnn.enabled"] is True and own.as_dict()["deterministic_algorithms"] == (False, False)
    # ComfyUI's --deterministic, --fast fp16_accumulation and a node turning oneDNN off, in the sending process:
    torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_fp16_accumulation = True
    torch.set_float32_matmul_precision("high")
    try:
        sent = pickle.loads(pickle.dumps(TorchSwitches.of_this_process()))  # as Ray carries it
    finally:  # this test process as it was, by hand (not by the code under test)
        torch.backends.mkldnn.enabled = True
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.matmul.allow_fp16_accumulation = False
        torch.set_float32_matmul_precision("highest")
    assert TorchSwitches.of_this_process() == own
    with sent.applied():
        assert not torch.backends.mkldnn.enabled
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cuda.matmul.allow_fp16_accumulation
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    assert TorchSwitches.of_this_process() == own


def test_a_switch_this_torch_does_not_know_is_left_alone():
    own = TorchSwitches.of_this_process()
    newer = TorchSwitches(own.values + (("cuda.some_future_switch", True),))
    with newer.applied():
        assert TorchSwitches.of_this_process() == own
