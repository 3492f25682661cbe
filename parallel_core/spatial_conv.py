"""Exact row-split image networks: each rank holds a band of rows (dim -2) of every activation.

A convolution whose kernel spans k > 1 rows needs k // 2 rows of each neighbour's band (the halo); the first and
last ranks fill theirs with zeros, as the convolution's own zero padding does at the image's true edges. A group
norm gathers each band's mean and variance and combines them in float64 (Chan et al.'s pairwise formula, which
stays exact when the mean is far from zero), then normalises in one pass as torch's kernel does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RowGroup:
    """This rank's place among the ranks that split the rows; `group` None is the default (world) group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def peer(self, group_rank: int) -> int:
        """The global rank of a group member (point-to-point calls take global ranks)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


def split_rows(rows: int, parts: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[start, stop) of each part when `rows` (a multiple of `multiple`) is split as evenly as whole units of
    `multiple` rows allow; the first parts take the extra units. Every part gets at least one unit."""
    if rows % multiple:
        raise ValueError(f"{rows} rows do not split into units of {multiple}")
    units = rows // multiple
    if units < parts:
        raise ValueError(f"{rows} rows give {units} units of {multiple}, fewer than the {parts} parts")
    base, extra = divmod(units, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + (base + (part < extra)) * multiple
        bounds.append((start, stop))
        start = stop
    return bounds


def edge_rows(x: torch.Tensor, top: int, bottom: int, rows: RowGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` rows of the previous rank's band that lie above `x` and the `bottom` rows of the next rank's that
    lie below it (zeros beyond the first and last bands). Every band must hold at least max(top, bottom) rows."""
    if x.shape[-2] < max(top, bottom):
        raise ValueError(f"a band of {x.shape[-2]} rows cannot supply a halo of {max(top, bottom)} rows")
    edge_shape = x.shape[:-2]
    above = x.new_zeros(*edge_shape, top, x.shape[-1])
    below = x.new_zeros(*edge_shape, bottom, x.shape[-1])
    ops = []
    if rows.rank > 0:
        prev = rows.peer(rows.rank - 1)
        if top:
            ops.append(dist.P2POp(dist.irecv, above, prev, rows.group))
        if bottom:
            ops.append(dist.P2POp(dist.isend, x[..., :bottom, :].contiguous(), prev, rows.group))
    if rows.rank < rows.size - 1:
        nxt = rows.peer(rows.rank + 1)
        if top:
            ops.append(dist.P2POp(dist.isend, x[..., -top:, :].contiguous(), nxt, rows.group))
        if bottom:
            ops.append(dist.P2POp(dist.irecv, below, nxt, rows.group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return above, below


def halo_exchange(x: torch.Tensor, top: int, bottom: int, rows: RowGroup) -> torch.Tensor:
    """`x` with edge_rows' halos joined above and below it."""
    if top == 0 and bottom == 0:
        return x
    above, below = edge_rows(x, top, bottom, rows)
    return torch.cat([above, x, below], dim=-2)


def _row_counts(x: torch.Tensor, rows: RowGroup) -> list[int]:
    mine = torch.tensor([x.shape[-2]], dtype=torch.int64, device=x.device)
    counts = [torch.zeros_like(mine) for _ in range(rows.size)]
    dist.all_gather(counts, mine, group=rows.group)
    return [int(c.item()) for c in counts]


def _padded_bands(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    missing = max(counts) - x.shape[-2]
    if missing == 0:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(*x.shape[:-2], missing, x.shape[-1])], dim=-2)


def all_gather_rows(x: torch.Tensor, rows: RowGroup) -> torch.Tensor:
    """Every band joined in rank order, on every rank."""
    counts = _row_counts(x, rows)
    padded = _padded_bands(x, counts)
    bands = [torch.empty_like(padded) for _ in range(rows.size)]
    dist.all_gather(bands, padded, group=rows.group)
    return torch.cat([band[..., :count, :] for band, count in zip(bands, counts)], dim=-2)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, rows: RowGroup) -> torch.Tensor:
    """torch.nn.functional.group_norm of the whole image, computed on this rank's band of `x` (N, C, rows, W)."""
    batch, channels = x.shape[:2]
    per_sample = x[0].numel() if batch else 0
    # Each band's own mean and variance from torch's group-norm kernel itself (fast and as accurate as the stock
    # statistics; its normalised output is dropped): eps 0 makes rstd exactly 1 / std.
    normed, mean, rstd = torch.native_group_norm(x, None, None, batch, channels, per_sample // channels, num_groups, 0.0)
    del normed  # freed before the output is allocated: peak memory as the stock norm's
    var = rstd.to(torch.float64).pow(-2)
    count = torch.full(mean.shape, per_sample // num_groups, dtype=torch.float64, device=x.device)
    mine = torch.stack([count, mean.to(torch.float64), var])
    bands = [torch.empty_like(mine) for _ in range(rows.size)]
    dist.all_gather(bands, mine, group=rows.group)
    counts, means, variances = torch.stack(bands).unbind(1)  # each (bands, N, groups)
    total = counts.sum(0)
    mean64 = (counts * means).sum(0) / total
    var64 = (counts * (variances + (means - mean64) ** 2)).sum(0) / total
    # Normalise in one pass with those statistics per channel: batch norm's inference kernel applies
    # x * (rstd * gamma) + (beta - mean * rstd * gamma), as torch's group norm does (samples become channels).
    per_group = channels // num_groups
    mean_c = mean64.repeat_interleave(per_group, dim=1).reshape(-1).to(x.dtype)
    var_c = var64.repeat_interleave(per_group, dim=1).reshape(-1).to(x.dtype)
    weight_c = None if weight is None else weight.to(x.dtype).repeat(batch)
    bias_c = None if bias is None else bias.to(x.dtype).repeat(batch)
    out = torch.nn.functional.batch_norm(x.reshape(1, batch * channels, *x.shape[2:]), mean_c, var_c, weight_c, bias_c,
                                         training=False, momentum=0.0, eps=eps)
    return out.reshape(x.shape)
