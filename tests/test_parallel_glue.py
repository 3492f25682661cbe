"""The family-independent data-parallel wrapper (parallel_glue.py) on real gloo ranks: each rank runs only its rows,
the gathered output is the full call's, and what it cannot split is refused by name."""
from __future__ import annotations

import pytest

import glue_cases
from parallel_core.local_launch import run_on_ranks

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("world_size", [2, 3])
def test_data_wrapper_runs_each_rank_on_its_rows_and_gathers_the_full_output(world_size):
    per_rank = run_on_ranks(glue_cases.data_wrapper_cases, world_size)
    for rank, results in enumerate(per_rank):
        for batch in (1, 2, 3, 5):
            case = results[batch]
            assert case["shape_ok"] and case["error"] == 0.0, (rank, batch, case)
            assert case["rows_seen"] == [-(-batch // world_size)], "each rank computes one padded share, not the batch"
        assert "ControlNet is not supported with data parallel yet; remove the ControlNet apply node or set data_degree to 1" in results["control"]
        assert "set data_degree to 1" in results["list"] and "list-valued model input" in results["list"]
