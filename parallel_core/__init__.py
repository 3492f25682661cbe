"""Exact hybrid parallelism for diffusion transformers, on torch.distributed alone (no ComfyUI, no Ray).

Public contract: ParallelConfig, ParallelState, init_parallel, usp_attention, split_sequence, gather_sequence,
split_batch, gather_batch, attention_with_lse, CommStats, DimensionGroup.
"""
from .attention_kernels import BACKENDS, attention, attention_with_lse, merge_partials
from .comm import CommStats, DimensionGroup, all_gather, all_to_all, broadcast
from .config import DIMENSIONS, ParallelConfig
from .sharding import gather_batch, gather_sequence, split_batch, split_sequence
from .state import ParallelState, init_parallel, rank_groups
from .usp import usp_attention

__all__ = [
    "BACKENDS",
    "DIMENSIONS",
    "CommStats",
    "DimensionGroup",
    "ParallelConfig",
    "ParallelState",
    "all_gather",
    "all_to_all",
    "attention",
    "broadcast",
    "attention_with_lse",
    "gather_batch",
    "gather_sequence",
    "init_parallel",
    "merge_partials",
    "rank_groups",
    "split_batch",
    "split_sequence",
    "usp_attention",
]
