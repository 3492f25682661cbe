"""The redundancy analysis as a file and a figure, and the cache schedule chosen from it (ComfyUI process side;
the measuring and the reuse run on the workers, block_cache.py).

An analysis names its model by file name, size and a hash of the safetensors header (which lists every tensor's
name, dtype, shape and offset), so a schedule is never made from another model's measurements. Analyses are
listed from ComfyUI's output and input folders by name only: a workflow (untrusted) picks one from the list and
never gives a path.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Any

import numpy
import torch

from .errors import UnsupportedByXDiT

FORMAT = "comfyui-xdit.redundancy-analysis"
FILE_PREFIX = "xdit_analysis_"
SOURCES = ("output", "input")  # ComfyUI folders analyses are listed from, as "<folder>/<file name>"


def model_identity(path: str) -> dict[str, Any]:
    """The model file as the analysis names it: file name, size and the sha256 of its safetensors header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = f.read(min(length, 100 * 2**20))
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "header_sha256": hashlib.sha256(header).hexdigest()}


def describe_model(identity: dict[str, Any]) -> str:
    return f"{identity['file']} ({identity['bytes']} bytes, header {identity['header_sha256'][:12]})"


def refuse_foreign(analysis: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise, naming both models, if `analysis` was measured on another model than `identity`."""
    if analysis["model"] != identity:
        raise UnsupportedByXDiT(f"XDiTCacheSchedule: the analysis was made for {describe_model(analysis['model'])}, not for the "
                                f"loaded model {describe_model(identity)}; run XDiTRedundancyAnalysis on this model and choose its file")


def _folder(source: str) -> str:
    import folder_paths

    return folder_paths.get_output_directory() if source == "output" else folder_paths.get_input_directory()


def analysis_files() -> list[str]:
    """Saved analyses, as "<output|input>/<file name>", newest name last within each folder."""
    names = []
    for source in SOURCES:
        folder = _folder(source)
        if os.path.isdir(folder):
            names += [f"{source}/{n}" for n in sorted(os.listdir(folder)) if n.startswith(FILE_PREFIX) and n.endswith(".json")]
    return names


def load_analysis(choice: str) -> dict[str, Any]:
    """The analysis listed as `choice` (one of analysis_files(); anything else is refused)."""
    if choice not in analysis_files():
        raise UnsupportedByXDiT(f"XDiTCacheSchedule: no saved analysis {choice!r}; choose one of the listed files (run XDiTRedundancyAnalysis to make one)")
    source, name = choice.split("/", 1)
    with open(os.path.join(_folder(source), name), encoding="utf-8") as f:
        analysis = json.load(f)
    if not isinstance(analysis, dict) or analysis.get("format") != FORMAT:
        raise UnsupportedByXDiT(f"XDiTCacheSchedule: {choice} is not an XDiT redundancy analysis")
    return analysis


def _stem(identity: dict[str, Any]) -> str:
    stem = os.path.splitext(identity["file"])[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]


def save_analysis(analysis: dict[str, Any]) -> str:
    """Write `analysis` to ComfyUI's output folder as xdit_analysis_<model>_<counter>.json; returns its listed name."""
    folder = _folder("output")
    os.makedirs(folder, exist_ok=True)
    prefix = f"{FILE_PREFIX}{_stem(analysis['model'])}_"
    taken = [n[len(prefix):-len(".json")] for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".json")]
    counter = max((int(t) for t in taken if t.isdigit()), default=0) + 1
    name = f"{prefix}{counter:05d}.json"
    with open(os.path.join(folder, name), "x", encoding="utf-8") as f:
        json.dump(analysis, f)
    return f"output/{name}"


# --- the figure ---------------------------------------------------------------------------------------------------

# Colours from low to high change (a perceptual ramp, dark violet to yellow); rows without a previous step are grey.
_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
NO_DATA = (128, 128, 128)
MARGIN, CURVE_HEIGHT = 40, 120


def colour(value: float) -> tuple[int, int, int]:
    """The ramp's colour at `value` in [0, 1]."""
    position = min(max(value, 0.0), 1.0) * (len(_RAMP) - 1)
    low = min(int(position), len(_RAMP) - 2)
    t = position - low
    return tuple(round(a + (b - a) * t) for a, b in zip(_RAMP[low], _RAMP[low + 1]))


