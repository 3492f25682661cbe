"""What the pool costs around the model: prompt latency, dispatch per prompt and per step, start-up, memory.

Runs a real headless ComfyUI (server_launcher) and prints JSON lines:
- latency: client-side prompt time (POST /prompt to execution_success) of the stock graph and of the XDiT graph
  on a 1-worker pool (same compute, same threads), at two step counts, interleaved; the difference is what the
  pool adds, split into per prompt and per step by the two step counts;
- dispatch: the pool's own view (GET /xdit/status last_job): time from dispatch to results minus time inside the
  workers, per prompt;
- startup: Ray + worker start-up and the first XDiT prompt (which also loads the model), with the pool's own
  breakdown (cold_start: Ray, worker processes, group and imports, loads, first job and step);
- memory: resident memory of the ComfyUI process after a prompt with UNETLoader vs XDiTUNetLoader, each on a
  fresh server, with the bench-size model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from comfyui_xdit.api_client import ComfyClient
from comfyui_xdit.comfy_runtime import import_comfy
from comfyui_xdit.testing.server_launcher import launch_server, prepare_base
from comfyui_xdit.testing.tiny_models import write_tiny_flux


def graph(xdit: bool, unet: str, steps: int, seed: int, pixels: int = 128, world_size: int = 1) -> dict:
    """Loader → ModelSamplingFlux → BasicGuider → sampler → SaveLatent, stock or with the two XDiT nodes."""
    loader_inputs = {"unet_name": unet, "weight_dtype": "default"}
    if xdit:
        loader_inputs["world_size"] = world_size
    return {
        "1": {"class_type": "XDiTUNetLoader" if xdit else "UNETLoader", "inputs": loader_inputs},
        "2": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": pixels, "height": pixels}},
        "3": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, "text_tokens": 7, "context_dim": 64, "pooled_dim": 32}},
        "4": {"class_type": "BasicGuider", "inputs": {"model": ["2", 0], "conditioning": ["3", 0]}},
        "5": {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "simple", "steps": steps, "denoise": 1.0}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": pixels, "height": pixels, "batch_size": 1}},
        "9": {"class_type": "XDiTSamplerCustomAdvanced" if xdit else "SamplerCustomAdvanced",
              "inputs": {"noise": ["7", 0], "guider": ["4", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["8", 0]}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "bench"}},
    }


def _timed(client: ComfyClient, prompt: dict) -> float:
    started = time.perf_counter()
    client.run(prompt, timeout=1800)
    return time.perf_counter() - started


def _server(comfy_dir: Path, root: Path, name: str, models: dict[str, Path]):
    base = prepare_base(root / name)
    for file_name, path in models.items():
        (base / "models" / "diffusion_models" / file_name).symlink_to(path)
    server = launch_server(comfy_dir, base, root / f"{name}.log")
    server.wait_ready()
    return server


def measure_latency(server, steps: tuple[int, int], pairs: int) -> list[dict]:
    client = ComfyClient(server.url)
    started = time.perf_counter()
    client.run(graph(True, "tiny.safetensors", 2, seed=0), timeout=1800)
    first_xdit = time.perf_counter() - started
    pool = server.get_json("/xdit/status")["pool"]
    cold = {key: value for key, value in pool["cold_start"].items() if key != "ranks"}  # where the first prompt went
    lines = [{"metric": "startup", "ray_and_workers_s": pool["startup_s"], "first_xdit_prompt_s": round(first_xdit, 3),
              "world_size": pool["world_size"], "backend": pool["backend"], **cold}]
    client.run(graph(False, "tiny.safetensors", 2, seed=0), timeout=1800)  # stock model loaded too
    seed = 1
    samples: dict[tuple[bool, int], list[float]] = {(x, s): [] for x in (False, True) for s in steps}
    dispatch: list[float] = []
    for _ in range(pairs):
        for n in steps:
            for xdit in (False, True):
                seed += 1  # a new seed re-runs the sampler; the loaders stay cached
                samples[(xdit, n)].append(_timed(client, graph(xdit, "tiny.safetensors", n, seed)))
                if xdit:
                    job = server.get_json("/xdit/status")["pool"]["last_job"]
                    dispatch.append(job["seconds_total"] - job["seconds_in_workers"])
    median = {key: statistics.median(values) for key, values in samples.items()}
    added = {n: median[(True, n)] - median[(False, n)] for n in steps}
    per_step = (added[steps[1]] - added[steps[0]]) / (steps[1] - steps[0])
    per_prompt = added[steps[0]] - per_step * steps[0]
    for n in steps:
        lines.append({"metric": "prompt_latency", "steps": n, "stock_ms": round(median[(False, n)] * 1e3, 1),
                      "xdit_1_worker_ms": round(median[(True, n)] * 1e3, 1), "added_ms": round(added[n] * 1e3, 1),
                      "pairs": pairs, "model": "tiny", "pixels": 128})
    lines.append({"metric": "pool_overhead", "per_prompt_ms": round(per_prompt * 1e3, 1), "per_step_ms": round(per_step * 1e3, 2),
                  "targets_ms": {"per_prompt": 50, "per_step": 2},
                  "pool_dispatch_ms_median": round(statistics.median(dispatch) * 1e3, 1),
                  "note": "per prompt/step from the client-side difference at two step counts; dispatch = pool total minus time inside the workers"})
    return lines


def measure_memory(comfy_dir: Path, root: Path, bench_model: Path) -> dict:
    rss = {}
    for xdit in (False, True):
        server = _server(comfy_dir, root, f"memory_{'xdit' if xdit else 'stock'}", {"bench.safetensors": bench_model})
        try:
            ComfyClient(server.url).run(graph(xdit, "bench.safetensors", 1, seed=0, world_size=2), timeout=1800)
            rss["xdit" if xdit else "stock"] = psutil.Process(server.process.pid).memory_info().rss
        finally:
            server.stop()
    return {"metric": "comfyui_process_memory", "model": "bench", "model_file_bytes": bench_model.stat().st_size,
            "rss_unetloader_bytes": rss["stock"], "rss_xdit_unetloader_bytes": rss["xdit"],
            "saved_bytes": rss["stock"] - rss["xdit"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs=2, default=(2, 22))
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    comfy_dir = import_comfy()
    with tempfile.TemporaryDirectory(prefix="xdit-pool-bench-") as tmp:
        root = Path(tmp)
        tiny = write_tiny_flux(root / "tiny.safetensors", "dev", "tiny", seed=0)
        server = _server(comfy_dir, root, "latency", {"tiny.safetensors": tiny})
        try:
            for line in measure_latency(server, tuple(args.steps), args.pairs):
                print(json.dumps(line), flush=True)
        finally:
            server.stop()
        if not args.skip_memory:
            bench = write_tiny_flux(root / "bench.safetensors", "dev", "bench", seed=0)
            print(json.dumps(measure_memory(comfy_dir, root, bench)), flush=True)


if __name__ == "__main__":
    main()
