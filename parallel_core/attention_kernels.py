"""Local (single-rank) attention kernels, in the (batch, seq, heads, head_dim) layout.

Ring attention merges partial results by their log-sum-exp (LSE), so every backend used on a ring must return a
correct LSE; `math` computes it explicitly and is the reference the others are tested against.

Backends:
- flash_attn:        flash-attn's flash_attn_func (CUDA, fp16/bf16), when the package is installed.
- torch_cuda_flash:  aten._scaled_dot_product_flash_attention (CUDA, fp16/bf16).
- torch_cuda_efficient: aten._scaled_dot_product_efficient_attention (CUDA, any float dtype).
- torch_cpu_flash:   aten._scaled_dot_product_flash_attention_for_cpu (CPU).
- math:              explicit fp32 softmax, any device (slow, exact reference).
- auto:              the first of the above that fits the tensors' device and dtype.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS: tuple[str, ...] = ("auto", "flash_attn", "torch_cuda_flash", "torch_cuda_efficient", "torch_cpu_flash", "math")
_HALF = (torch.float16, torch.bfloat16)


def resolve_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attention backend 'flash_attn' needs the flash-attn package; install it or use 'auto'")
    return name


def select_backend(name: str, q: torch.Tensor) -> str:
    """The concrete backend for `q`'s device and dtype when `name` is 'auto'."""
    name = resolve_backend_name(name)
    if name != "auto":
        return name
    if q.device.type == "cuda":
        if q.dtype in _HALF:
            return "flash_attn" if importlib.util.find_spec("flash_attn") is not None else "torch_cuda_flash"
        return "torch_cuda_efficient"
    if q.device.type == "cpu":
        return "torch_cpu_flash"
    return "math"


def _to_bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _math(q, k, v, causal, scale):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(q.dtype), lse


def _cpu_flash(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), 0.0, causal, scale=scale
    )
    return _to_bhsd(out), lse


def _cuda_flash(q, k, v, causal, scale):
    result = torch.ops.aten._scaled_dot_product_flash_attention(
        _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), 0.0, causal, False, scale=scale
    )
    return _to_bhsd(result[0]), result[1]


def _cuda_efficient(q, k, v, causal, scale):
    result = torch.ops.aten._scaled_dot_product_efficient_attention(
        _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), None, True, 0.0, causal, scale=scale
    )
    # The kernel pads the LSE's sequence dimension (to a multiple of 32); keep the real rows.
    return _to_bhsd(result[0]), result[1][..., : q.shape[1]]


def _flash_attn(q, k, v, causal, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True)
    return out, lse


_WITH_LSE: dict[str, Callable] = {
    "math": _math,
    "torch_cpu_flash": _cpu_flash,
    "torch_cuda_flash": _cuda_flash,
    "torch_cuda_efficient": _cuda_efficient,
    "flash_attn": _flash_attn,
}


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B,Sq,H,D) over k, v (B,Sk,H,D): returns (out (B,Sq,H,D), lse (B,H,Sq) in fp32).

    `causal` masks key j for query i when j > i (top-left aligned; callers only use it on square blocks).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _WITH_LSE[select_backend(backend, q)](q, k, v, causal, scale)
    return out, lse.float()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Attention without LSE (one block: no merge needed). 'auto' uses torch SDPA, as stock ComfyUI does."""
    name = resolve_backend_name(backend)
    if name == "auto":
        out = F.scaled_dot_product_attention(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), is_causal=causal, scale=scale)
        return _to_bhsd(out)
    return attention_with_lse(q, k, v, causal=causal, scale=scale, backend=name)[0]


def merge_partials(partials: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Combine attention results over disjoint key blocks, in the given order, by their LSEs (fp32).

    Folded in one block at a time: the running result moves towards the next block's by that block's share of the
    softmax mass so far (one fused lerp pass over the rows, not a weighted sum of every block)."""
    out, lse = partials[0][0].float(), partials[0][1]
    for part, part_lse in partials[1:]:
        total = torch.logaddexp(lse, part_lse)
        share = torch.exp(part_lse - total).transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1)
        out = torch.lerp(out, part.float(), share)
        lse = total
    return out.to(dtype)