def cell_size(analysis: dict[str, Any]) -> tuple[int, int]:
    return max(4, 480 // max(1, len(analysis["blocks"]))), max(6, 240 // max(1, analysis["steps"]))


def cell_centre(analysis: dict[str, Any], step: int, block: int) -> tuple[int, int]:
    """Pixel (x, y) at the middle of the heatmap cell of `step` (row) and `block` (column)."""
    w, h = cell_size(analysis)
    return MARGIN + block * w + w // 2, MARGIN + step * h + h // 2


def step_change(analysis: dict[str, Any]) -> list[float | None]:
    """Each step's output change over all blocks (summed |diff| over summed |prev|)."""
    diff, prev = analysis["sums"]["output_diff"], analysis["sums"]["output_prev"]
    return [None if row is None else sum(diff[s]) / max(sum(prev[s]), 1e-300) for s, row in enumerate(analysis["output_change"])]


def render(analysis: dict[str, Any]) -> torch.Tensor:
    """An IMAGE (1, H, W, 3): the output change of every block (columns) at every step (rows), on a scale from 0
    to the largest change measured, and below it each step's change over the whole model."""
    from PIL import Image, ImageDraw

    changes = analysis["output_change"]
    blocks, steps = len(analysis["blocks"]), analysis["steps"]
    w, h = cell_size(analysis)
    width, top = 2 * MARGIN + blocks * w, MARGIN + steps * h
    image = Image.new("RGB", (max(width, 320), top + 2 * MARGIN + CURVE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    peak = max((v for row in changes if row for v in row if math.isfinite(v)), default=0.0) or 1.0
    for step, row in enumerate(changes):
        for block in range(blocks):
            fill = NO_DATA if row is None else colour(row[block] / peak)
            x, y = MARGIN + block * w, MARGIN + step * h
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=fill)
    draw.text((MARGIN, 8), f"{analysis['model']['file']}: relative L1 change of each block's output from the step before", fill=(0, 0, 0))
    draw.text((MARGIN, top + 4), f"blocks 0..{blocks - 1} ->   (rows: steps 0..{steps - 1}; colour 0 .. {peak:.3g})", fill=(0, 0, 0))
    curve = step_change(analysis)
    base = top + MARGIN + CURVE_HEIGHT
    top_value = max((v for v in curve if v is not None), default=0.0) or 1.0
    points = [(MARGIN + blocks * w * (s + 0.5) / steps, base - CURVE_HEIGHT * v / top_value) for s, v in enumerate(curve) if v is not None]
    draw.line([(MARGIN, base), (MARGIN + blocks * w, base)], fill=(0, 0, 0))
    if len(points) > 1:
        draw.line(points, fill=(200, 30, 30), width=2)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 30, 30))
    draw.text((MARGIN, base + 4), f"whole model's change per step (peak {top_value:.3g})", fill=(0, 0, 0))
    return torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 255.0).unsqueeze(0)


# --- the schedule -------------------------------------------------------------------------------------------------

def _block_error(costs: list[float | None], skipped: set[int]) -> float:
    """Estimated error one block adds over the steps: at a reused step, the drift of its residual since the step
    it last ran (the sum of the measured steps' residual changes, relative to its output)."""
    error, drift = 0.0, 0.0
    for step, cost in enumerate(costs):
        if step in skipped:
            drift += cost if cost is not None else math.inf
            error += drift
        else:
            drift = 0.0
    return error


def choose_schedule(analysis: dict[str, Any], skip_steps: float, granularity: str, max_error: float = 0.0) -> dict[str, Any]:
    """Which (step, block) evaluations reuse their residual: `skip_steps` steps' worth of block evaluations, picked
    greedily by the least estimated error (whole steps with granularity "steps", single blocks with "blocks"),
    stopping early if the estimate would pass `max_error` (0: no limit). Step 0 always runs (nothing to reuse)."""
    if granularity not in ("steps", "blocks"):
        raise ValueError(f"granularity {granularity!r}: expected 'steps' or 'blocks'")
    steps, blocks = analysis["steps"], len(analysis["blocks"])
    costs = [[None if row is None else row[b] for row in analysis["reuse_error"]] for b in range(blocks)]
    skipped: list[set[int]] = [set() for _ in range(blocks)]
    budget = round(skip_steps * blocks) if granularity == "blocks" else round(skip_steps)
    column_error = [0.0] * blocks

    def deltas(b: int) -> dict[int, float]:  # what reusing block b at each step it still runs would add
        return {s: _block_error(costs[b], skipped[b] | {s}) - column_error[b] for s in range(1, steps) if s not in skipped[b]}

    added = [deltas(b) for b in range(blocks)]  # only the picked blocks' columns change after a pick
    total, picks = 0.0, 0
    while picks < budget:
        if granularity == "steps":
            options = [(sum(added[b][s] for b in range(blocks)), s, tuple(range(blocks))) for s in added[0]]
        else:
            options = [(delta, s, (b,)) for b in range(blocks) for s, delta in added[b].items()]
        options = [o for o in options if math.isfinite(o[0])]
        if not options:
            break
        delta, step, chosen = min(options)
        if max_error > 0 and total + delta > max_error:
            break
        for b in chosen:
            skipped[b].add(step)
            column_error[b] = _block_error(costs[b], skipped[b])
            added[b] = deltas(b)
        total = sum(column_error)
        picks += 1
    reuse: dict[int, list[int]] = {}
    for b in range(blocks):
        for s in skipped[b]:
            reuse.setdefault(s, []).append(b)
    evaluations = sum(len(v) for v in reuse.values())
    return {"steps": steps, "reuse": {s: sorted(reuse[s]) for s in sorted(reuse)}, "model": analysis["model"],
            "blocks": analysis["blocks"], "estimated_error": total, "skipped_evaluations": evaluations,
            "skipped_steps_equivalent": evaluations / max(1, blocks)}


def scheduled_model(model_patcher, path: str, analysis: dict[str, Any], skip_steps: float, granularity: str, max_error: float):
    """A clone of `model_patcher` (loaded from `path`) carrying the schedule chosen from `analysis`, which must have
    been measured on that file and list its blocks."""
    from .block_cache import SCHEDULE_ATTACHMENT, block_names
    from .families import adapter_for

    refuse_foreign(analysis, model_identity(path))
    names = block_names(model_patcher.model.diffusion_model, adapter_for(model_patcher.model).block_containers)
    if analysis["blocks"] != names:
        raise UnsupportedByXDiT(f"XDiTCacheSchedule: the analysis lists blocks {analysis['blocks'][:3]}..., the model {names[:3]}...; analyse the model again")
    patched = model_patcher.clone()
    patched.set_attachments(SCHEDULE_ATTACHMENT, choose_schedule(analysis, skip_steps, granularity, max_error))
    return patched
