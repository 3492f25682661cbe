"""LoRA on the pool: what a switch costs with exact merge-with-restore, against a cold model load, and what runtime
low-rank deltas (the alternative) cost per step. JSON lines on stdout, progress on stderr.

    python -m comfyui_xdit.bench.lora_switch [--ranks 4 16 64] [--repeats 5] [--threads 1]
    python -m comfyui_xdit.bench.lora_switch --part deltas --shapes flux-dev [--device cuda]   # torch only

Part "pool" (ComfyUI's own code on CPU, one process with `--threads` threads, like one pool worker):
- Model: tiny_models' "bench" Flux (hidden 768, 2 double + 4 single blocks, fp32); LoRAs: kohya files from
  tiny_loras on every block linear layer (what Flux trainers train), ranks `--ranks`.
- `cold_load`: comfy.sd.load_diffusion_model + load_models_gpu, what a worker pays to load a model (the file is in
  the page cache, so a real cold load only costs more). Median of `--repeats`.
- `switch`: MergedLoras.apply on a resident model (what a worker runs before a job): none->A ("add"), A->B
  ("switch", every weight changes), B->B at another strength ("strength"), B->none ("remove"); the LoRA files are
  read and mapped once beforehand (a worker caches them). `comfy_repatch`: the same A->B switch the way stock
  ComfyUI does it (a clone with the other LoRA's patches through load_models_gpu: restore all, re-patch all).
- `step`: ms per sampling step (BasicGuider, euler, `--steps` steps, a `--latent`^2 latent and `--text-tokens`
  text rows) without a LoRA ("base"), with the LoRA merged, and in ComfyUI's runtime-delta mode
  (comfy.sd.load_bypass_lora_for_models: y = Wx + s * up(down(x)) in every forward). Runs are interleaved
  (base, merged, bypass, then the reverse) and an overhead is the median of per-round differences from base.
- `decision`: per rank, break_even_steps = switch ms / bypass overhead ms per step: runtime deltas pay off only for
  images shorter than that between two switches.

Part "deltas" (torch only, any device): the same trade-off from the linear layers alone, at Flux-dev's real shapes
(hidden 3072, 19 double + 38 single blocks, `--image-tokens` 4096 = 1024^2, `--text-tokens` 512) or the bench
model's. Per forward: the base linear layers' time and the extra time of runtime deltas (y + up(down(x)), timed
back to back with the base layer, median of the differences); per switch: the least a merge of every trained layer
does (an fp32 copy of the original, addmm with up @ down, back to the weight dtype; ComfyUI's
patch_weight_to_device, which MergedLoras calls, makes two more full-size temporaries, see part "pool"), with the
original kept on the device or fetched from host memory (where ComfyUI, and MergedLoras, keep it when the model
runs on a GPU).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from comfyui_xdit.testing.tiny_models import FLUX_SIZES

LATENT_CHANNELS = 16
MLP_RATIO = 4


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ms(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def _median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    return statistics.median(_ms(fn, sync) for _ in range(repeats))


def _median_extra_ms(base: Callable[[], object], fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median over rounds of fn's time minus base's, each round timing both back to back."""
    return statistics.median(-_ms(base, sync) + _ms(fn, sync) for _ in range(repeats))


# ------------------------------------------------------------------------------------------------- part: pool
def _sampling(model_patcher, latent: int, text_tokens: int, steps: int) -> Callable[[], torch.Tensor]:
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    def first(output):
        return output.result[0] if hasattr(output, "result") else output[0]

    model = ModelSamplingFlux().patch(model_patcher, 1.15, 0.5, latent * 8, latent * 8)[0]
    gen = torch.Generator().manual_seed(100)
    positive = [[torch.randn(1, text_tokens, 64, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen), "guidance": 3.5}]]
    guider = first(custom.BasicGuider.execute(model, positive))
    sigmas = first(custom.BasicScheduler.execute(model, "simple", steps, 1.0))
    sampler = first(custom.KSamplerSelect.execute("euler"))
    noise = first(custom.RandomNoise.execute(0))
    empty = {"samples": torch.zeros(1, LATENT_CHANNELS, latent, latent)}
    return lambda: first(custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, empty))["samples"]


def run_pool(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="lora_switch_") as folder:
        _run_pool(args, Path(folder))


