"""Sequence-parallel attention bench on local CPU gloo ranks: 1 rank vs Ulysses-2 / Ring-2 (and optionally USP 2x2).

    python -m comfyui_xdit.bench.attention [--seqs 4096 8192] [--repeats 3] [--pairs 3] [--block-seqs 1024]

Prints one JSON line per measured configuration (method x variant x seq) on stdout; progress goes to stderr.

Method
- Each method (single, ulysses, ...) runs in its own spawn of `run_on_ranks` with `threads_per_rank` torch threads
  per rank (1 by default), which measures every job (variant x seq) in turn; the 1-rank baseline is world size 1
  through the same launcher and the same `usp_attention` call, so the thread setting and code path are identical
  apart from the parallel degrees.
- Timing happens inside the ranks, so spawn and process-group setup are excluded: after `warmup` calls (plus one
  call that measures bytes on `state.comm`), each of `repeats` calls is timed as barrier -> perf_counter -> call
  -> barrier -> perf_counter (the closing barrier makes it the slowest rank's time); rank 0 reports the median.
- Single runs on the 2-core dev machine drift by up to +-25% from minute to minute, so configurations are
  INTERLEAVED: round k spawns single, ulysses, ring (odd rounds in reverse order, so no method always runs first or
  last), so a method's measurement of a job lies one spawn (tens of seconds) from the baseline's measurement of the
  same job; per-pair ratio = single_ms[k] / method_ms[k]; `speedup_vs_1` is the median of those ratios.
- Variant "attention": `usp_attention` alone (attention-only: flatters sequence parallelism, since on 2 ranks every
  FLOP is split but nothing else is measured). Variant "block": a Flux-like transformer block (QKV projection ->
  usp_attention -> out projection -> 4x GELU MLP, residuals), sequence-sharded like xDiT; its attention FLOP share
  S / (S + 6 * hidden) is reported. The default block shape (hidden 768, 1024 tokens, ~18% attention) is near the
  compute mix of real Flux-dev at 1024^2 (hidden 3072, 4608 tokens, ~20%).
- Flux's real attention shape is 24 heads x 128 head_dim; the defaults use 8 x 64 (attention) so a run finishes in
  a few minutes on 2 CPU cores; every line states the shape it used.
- Bytes: `bytes_per_rank` is what rank 0 recorded on `state.comm` for one call (`bytes_by_rank` lists every rank);
  `theoretical_bytes` follows the method's definition (P = U*R ranks, S/P rows each, heads padded to a multiple
  of U): Ulysses 3*B*(S/P)*H*D*elt*(U-1)/U (q, k, v in) + B*(S/P)*H*D*elt*(U-1)/U (output back);
  Ring (R-1)*2*B*(U*S/P)*(H/U)*D*elt (K/V blocks around the ring).
- `max_abs_err_vs_single`: outputs of every 64th sequence row, gathered from the ranks, against the 1-rank run of
  the same round (same seeded inputs): a cheap check that the parallel run computed the same thing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallel_core as pc
from parallel_core.attention_kernels import select_backend
from parallel_core.local_launch import run_on_ranks

# method -> (ulysses degree, ring degree)
METHODS: dict[str, tuple[int, int]] = {"single": (1, 1), "ulysses": (2, 1), "ring": (1, 2), "usp": (2, 2)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLUX_ATTENTION_SHAPE = "Flux-dev attention is 24 heads x 128 head_dim"
FINGERPRINT_STRIDE = 64


def theoretical_bytes(batch: int, seq: int, heads: int, head_dim: int, elt: int, ulysses: int, ring: int) -> int:
    """Bytes one rank sends in one usp_attention call (no joint tokens), from the method's definition."""
    p = ulysses * ring
    local = -(-seq // p)  # S/P, rounded up: shorter sequences are zero-padded to P equal shards
    padded_heads = -(-heads // ulysses) * ulysses
    total = 0
    if ulysses > 1:
        total += 3 * batch * local * padded_heads * head_dim * elt * (ulysses - 1) // ulysses  # q, k, v in
        total += batch * local * padded_heads * head_dim * elt * (ulysses - 1) // ulysses  # output back
    if ring > 1:
        total += (ring - 1) * 2 * batch * (ulysses * local) * (padded_heads // ulysses) * head_dim * elt  # K/V blocks
    return total


def attention_flop_share(variant: str, seq: int, hidden: int) -> float:
    """Attention's share of the FLOPs measured: 1 for attention-only; S / (S + 6*hidden) for the block.

    Block per token: projections 2*(3h^2 + h^2 + 8h^2) = 24 h^2; attention 4*S*h (QK^T and PV).
    """
    return 1.0 if variant == "attention" else seq / (seq + 6 * hidden)


def _block_weights(hidden: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def w(out_f, in_f):
        return (torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)).to(dtype)

    return {"qkv": w(3 * hidden, hidden), "out": w(hidden, hidden), "mlp_in": w(4 * hidden, hidden), "mlp_out": w(hidden, 4 * hidden)}


def _block(x: torch.Tensor, weights: dict[str, torch.Tensor], state, heads: int, head_dim: int) -> torch.Tensor:
    """Flux-like block on this rank's sequence shard: projections are local, attention is sequence-parallel."""
    b, length, hidden = x.shape
    q, k, v = F.linear(x, weights["qkv"]).view(b, length, 3, heads, head_dim).unbind(2)
    attn = pc.usp_attention(q, k, v, state)
    x = x + F.linear(attn.reshape(b, length, hidden), weights["out"])
    return x + F.linear(F.gelu(F.linear(x, weights["mlp_in"]), approximate="tanh"), weights["mlp_out"])



def time_across_ranks(call, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls, barrier to barrier: the slowest rank's time."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        call()
        dist.barrier()
        times.append((time.perf_counter() - t0) * 1e3)
    return times

def _bench_job(state, job: dict, spec: dict) -> dict:
    """One (variant, seq, shape) on this rank: seeded inputs, warmup, one byte-counted call, `repeats` timed calls."""
    batch, seq, heads, head_dim = spec["batch"], job["seq"], job["heads"], job["head_dim"]
    dtype = DTYPES[spec["dtype"]]
    gen = torch.Generator().manual_seed(spec["seed"])
    hidden = heads * head_dim
    if job["variant"] == "attention":
        q, k, v = (pc.split_sequence(torch.randn(batch, seq, heads, head_dim, generator=gen).to(dtype), state, 1) for _ in range(3))

        def call():
            return pc.usp_attention(q, k, v, state)

        probe = q
    else:
        weights = _block_weights(hidden, dtype, gen)
        x = pc.split_sequence(torch.randn(batch, seq, hidden, generator=gen).to(dtype), state, 1)

        def call():
            return _block(x, weights, state, heads, head_dim)

        probe = x.new_empty(batch, 1, heads, head_dim)

    ring = state.ring.size
    if ring == 1 and spec["backend"] == "auto":
        kernel = "sdpa"  # parallel_core's `attention` uses torch SDPA for a single block
    else:
        kernel = select_backend(spec["backend"], probe) + ("+lse_merge" if ring > 1 else "")
    for _ in range(spec["warmup"]):
        call()
    state.comm.reset()
    out = call()
    sent = state.comm.bytes_sent()
    comm = state.comm.snapshot()

    # Fingerprint: every FINGERPRINT_STRIDE-th global row of this rank's output (padding rows excluded), as plain
    # lists: tensors would travel back as shared-memory handles that die with this process.
    local = out.shape[1]
    offset = state.sequence.rank * local
    rows = [i for i in range(local) if (offset + i) % FINGERPRINT_STRIDE == 0 and offset + i < seq]
    fingerprint = (tuple(offset + i for i in rows), out[:, rows].float().tolist())

    times = time_across_ranks(call, spec["repeats"])
    return {"times_ms": times, "bytes": sent, "comm": comm, "kernel": kernel, "fingerprint": fingerprint}


def _bench_rank(rank: int, world_size: int, spec: dict) -> list[dict]:
    """Every job of the bench on this rank, in order, under one ParallelState (one spawn per method and round)."""
    u, r = spec["degrees"]
    state = pc.init_parallel(pc.ParallelConfig(ulysses_degree=u, ring_degree=r), attention_backend=spec["backend"])
    with torch.inference_mode():
        return [_bench_job(state, job, spec) for job in spec["jobs"]]


def _run_method(method: str, jobs: list[dict], args) -> list[dict]:
    """One spawn of `method`'s ranks measuring every job; returns rank 0's timings and all ranks' bytes, per job."""
    u, r = METHODS[method]
    spec = {
        "degrees": (u, r),
        "jobs": jobs,
        "batch": args.batch,
        "dtype": args.dtype,
        "backend": args.backend,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    load_before = os.getloadavg()[0]
    per_rank = run_on_ranks(_bench_rank, u * r, spec, threads_per_rank=args.threads, timeout_s=args.timeout)
    load = (load_before, os.getloadavg()[0])
    out = []
    for j in range(len(jobs)):
        rows = {}
        for rank_results in per_rank:
            indices, values = rank_results[j]["fingerprint"]
            for index, row in zip(indices, torch.tensor(values).unbind(1)):
                rows[index] = row
        first = per_rank[0][j]
        out.append(
            {
                "median_ms": statistics.median(first["times_ms"]),
                "bytes_by_rank": [rank_results[j]["bytes"] for rank_results in per_rank],
                "comm": first["comm"],
                "kernel": first["kernel"],
                "fingerprint": torch.stack([rows[i] for i in sorted(rows)], dim=1),
                "load": load,
            }
        )
    return out


def _record(method: str, job: dict, runs: list[dict], single_runs: list[dict], args) -> dict:
    """The JSON line of one configuration from its per-round runs and the 1-rank runs of the same rounds."""
    u, r = METHODS[method]
    seq, heads, head_dim, variant = job["seq"], job["heads"], job["head_dim"], job["variant"]
    hidden = heads * head_dim
    elt = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    single_ms = [run["median_ms"] for run in single_runs]
    mine_ms = [run["median_ms"] for run in runs]
    ratios = [s / m for s, m in zip(single_ms, mine_ms)]
    errs = [(run["fingerprint"] - ref["fingerprint"]).abs().max().item() for run, ref in zip(runs, single_runs)]
    theory = theoretical_bytes(args.batch, seq, heads, head_dim, elt, u, r)
    loads = [x for run in runs for x in run["load"]]
    return {
        "method": method,
        "variant": variant,
        "scope": "attention-only (usp_attention)" if variant == "attention" else "block: qkv proj + usp_attention + out proj + 4x GELU MLP",
        "world_size": u * r,
        "degrees": {"ulysses": u, "ring": r},
        "seq": seq,
        "heads": heads,
        "head_dim": head_dim,
        "hidden": hidden,
        "batch": args.batch,
        "dtype": args.dtype,
        "shape_note": f"{heads} heads x {head_dim} head_dim (reduced for CPU run time; {FLUX_ATTENTION_SHAPE})",
        "attention_flop_share": round(attention_flop_share(variant, seq, hidden), 3),
        "kernel": runs[0]["kernel"],
        "threads_per_rank": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "pairs": args.pairs,
        "median_ms": round(statistics.median(mine_ms), 2),
        "per_pair_ms": [round(x, 2) for x in mine_ms],
        "per_pair_single_ms": [round(x, 2) for x in single_ms],
        "per_pair_ratio": [round(x, 3) for x in ratios],
        "speedup_vs_1": round(statistics.median(ratios), 3),
        "bytes_per_rank": runs[0]["bytes_by_rank"][0],
        "bytes_by_rank": runs[0]["bytes_by_rank"],
        "comm_breakdown": runs[0]["comm"],
        "theoretical_bytes": theory,
        "bytes_match": all(b == theory for run in runs for b in run["bytes_by_rank"]),
        "max_abs_err_vs_single": max(errs),
        "loadavg_1m": [round(min(loads), 2), round(max(loads), 2)],
    }


def run_bench(jobs: list[dict], methods: list[str], args) -> list[dict]:
    """Interleaved rounds: round k spawns each method once (odd rounds in reverse order), each measuring all jobs."""
    runs: dict[str, list[list[dict]]] = {m: [] for m in methods}  # method -> round -> job
    for k in range(args.pairs):
        order = methods if k % 2 == 0 else list(reversed(methods))
        for method in order:
            t0 = time.perf_counter()
            runs[method].append(_run_method(method, jobs, args))
            timings = ", ".join(f"{job['variant']}@{job['seq']} {res['median_ms']:.1f} ms" for job, res in zip(jobs, runs[method][-1]))
            print(
                f"[bench] round {k + 1}/{args.pairs} {method}: {timings} "
                f"(spawn+run {time.perf_counter() - t0:.1f} s, load {os.getloadavg()[0]:.2f})",
                file=sys.stderr,
                flush=True,
            )
    return [
        _record(method, job, [rnd[j] for rnd in runs[method]], [rnd[j] for rnd in runs["single"]], args)
        for j, job in enumerate(jobs)
        for method in methods
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit.bench.attention", description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", "--seq", dest="seqs", type=int, nargs="+", default=[4096, 8192], help="attention-only sequence lengths (tokens)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-seqs", type=int, nargs="*", default=[1024], help="block-variant sequence lengths; none to skip")
    parser.add_argument("--block-heads", type=int, default=12)
    parser.add_argument("--block-head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "single"], default=["ulysses", "ring"],
                        help="parallel methods compared with the 1-rank baseline ('usp' = ulysses 2 x ring 2, 4 ranks)")
    parser.add_argument("--backend", choices=pc.BACKENDS, default="auto", help="attention_backend for init_parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (same for every configuration)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per spawn (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per spawn before the byte-count call")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved rounds (single, methods...) per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per spawn")
    args = parser.parse_args(argv)
    if min(args.repeats, args.pairs) < 1 or args.warmup < 0:
        parser.error("--repeats and --pairs must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = ["single", *dict.fromkeys(args.methods)]
    if any(METHODS[m][0] * METHODS[m][1] * args.threads > (os.cpu_count() or 1) for m in methods):
        print(f"[bench] warning: some configurations use more threads than the {os.cpu_count()} CPUs here", file=sys.stderr)
    print(f"[bench] torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    jobs = [{"variant": "attention", "seq": s, "heads": args.heads, "head_dim": args.head_dim} for s in args.seqs]
    jobs += [{"variant": "block", "seq": s, "heads": args.block_heads, "head_dim": args.block_head_dim} for s in args.block_seqs]
    for record in run_bench(jobs, methods, args):
        print(json.dumps(record), flush=True)
    print(f"[bench] done in {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
