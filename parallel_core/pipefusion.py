"""PipeFusion's plan: which blocks each stage holds and how the image is cut into patches.

A model's blocks are split into `stages` contiguous runs with balanced weight (parameters, a proxy for both memory
and per-token compute), so each stage holds about 1/P of the block parameters. The image is cut along its height
into `patches` bands of whole token rows (the first shortened by the text tokens that travel with it, so every
patch carries about as many tokens); a patch flows through the stages like a micro-batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

# Bands of uneven height are allowed while the tallest is at most this much taller than the shortest: beyond it
# the pipeline's bubbles grow and stale activations cover an uneven share of the image.
MAX_PATCH_IMBALANCE = 0.25


def partition_stages(block_weights: Sequence[int], stages: int) -> list[range]:
    """Contiguous runs of block indices, one per stage, minimising the heaviest stage (ties: earlier stages lighter)."""
    count = len(block_weights)
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"pipefusion_degree must be a whole number >= 1, got {stages!r}")
    if stages > count:
        raise ValueError(f"pipefusion_degree {stages} is more stages than the model's {count} transformer blocks; use at most {count}")
    return min_max_cut([int(w) for w in block_weights], stages, lambda start, stop: True)


def prefix_sums(values: Sequence[int]) -> list[int]:
    sums = [0]
    for value in values:
        sums.append(sums[-1] + value)
    return sums


def min_max_cut(costs: Sequence[int], stages: int, allowed: Callable[[int, int], bool]) -> list[range]:
    """Contiguous runs of block indices minimising the largest summed cost, among cuts whose every run [start, stop)
    has allowed(start, stop) (at least one must). Ties: the last stage starts as late as possible."""
    count = len(costs)
    prefix = prefix_sums(costs)
    # best[k][i]: the lightest possible heaviest stage when blocks [0, i) form k stages; cut[k][i]: where the last starts.
    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(stages + 1)]
    cut = [[0] * (count + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, count - (stages - k) + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or not allowed(j, i):
                    continue
                heaviest = max(best[k - 1][j], prefix[i] - prefix[j])
                if heaviest < best[k][i] or (heaviest == best[k][i] and j > cut[k][i]):
                    best[k][i], cut[k][i] = heaviest, j
    bounds, end = [], count
    for k in range(stages, 0, -1):
        start = cut[k][end]
        bounds.append(range(start, end))
        end = start
    return bounds[::-1]


def patch_bands(rows: int, patches: int, width: int = 1, lead_tokens: int = 0) -> list[tuple[int, int]]:
    """[start, stop) token rows of each patch: `patches` bands as even as possible, taller ones first.

    `lead_tokens` more tokens (the text) travel with the first patch, `width` tokens per row: the first band is then
    shortened (to one row at least) so that every patch holds about as many tokens as the others; a pipeline runs
    at its heaviest patch's pace, and a first patch carrying 256 text tokens beside an even band of a 1024-token
    image would be twice the others."""
    even = _even_bands(rows, patches)
    if not lead_tokens or patches == 1:
        return even
    # Rows of a first band whose patch matches the others' tokens (when the text is not already heavier).
    ideal = max(1, round((rows * width - (patches - 1) * lead_tokens) / (patches * width)))
    for first in range(min(ideal, even[0][1]), even[0][1] + 1):  # the even cut's first band always fits
        try:
            rest = _even_bands(rows - first, patches - 1)
        except ValueError:
            continue
        return [(0, first)] + [(first + top, first + bottom) for top, bottom in rest]
    return even


def _even_bands(rows: int, patches: int) -> list[tuple[int, int]]:
    if not isinstance(patches, int) or patches < 1:
        raise ValueError(f"num_pipeline_patch must be a whole number >= 1, got {patches!r}")
    if patches > rows:
        raise ValueError(f"num_pipeline_patch {patches} is more patches than the latent's {rows} token rows; use at most {rows}")
    base, taller = divmod(rows, patches)
    if taller and (base + 1) / base - 1 > MAX_PATCH_IMBALANCE:
        divisors = [d for d in range(1, rows + 1) if rows % d == 0 and d <= 64]
        raise ValueError(
            f"num_pipeline_patch {patches} cuts {rows} token rows into bands of {base + 1} and {base} rows "
            f"({(base + 1) / base - 1:.0%} uneven, at most {MAX_PATCH_IMBALANCE:.0%} allowed); "
            f"choose a number of patches that divides {rows}: {', '.join(map(str, divisors))}"
        )
    bands, start = [], 0
    for index in range(patches):
        stop = start + base + (1 if index < taller else 0)
        bands.append((start, stop))
        start = stop
    return bands


def band_tokens(bands: Sequence[tuple[int, int]], width: int, lead_tokens: int) -> list[int]:
    """Tokens of each patch: its rows x `width`, plus `lead_tokens` on the first."""
    return [(bottom - top) * width + (lead_tokens if index == 0 else 0) for index, (top, bottom) in enumerate(bands)]


def pipeline_bubble(stages: int, patches: int) -> float:
    """Share of a stage's time spent idle when `patches` equal micro-batches fill and drain `stages` once."""
    return (stages - 1) / (patches + stages - 1)


def pipeline_time(shares: Sequence[float], patches: int | Sequence[float], skip_first: bool = False,
                  ahead: bool = False) -> float:
    """A fill and drain of micro-batches through stages doing `shares` of the work, in units of the whole work on
    one rank. `patches`: a count of equal micro-batches, or each one's share of the work (e.g. band_tokens); a
    stage starts a patch when it has finished the previous one and the previous stage has handed it over.

    PipeFusion's lookahead: `skip_first`, the first stage ran the first patch in the previous call and hands it over
    at once; `ahead`, after its last patch the first stage runs the next call's first patch (once the last stage has
    finished this call's), and the call ends when that is done too."""
    sizes = [1 / patches] * patches if isinstance(patches, int) else [p / sum(patches) for p in patches]
    done = [0.0] * len(shares)  # when each stage finished its latest patch
    first_out = 0.0  # when the last stage finished the first patch
    for index, size in enumerate(sizes):
        ready = 0.0
        for stage, share in enumerate(shares):
            work = 0.0 if skip_first and index == 0 and stage == 0 else share * size
            ready = done[stage] = max(done[stage], ready) + work
        if index == 0:
            first_out = ready
    if ahead:
        return max(done[-1], max(done[0], first_out) + shares[0] * sizes[0])
    return done[-1]


def pipeline_bubbles(shares: Sequence[float], patches: int | Sequence[float], lookahead: bool = False) -> list[float]:
    """Share of the pipeline's time each stage spends idle (pipeline_bubble for equal shares and patches); with
    `lookahead`, in a call between two that look ahead (pipeline_time's skip_first and ahead)."""
    total = pipeline_time(shares, patches, skip_first=lookahead, ahead=lookahead)
    return [1 - share / total for share in shares]
