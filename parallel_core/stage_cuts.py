"""Where PipeFusion cuts a model's blocks into stages: by memory (block parameters), by modelled compute, or by
compute within the memory goal's slack.

A pipeline runs as fast as its slowest stage, so stages should do equal work; each stage also holds only its own
blocks' weights, so they should hold equal parameters. The two differ when blocks hold weights that cost little
compute per token (Flux's double blocks: a third of their weights modulate one vector per sample). A block's
compute is modelled from its linear layers' shapes at the token count each one sees, plus its attention's
multiply-adds at the job's token counts (`block_flops`); `cut_stages` balances either under a cap on parameters.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .pipefusion import min_max_cut, partition_stages, prefix_sums

# Which tokens a linear layer runs on: the image's, the text's, both ("all", a joint stream), or one per sample
# ("one": modulation of the timestep/pooled vector).
Stream = Literal["image", "text", "all", "one"]
STREAMS: tuple[str, ...] = ("image", "text", "all", "one")
# How a block's attention sees the tokens: one joint attention over [text, image] ("joint"), image self-attention
# plus image-to-text cross-attention ("cross"), or image self-attention only ("image").
AttentionKind = Literal["joint", "cross", "image"]
ATTENTION_KINDS: tuple[str, ...] = ("joint", "cross", "image")

# The memory goal: no stage holds more than 1/P of the block parameters plus this share of them.
MEMORY_SLACK = 0.05
# memory: equal parameters (least memory per rank); balanced: equal compute while each stage keeps within the
# memory goal's slack; speed: equal compute whatever each stage holds.
BALANCES: tuple[str, ...] = ("balanced", "memory", "speed")
DEFAULT_BALANCE = "balanced"


@dataclass(frozen=True)
class Tokens:
    """Token counts of one sample of a job."""

    image: int
    text: int

    def of(self, stream: str) -> int:
        if stream == "image":
            return self.image
        if stream == "text":
            return self.text
        if stream == "all":
            return self.image + self.text
        if stream == "one":
            return 1
        raise ValueError(f"unknown token stream {stream!r}; expected one of {', '.join(STREAMS)}")


@dataclass(frozen=True)
class BlockProfile:
    """What a block's modelled compute and memory come from: its parameters, the multiply-adds per token of its
    linear layers by the stream each runs on, and its attention (kind and width = heads x head dim)."""

    parameters: int
    linear_macs: tuple[tuple[str, int], ...]  # (stream, multiply-adds per token of that stream)
    attention: str = "joint"
    attention_width: int = 0  # 0: no attention


def block_flops(profile: BlockProfile, tokens: Tokens) -> int:
    """Floating-point operations of one sample through the block: 2 per multiply-add of its linear layers, and
    4 x width per query-key pair of its attention (scores, then the weighted sum of values)."""
    linear = sum(2 * macs * tokens.of(stream) for stream, macs in profile.linear_macs)
    image, text = tokens.image, tokens.text
    if profile.attention == "joint":
        pairs = (image + text) ** 2
    elif profile.attention == "cross":
        pairs = image * image + image * text
    elif profile.attention == "image":
        pairs = image * image
    else:
        raise ValueError(f"unknown attention kind {profile.attention!r}; expected one of {', '.join(ATTENTION_KINDS)}")
    return linear + 4 * profile.attention_width * pairs


def parameter_cap(parameters: Sequence[int], stages: int, balance: str) -> float:
    """The most block parameters one stage may hold under `balance`: 1/P + MEMORY_SLACK of them ("balanced"; never
    below what the parameter-balanced cut needs, which blocks of uneven size can push past it), the memory cut's
    heaviest stage ("memory"), or no bound ("speed")."""
    if balance == "speed":
        return float("inf")
    memory_cut = max(sum(parameters[i] for i in stage) for stage in partition_stages(parameters, stages))
    if balance == "memory":
        return memory_cut
    return max(memory_cut, (1 / stages + MEMORY_SLACK) * sum(parameters))


def cut_stages(parameters: Sequence[int], flops: Sequence[int], stages: int, balance: str = DEFAULT_BALANCE) -> list[range]:
    """Contiguous runs of block indices, one per stage. "memory": the fewest parameters on the fullest stage
    (partition_stages). "balanced" / "speed": the least modelled compute on the busiest stage with each stage's
    parameters under parameter_cap; among those cuts, the fewest parameters on the fullest stage."""
    if balance not in BALANCES:
        raise ValueError(f"pipefusion_balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if len(parameters) != len(flops):
        raise ValueError(f"{len(parameters)} blocks' parameters but {len(flops)} blocks' compute")
    if any(int(p) < 0 for p in parameters) or any(int(f) < 0 for f in flops):
        raise ValueError("block parameters and compute must be >= 0")
    params, work = [int(p) for p in parameters], [int(f) for f in flops]
    memory = partition_stages(params, stages)  # also refuses bad stage counts
    if balance == "memory":
        return memory
    param_sums, work_sums = prefix_sums(params), prefix_sums(work)
    cap = parameter_cap(params, stages, balance)
    # The cap admits the memory cut, so both searches find a cut.
    fastest = min_max_cut(work, stages, lambda j, i: param_sums[i] - param_sums[j] <= cap)
    busiest = max(work_sums[stage.stop] - work_sums[stage.start] for stage in fastest)
    return min_max_cut(params, stages, lambda j, i: param_sums[i] - param_sums[j] <= cap and work_sums[i] - work_sums[j] <= busiest)


def stage_shares(plan: Sequence[range], weights: Sequence[int]) -> list[float]:
    """Each stage's share of the summed `weights` (parameters or compute)."""
    total = sum(weights) or 1
    return [sum(weights[i] for i in stage) / total for stage in plan]