def _run_pool(args: argparse.Namespace, folder: Path) -> None:
    from comfyui_xdit.comfy_runtime import import_comfy

    import_comfy(cpu=True)
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from comfyui_xdit.job_spec import LoraRef
    from comfyui_xdit.lora_merge import MergedLoras
    from comfyui_xdit.testing.tiny_loras import flux_shapes, write_flux_lora
    from comfyui_xdit.testing.tiny_models import write_tiny_flux

    torch.set_num_threads(args.threads)
    model_path = write_tiny_flux(folder / "bench.safetensors", "dev", "bench", seed=0)
    shapes = flux_shapes(model_path)
    model_info = {"hidden": shapes["img_in.weight"][0], **{k: FLUX_SIZES["bench"][k] for k in ("depth", "depth_single_blocks")},
                  "params_m": round(sum(torch.Size(s).numel() for s in shapes.values()) / 1e6, 1), "dtype": "fp32",
                  "threads": args.threads, "device": "cpu"}

    def cold_load():
        model = comfy.sd.load_diffusion_model(str(model_path))
        mm.load_models_gpu([model])
        return model

    def unload():
        mm.unload_all_models()
        gc.collect()

    loads = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        cold_load()
        loads.append((time.perf_counter() - start) * 1000)
        unload()
    cold_ms = statistics.median(loads)
    _emit({"bench": "lora_switch", "what": "cold_load", "ms": round(cold_ms, 1), "model": model_info})

    resident = cold_load()
    merged = MergedLoras(resident)
    for rank in args.ranks:
        paths = [write_flux_lora(folder / f"{name}-r{rank}.safetensors", shapes, "kohya", rank, seed)
                 for name, seed in (("a", 1), ("b", 2))]
        refs = [LoraRef(str(p), 1.0, (p.stat().st_size, p.stat().st_mtime_ns)) for p in paths]
        a, b = refs
        b_half = LoraRef(b.path, 0.5, b.stamp)
        lora_mb = round(paths[0].stat().st_size / 2**20, 2)
        start = time.perf_counter()
        merged.apply((a,))
        merged.apply((b,))
        _log(f"rank {rank}: files read, mapped and merged once in {time.perf_counter() - start:.2f} s")
        merged.apply(())
        timings: dict[str, list[float]] = {"add": [], "switch": [], "strength": [], "remove": []}
        for _ in range(args.repeats):
            for op, stack in (("add", (a,)), ("switch", (b,)), ("strength", (b_half,)), ("remove", ())):
                start = time.perf_counter()
                merged.apply(stack)
                timings[op].append((time.perf_counter() - start) * 1000)
                if op == "switch":
                    keys = merged.last_keys_changed
        for op, values in timings.items():
            ms = statistics.median(values)
            _emit({"bench": "lora_switch", "what": "switch", "method": "merge_with_restore", "op": op, "rank": rank,
                   "ms": round(ms, 2), "keys_changed": keys if op == "switch" else None, "lora_mb": lora_mb,
                   "vs_cold_load": round(ms / cold_ms, 4)})

        state_dicts = [comfy.utils.load_torch_file(str(p), safe_load=True) for p in paths]
        clones = [comfy.sd.load_lora_for_models(resident, None, sd, 1.0, 0)[0] for sd in state_dicts]
        mm.load_models_gpu([clones[0]])
        repatch = []
        for i in range(args.repeats):
            start = time.perf_counter()
            mm.load_models_gpu([clones[(i + 1) % 2]])
            repatch.append((time.perf_counter() - start) * 1000)
        ms = statistics.median(repatch)
        _emit({"bench": "lora_switch", "what": "switch", "method": "comfy_repatch", "op": "switch", "rank": rank,
               "ms": round(ms, 2), "lora_mb": lora_mb, "vs_cold_load": round(ms / cold_ms, 4)})
        del clones
        mm.load_models_gpu([resident])  # ComfyUI's own patches are restored: the resident model is plain again

        bypass = comfy.sd.load_bypass_lora_for_models(resident, None, state_dicts[0], 1.0, 0)[0]
        run_merged = _sampling(resident, args.latent, args.text_tokens, args.steps)
        run_bypass = _sampling(bypass, args.latent, args.text_tokens, args.steps)
        run_merged()  # warm-up (first-call allocations)
        runs = {"base": ((), run_merged), "merged": ((a,), run_merged), "bypass": ((), run_bypass)}
        per_step: dict[str, list[float]] = {method: [] for method in runs}
        for i in range(args.repeats):
            for method in (list(runs) if i % 2 == 0 else list(reversed(runs))):
                stack, sample = runs[method]
                merged.apply(stack)
                start = time.perf_counter()
                sample()
                per_step[method].append((time.perf_counter() - start) * 1000 / args.steps)
        merged.apply(())
        base = statistics.median(per_step["base"])

        def overhead_vs_base(method: str) -> float:
            return statistics.median([y - x for x, y in zip(per_step["base"], per_step[method])])

        overhead = overhead_vs_base("bypass")
        tokens = {"image_tokens": (args.latent // 2) ** 2, "text_tokens": args.text_tokens}
        _emit({"bench": "lora_switch", "what": "step", "rank": rank, **tokens, "base_ms_per_step": round(base, 1),
               "merged_ms_per_step": round(statistics.median(per_step["merged"]), 1),
               "merged_overhead_ms_per_step": round(overhead_vs_base("merged"), 2),
               "bypass_ms_per_step": round(statistics.median(per_step["bypass"]), 1),
               "bypass_overhead_ms_per_step": round(overhead, 2), "bypass_overhead_pct": round(100 * overhead / base, 2)})
        switch_ms = statistics.median(timings["switch"])
        _emit({"bench": "lora_switch", "what": "decision", "rank": rank, "switch_ms": round(switch_ms, 2),
               "bypass_overhead_ms_per_step": round(overhead, 2),
               "break_even_steps": round(switch_ms / overhead, 2) if overhead > 0 else None})
        del bypass
        unload()
        mm.load_models_gpu([resident])


# ----------------------------------------------------------------------------------------------- part: deltas
def flux_linears(hidden: int, depth: int, single: int, image_tokens: int, text_tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, out, in, tokens, count) of every linear layer a Flux LoRA trains; modulations see one row."""
    h, m = hidden, MLP_RATIO * hidden
    n = image_tokens + text_tokens
    layers = []
    for stream, tokens in (("img", image_tokens), ("txt", text_tokens)):
        layers += [(f"{stream}_attn.qkv", 3 * h, h, tokens, depth), (f"{stream}_attn.proj", h, h, tokens, depth),
                   (f"{stream}_mlp.0", m, h, tokens, depth), (f"{stream}_mlp.2", h, m, tokens, depth),
                   (f"{stream}_mod.lin", 6 * h, h, 1, depth)]
    layers += [("linear1", 3 * h + m, h, n, single), ("linear2", h, h + m, n, single), ("modulation.lin", 3 * h, h, 1, single)]
    return layers


SHAPES = {
    "flux-dev": {"hidden": 3072, "depth": 19, "single": 38},
    "bench": {"hidden": FLUX_SIZES["bench"]["hidden_size"], "depth": FLUX_SIZES["bench"]["depth"],
              "single": FLUX_SIZES["bench"]["depth_single_blocks"]},
}


def run_deltas(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shapes]
    layers = flux_linears(shape["hidden"], shape["depth"], shape["single"], args.image_tokens, args.text_tokens)
    info = {"shapes": args.shapes, **shape, "image_tokens": args.image_tokens, "text_tokens": args.text_tokens,
            "dtype": str(dtype).removeprefix("torch."), "device": torch.cuda.get_device_name() if cuda else "cpu",
            "threads": None if cuda else args.threads}
    base_ms = 0.0
    extra = {rank: 0.0 for rank in args.ranks}
    merge = {rank: {"device_original": 0.0, "host_original": 0.0} for rank in args.ranks}
    for name, out_dim, in_dim, tokens, count in layers:
        weight = torch.randn(out_dim, in_dim, device=device, dtype=dtype) / in_dim ** 0.5
        host = weight.cpu() if cuda else weight.clone()  # pageable, like ComfyUI's (and MergedLoras') backups
        x = torch.randn(tokens, in_dim, device=device, dtype=dtype)
        layer_base = _median_ms(lambda: F.linear(x, weight), args.repeats, sync)
        base_ms += count * layer_base
        for rank in args.ranks:
            down = torch.randn(rank, in_dim, device=device, dtype=dtype) / in_dim ** 0.5
            up = torch.randn(out_dim, rank, device=device, dtype=dtype) * 0.1
            extra[rank] += count * _median_extra_ms(lambda: F.linear(x, weight),
                                                    lambda: F.linear(x, weight) + F.linear(F.linear(x, down), up), args.repeats, sync)
            for where, original in (("device_original", weight), ("host_original", host)):
                def merge_once(original=original):
                    w = original.to(device=device, dtype=torch.float32, copy=True)  # the original stays as it is
                    w.addmm_(up.float(), down.float())
                    return w.to(dtype)
                merge[rank][where] += count * _median_ms(merge_once, args.repeats, sync)
        _log(f"{name} ({out_dim}x{in_dim}, {tokens} tokens) x{count}: base {layer_base:.3f} ms")
        del weight, host, x
    for rank in args.ranks:
        _emit({"bench": "lora_switch", "what": "deltas", **info, "rank": rank, "base_linears_ms_per_forward": round(base_ms, 2),
               "lowrank_extra_ms_per_forward": round(extra[rank], 2),
               "lowrank_extra_pct": round(100 * extra[rank] / base_ms, 2),
               "merge_all_layers_ms": {k: round(v, 1) for k, v in merge[rank].items()},
               "break_even_forwards": {k: round(v / extra[rank], 1) if extra[rank] > 0 else None for k, v in merge[rank].items()}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("pool", "deltas"), default="pool")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (a 2-worker pool on 2 cores: 1)")
    parser.add_argument("--steps", type=int, default=3, help="pool: sampling steps per timed run")
    parser.add_argument("--latent", type=int, default=32, help="pool: latent side (32 = 256 image tokens)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text rows (pool: 64, deltas: 512)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="flux-dev", help="deltas: layer shapes")
    parser.add_argument("--image-tokens", type=int, default=4096, help="deltas: image tokens per forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="deltas: device")
    args = parser.parse_args(argv)
    if args.part == "pool":
        args.text_tokens = args.text_tokens or 64
        run_pool(args)
    else:
        args.text_tokens = args.text_tokens or 512
        run_deltas(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
