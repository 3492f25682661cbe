"""The process-wide torch switches that choose which kernels compute, carried from the process that submits a job
to the workers that run it.

ComfyUI sets some of them from its command line (--deterministic, --fast fp16_accumulation / autotune) and any node
may set others, while a worker imports ComfyUI with default arguments: without carrying them, stock ComfyUI and
the pool would compute one graph with different kernels (oneDNN or PyTorch's own convolution, TF32 or fp32
matmuls, cuDNN autotuning, deterministic algorithms) and differ by more than the parallel methods do.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


def _attribute(namespace: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(namespace, name)), (lambda value: setattr(namespace, name, value))


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _set_deterministic(value: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(value[0], warn_only=value[1])


_cuda = torch.backends.cuda
_SWITCHES: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "mkldnn.enabled": _attribute(torch.backends.mkldnn, "enabled"),
    "cudnn.enabled": _attribute(torch.backends.cudnn, "enabled"),
    "cudnn.benchmark": _attribute(torch.backends.cudnn, "benchmark"),
    "cudnn.deterministic": _attribute(torch.backends.cudnn, "deterministic"),
}
if hasattr(_cuda.matmul, "fp32_precision"):
    # torch >= 2.9 keeps fp32 precision (TF32 or IEEE) per backend and op; once a process sets it this way, reading
    # it through the older calls below raises, so only this form travels. Parents before children: "none" inherits.
    for _path in ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"):
        _namespace = torch.backends
        for _part in filter(None, _path.split(".")):
            _namespace = getattr(_namespace, _part)
        _SWITCHES[f"{_path}.fp32_precision".lstrip(".")] = _attribute(_namespace, "fp32_precision")
else:
    _SWITCHES.update({
        "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
        "cuda.matmul.allow_tf32": _attribute(_cuda.matmul, "allow_tf32"),  # after the precision, which also moves it
        "cudnn.allow_tf32": _attribute(torch.backends.cudnn, "allow_tf32"),
    })
_SWITCHES.update({
    "cuda.matmul.allow_fp16_reduced_precision_reduction": _attribute(_cuda.matmul, "allow_fp16_reduced_precision_reduction"),
    "cuda.matmul.allow_bf16_reduced_precision_reduction": _attribute(_cuda.matmul, "allow_bf16_reduced_precision_reduction"),
    "cuda.matmul.allow_fp16_accumulation": _attribute(_cuda.matmul, "allow_fp16_accumulation"),
    "cuda.flash_sdp": (_cuda.flash_sdp_enabled, _cuda.enable_flash_sdp),
    "cuda.mem_efficient_sdp": (_cuda.mem_efficient_sdp_enabled, _cuda.enable_mem_efficient_sdp),
    "cuda.math_sdp": (_cuda.math_sdp_enabled, _cuda.enable_math_sdp),
    "cuda.cudnn_sdp": (_cuda.cudnn_sdp_enabled, _cuda.enable_cudnn_sdp),
    "cuda.fp16_bf16_reduction_math_sdp": (_cuda.fp16_bf16_reduction_math_sdp_allowed, _cuda.allow_fp16_bf16_reduction_math_sdp),
    "deterministic_algorithms": (_deterministic, _set_deterministic),
})


@dataclass(frozen=True)
class TorchSwitches:
    """One process's switches as plain data (name, value), in _SWITCHES' order."""

    values: tuple[tuple[str, Any], ...]

    @classmethod
    def of_this_process(cls) -> TorchSwitches:
        return cls(tuple((name, read()) for name, (read, _) in _SWITCHES.items()))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """This process computes with these switches inside the block and with its own again after it. Only the
        switches that differ are written (a worker of another torch version keeps those it does not know)."""
        changed: list[tuple[str, Any]] = []
        try:
            for name, value in self.values:
                if name not in _SWITCHES:
                    continue
                read, write = _SWITCHES[name]
                before = read()
                if before != value:
                    changed.append((name, before))
                    write(value)
            yield
        finally:
            for name, before in reversed(changed):
                _SWITCHES[name][1](before)
