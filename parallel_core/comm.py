"""Collectives over one parallel dimension, each recording the bytes this rank sends.

Byte counts are the payload this rank must deliver to its peers (what a bandwidth-optimal algorithm moves):
all-to-all sends (g-1)/g of its input, all-gather sends its shard to g-1 peers, a ring step sends one block.

Each transfer and each wait runs inside a profiler range named TRACE_PREFIX + the collective: gloo blocks in
Work.wait(), which the profiler records as no op of its own, so without the range a rank's time waiting for its
peers would look like its caller's work (bench/profile_categories.py counts the ranges as collectives).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TRACE_PREFIX = "xdit.comm/"


def _traced(op: str) -> torch.profiler.record_function:
    return torch.profiler.record_function(TRACE_PREFIX + op)


@dataclass(frozen=True)
class DimensionGroup:
    """This rank's view of one parallel dimension: its position, the size, and the process group.

    `group` is None when the dimension has one rank (no communication happens then). `ranks` lists the global
    ranks of the group in group-rank order.
    """

    name: str
    rank: int
    size: int
    ranks: tuple[int, ...]
    group: dist.ProcessGroup | None = None

    def global_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank % self.size]


@dataclass
class CommStats:
    """Bytes sent and calls made by this rank, per (collective, dimension)."""

    bytes_by_key: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls_by_key: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    wait_s_by_key: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    # Not traced by torch.compile (TorchCompileModel on the pool): dynamo would guard on the running totals and
    # recompile the model on every call.
    @torch.compiler.disable
    def record(self, op: str, dimension: str, nbytes: int) -> None:
        self.bytes_by_key[(op, dimension)] += int(nbytes)
        self.calls_by_key[(op, dimension)] += 1

    @torch.compiler.disable
    def record_wait(self, op: str, dimension: str, seconds: float) -> None:
        """Time spent blocked waiting for another rank (a pipeline's bubbles)."""
        self.wait_s_by_key[(op, dimension)] += seconds

    def waited_s(self, dimension: str | None = None) -> float:
        return sum(s for (_, d), s in self.wait_s_by_key.items() if dimension is None or d == dimension)

    def bytes_sent(self, op: str | None = None, dimension: str | None = None) -> int:
        """Total bytes sent, optionally only for one collective and/or one dimension."""
        return sum(
            n for (o, d), n in self.bytes_by_key.items() if (op is None or o == op) and (dimension is None or d == dimension)
        )

    def snapshot(self) -> dict[str, int]:
        """{'op/dimension': bytes} for JSON reports."""
        return {f"{o}/{d}": n for (o, d), n in sorted(self.bytes_by_key.items())}

    def reset(self) -> None:
        self.bytes_by_key.clear()
        self.calls_by_key.clear()
        self.wait_s_by_key.clear()


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, dim_group: DimensionGroup, stats: CommStats) -> torch.Tensor:
    """Scatter `x` in equal chunks along `scatter_dim` to the group's ranks, gather theirs along `gather_dim`.

    The size of `scatter_dim` must divide by the group size (callers pad).
    """
    size = dim_group.size
    if size == 1:
        return x
    if x.shape[scatter_dim] % size:
        raise ValueError(f"all_to_all over {dim_group.name}: dim {scatter_dim} of size {x.shape[scatter_dim]} does not divide by {size}")
    send = torch.stack(torch.chunk(x, size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    with _traced("all_to_all"):
        dist.all_to_all_single(recv, send, group=dim_group.group)
    stats.record("all_to_all", dim_group.name, _nbytes(send) * (size - 1) // size)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def sequence_to_heads(tensors: list[torch.Tensor], padded_heads: int, dim_group: DimensionGroup,
                      stats: CommStats) -> torch.Tensor:
    """Ulysses' forward exchange for several (batch, seq_local, heads, head_dim) tensors in one collective: every rank
    gets all ranks' rows for its `padded_heads / size` heads (heads past the real ones are zero), as one
    (n, batch, size * seq_local, padded_heads / size, head_dim) view, rows in group-rank order (rank-major: each
    rank's seq_local rows in turn, whatever sequences they hold pieces of).

    Memory and copies: the inputs are copied once into the send buffer (between two ranks the rank's own heads
    into the receive buffer), laid out (rank, row, batch, tensor, head, dim) so that the receive buffer is
    already the result (a strided view, no copy after the exchange); the send buffer is released after it: two
    copies of the inputs at most besides them."""
    size, n = dim_group.size, len(tensors)
    batch, rows, heads, head_dim = tensors[0].shape
    per_rank = padded_heads // size
    allocate = torch.empty if padded_heads == heads else torch.zeros
    send = allocate(size, rows, batch, n, per_rank, head_dim, dtype=tensors[0].dtype, device=tensors[0].device)
    recv = send if size == 1 else allocate(send.shape, dtype=send.dtype, device=send.device)
    for index, tensor in enumerate(tensors):
        for rank in range(size):
            first, last = rank * per_rank, min((rank + 1) * per_rank, heads)
            if last > first:
                # Between two ranks the own heads go straight to where they are received (_exchange).
                target = recv if size == 2 and rank == dim_group.rank else send
                target[rank, :, :, index, :last - first].copy_(tensor[:, :, first:last].transpose(0, 1))
    if size > 1:
        _exchange(recv, send, dim_group)
        stats.record("all_to_all", dim_group.name, _nbytes(send) * (size - 1) // size)
        del send
    return recv.view(size * rows, batch, n, per_rank, head_dim).permute(2, 1, 0, 3, 4)


def _exchange(recv: torch.Tensor, send: torch.Tensor, dim_group: DimensionGroup) -> None:
    """All-to-all of (size, ...) chunks: recv[r] = rank r's send[own rank]. Between two ranks it is one pairwise
    exchange and the caller has already put its own chunk in recv: on gloo, all_to_all_single took 14-23% longer
    for Ulysses' q, k, v (it also copies the own chunk); at 4 ranks pairwise sends measured slower, so the
    collective stays there."""
    with _traced("all_to_all"):
        if dim_group.size != 2:
            dist.all_to_all_single(recv, send, group=dim_group.group)
            return
        peer = 1 - dim_group.rank
        ops = [dist.P2POp(dist.isend, send[peer], dim_group.global_rank(peer), group=dim_group.group),
               dist.P2POp(dist.irecv, recv[peer], dim_group.global_rank(peer), group=dim_group.group)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def heads_to_sequence(x: torch.Tensor, heads: int, dim_group: DimensionGroup, stats: CommStats) -> torch.Tensor:
    """Inverse of sequence_to_heads: x (batch, size * seq_local, heads_here, head_dim), rows rank-major, for this
    rank's heads -> (batch, seq_local, heads, head_dim), this rank's rows of every head (the first `heads` of the
    padded ones). One copy into the send buffer, one out of the receive buffer."""
    size = dim_group.size
    if size == 1:
        return x[:, :, :heads]
    batch, total, per_rank, head_dim = x.shape
    send = x.unflatten(1, (size, total // size)).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    with _traced("all_to_all"):
        dist.all_to_all_single(recv, send, group=dim_group.group)
    stats.record("all_to_all", dim_group.name, _nbytes(send) * (size - 1) // size)
    del send
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, total // size, size * per_rank, head_dim)[:, :, :heads]


def all_gather(x: torch.Tensor, dim: int, dim_group: DimensionGroup, stats: CommStats) -> torch.Tensor:
    """Concatenate every rank's `x` (all the same shape) along `dim`, in group-rank order."""
    size = dim_group.size
    if size == 1:
        return x
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(size)]
    with _traced("all_gather"):
        dist.all_gather(pieces, x, group=dim_group.group)
    stats.record("all_gather", dim_group.name, _nbytes(x) * (size - 1))
    return torch.cat(pieces, dim=dim)


def broadcast(x: torch.Tensor, src: int, dim_group: DimensionGroup, stats: CommStats) -> torch.Tensor:
    """Group rank `src`'s `x` on every rank of the group (receivers pass a tensor of the same shape and dtype)."""
    if dim_group.size == 1:
        return x
    x = x.contiguous()
    with _traced("broadcast"):
        dist.broadcast(x, src=dim_group.global_rank(src), group=dim_group.group)
    if dim_group.rank == src:
        stats.record("broadcast", dim_group.name, _nbytes(x) * (dim_group.size - 1))
    return x


class RingShift:
    """One non-blocking step of a ring: send a tensor to the next rank while receiving the previous rank's.

    Start it before computing on the current block and `wait()` after, so the transfer overlaps compute.
    """

    def __init__(self, x: torch.Tensor, dim_group: DimensionGroup, stats: CommStats):
        x = x.contiguous()
        self._received = torch.empty_like(x)
        nxt = dim_group.global_rank(dim_group.rank + 1)
        prev = dim_group.global_rank(dim_group.rank - 1)
        ops = [
            dist.P2POp(dist.isend, x, nxt, group=dim_group.group),
            dist.P2POp(dist.irecv, self._received, prev, group=dim_group.group),
        ]
        with _traced("ring_send"):
            self._requests = dist.batch_isend_irecv(ops)
        stats.record("ring_send", dim_group.name, _nbytes(x))

    def wait(self) -> torch.Tensor:
        with _traced("ring_send_wait"):
            for request in self._requests:
                request.wait()
        return self._received


class PendingGather:
    """An all-gather started now and collected later (`wait()`), so the transfer overlaps compute."""

    def __init__(self, x: torch.Tensor, dim: int, dim_group: DimensionGroup, stats: CommStats):
        x = x.contiguous()
        self._dim = dim
        self._pieces = [torch.empty_like(x) for _ in range(dim_group.size)]
        with _traced("all_gather"):
            self._work = dist.all_gather(self._pieces, x, group=dim_group.group, async_op=True)
        stats.record("all_gather_async", dim_group.name, _nbytes(x) * (dim_group.size - 1))

    def wait(self) -> torch.Tensor:
        with _traced("all_gather_wait"):
            self._work.wait()
        return torch.cat(self._pieces, dim=self._dim)


class PendingGatherInto:
    """An all-gather of equal pieces into the consecutive parts of one flat buffer, started now and collected later
    (`wait()` returns the buffer), so the transfer overlaps compute and nothing is concatenated afterwards."""

    def __init__(self, out: torch.Tensor, x: torch.Tensor, dim_group: DimensionGroup, stats: CommStats):
        if out.numel() != x.numel() * dim_group.size:
            raise ValueError(f"gather over {dim_group.name}: {dim_group.size} pieces of {x.numel()} do not fill {out.numel()}")
        self._out = out
        with _traced("all_gather"):
            self._work = dist.all_gather(list(out.chunk(dim_group.size)), x.contiguous(), group=dim_group.group, async_op=True)
        stats.record("all_gather", dim_group.name, _nbytes(x) * (dim_group.size - 1))

    def wait(self) -> torch.Tensor:
        with _traced("all_gather_wait"):
            self._work.wait()
        return self._out


def send_async(x: torch.Tensor, to_group_rank: int, dim_group: DimensionGroup, stats: CommStats) -> dist.Work:
    """Start sending `x` to one rank of the group; wait on the returned Work before reusing `x`."""
    x = x.contiguous()
    stats.record("send", dim_group.name, _nbytes(x))
    with _traced("send"):
        return dist.isend(x, dim_group.global_rank(to_group_rank), group=dim_group.group)


def recv(like: torch.Tensor, from_group_rank: int, dim_group: DimensionGroup, stats: CommStats) -> torch.Tensor:
    """Receive a tensor of `like`'s shape and dtype from one rank of the group (blocking; the wait is recorded)."""
    received = torch.empty_like(like, memory_format=torch.contiguous_format)
    started = time.perf_counter()
    with _traced("recv"):
        dist.recv(received, dim_group.global_rank(from_group_rank), group=dim_group.group)
    stats.record_wait("recv", dim_group.name, time.perf_counter() - started)
    return received
