"""Exact row-split image networks: each rank holds a band of rows (dim -2) of every activation.

A convolution whose kernel spans k > 1 rows needs k // 2 rows of each neighbour's band (the halo); the first and
last ranks fill theirs with zeros, as the convolution's own zero padding does at the image's true edges. A group
norm reduces its statistics over all bands (sum first, then the sum of squared deviations from the global mean,
in float64), then normalises like torch's kernel: x * (rstd * gamma) + (beta - mean * rstd * gamma).
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


def halo_exchange(x: torch.Tensor, top: int, bottom: int, rows: RowGroup) -> torch.Tensor:
    """`x` with `top` rows of the previous rank's band above it and `bottom` rows of the next rank's below it
    (zeros beyond the first and last bands). Every band must hold at least max(top, bottom) rows."""
    if top == 0 and bottom == 0:
        return x
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


def all_gather_rows(x: torch.Tensor, rows: RowGroup) -> tuple[torch.Tensor, int]:
    """Every band joined in rank order, and the first row of this rank's band in it."""
    counts = _row_counts(x, rows)
    padded = _padded_bands(x, counts)
    bands = [torch.empty_like(padded) for _ in range(rows.size)]
    dist.all_gather(bands, padded, group=rows.group)
    whole = torch.cat([band[..., :count, :] for band, count in zip(bands, counts)], dim=-2)
    return whole, sum(counts[:rows.rank])


def gather_rows(x: torch.Tensor, rows: RowGroup, dst: int = 0) -> torch.Tensor | None:
    """Every band joined in rank order on group rank `dst`; None on the others."""
    counts = _row_counts(x, rows)
    padded = _padded_bands(x, counts)
    bands = [torch.empty_like(padded) for _ in range(rows.size)] if rows.rank == dst else None
    dist.gather(padded, bands, dst=rows.peer(dst), group=rows.group)
    if bands is None:
        return None
    return torch.cat([band[..., :count, :] for band, count in zip(bands, counts)], dim=-2)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, rows: RowGroup) -> torch.Tensor:
    """torch.nn.functional.group_norm of the whole image, computed on this rank's band of `x` (N, C, rows, W)."""
    batch, channels = x.shape[:2]
    grouped = x.reshape(batch, num_groups, -1)
    # [sum, count] per (sample, group), reduced over the bands.
    moments = torch.stack([grouped.sum(-1, dtype=torch.float64),
                           torch.full((batch, num_groups), grouped.shape[-1], dtype=torch.float64, device=x.device)])
    dist.all_reduce(moments, group=rows.group)
    count = moments[1]
    mean = moments[0] / count
    deviation = grouped - mean.to(x.dtype).unsqueeze(-1)
    squares = (deviation * deviation).sum(-1, dtype=torch.float64)
    del deviation
    dist.all_reduce(squares, group=rows.group)
    rstd = torch.rsqrt(squares / count + eps)
    per_group = channels // num_groups
    scale = rstd.repeat_interleave(per_group, dim=1)
    if weight is not None:
        scale = scale * weight.to(torch.float64)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if bias is not None:
        shift = shift + bias.to(torch.float64)
    view = (batch, channels) + (1,) * (x.ndim - 2)
    return x * scale.to(x.dtype).view(view) + shift.to(x.dtype).view(view)
