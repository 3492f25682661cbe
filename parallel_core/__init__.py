"""Hybrid parallelism for diffusion transformers, on torch.distributed alone (no ComfyUI, no Ray).

Exact: usp_attention (Ulysses x Ring) and usp_segments_attention (several sharded sequences as one), split/gather over sequence, cfg and data. Approximate, with one-step-stale
keys/values: PipeFusion (partition_stages, patch_bands, pipefusion_attention; stages cut by memory or modelled compute: cut_stages) and displaced patch parallel
(displaced_attention), both exact on synchronous steps. Exact row-split image networks (spatial_conv: halo
exchange, group norm over bands, row gathers) for the parallel VAE. Also ParallelConfig, ParallelState, init_parallel,
attention_with_lse, CommStats, DimensionGroup, KVCache.
"""
from .attention_kernels import BACKENDS, attention, attention_with_lse, merge_partials
from .comm import CommStats, DimensionGroup, all_gather, all_to_all, broadcast
from .config import DIMENSIONS, ParallelConfig
from .pipefusion import band_tokens, partition_stages, patch_bands, pipeline_bubble, pipeline_bubbles, pipeline_time
from .sharding import gather_batch, gather_sequence, split_batch, split_sequence
from .spatial_conv import RowGroup, all_gather_rows, edge_rows, group_norm, halo_exchange, split_rows
from .state import ParallelState, init_parallel, rank_groups
from .stage_cuts import BALANCES, DEFAULT_BALANCE, BlockProfile, Tokens, block_flops, cut_stages, stage_shares
from .stale_kv import KVCache, displaced_attention, pipefusion_attention
from .usp import usp_attention, usp_segments_attention

__all__ = [
    "BACKENDS",
    "BALANCES",
    "BlockProfile",
    "DEFAULT_BALANCE",
    "Tokens",
    "block_flops",
    "cut_stages",
    "stage_shares",
    "DIMENSIONS",
    "CommStats",
    "KVCache",
    "DimensionGroup",
    "ParallelConfig",
    "ParallelState",
    "RowGroup",
    "all_gather",
    "all_gather_rows",
    "all_to_all",
    "attention",
    "broadcast",
    "displaced_attention",
    "edge_rows",
    "partition_stages",
    "band_tokens",
    "patch_bands",
    "pipefusion_attention",
    "pipeline_bubble",
    "pipeline_bubbles",
    "pipeline_time",
    "attention_with_lse",
    "gather_batch",
    "gather_sequence",
    "group_norm",
    "halo_exchange",
    "init_parallel",
    "merge_partials",
    "rank_groups",
    "split_batch",
    "split_sequence",
    "split_rows",
    "usp_attention",
    "usp_segments_attention",
]
