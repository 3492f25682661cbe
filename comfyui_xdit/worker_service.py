"""What a pool worker does with a sampling job: keep the model resident, run ComfyUI's sampling on it.

Runs inside a Ray actor (ray_backend.worker.PoolWorker names it by import path). Up to RESIDENT_MODELS models stay
resident per worker (two by default: a Wan 2.2 A14B graph alternates a high-noise and a low-noise expert within every
prompt), keyed by file, dtype and PipeFusion stage and balance (a stage loads only its own blocks, stage_loading.py), and for
weight_sharding "blocks" by the world and rank whose pieces it holds (weight_sharding.py); loading one
more drops the least recently used. Each one's parallel clone is cached per parallel config, so a second prompt on
the same models and degrees loads and builds nothing. A job's LoRA stack is merged into its model before it
runs (lora_merge.py): switching LoRAs changes the weights they touch and loads nothing. A VAE (vae_service.py) stays
resident beside the models and serves VaeJobs.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from parallel_core import ParallelConfig, ParallelState

from .comfy_runtime import init_worker
from .job_spec import PoolVaeRef, VaeJob
from .vae_service import ResidentVae

SERVICE_PATH = "comfyui_xdit.worker_service:SamplingService"
# How many models a worker keeps loaded at once (an operator with little memory per worker sets 1).
RESIDENT_MODELS = int(os.environ.get("XDIT_RESIDENT_MODELS", "2"))


@dataclass
class _Resident:
    base: Any  # the stock ModelPatcher as loaded
    loras: Any  # its MergedLoras
    parallel: dict[ParallelConfig, Any] = field(default_factory=dict)  # its parallel clones


def _import_job_modules() -> None:
    """Import what loading a model and running a job need (comfy.sd pulls in every model class: seconds of CPU).
    The worker builds its service in a thread from its start, so this overlaps the pool's start instead of
    landing in the first model load (and a pool started with ComfyUI has it done before the first prompt)."""
    import comfy.samplers  # noqa: F401
    import comfy.sd  # noqa: F401

    from . import job, lora_merge, parallel_model, stage_loading, weight_sharding  # noqa: F401


class SamplingService:
    def __init__(self, device: str):
        init_worker(cpu=(device == "cpu"))
        _import_job_modules()
        self._resident: OrderedDict[tuple[str, str, int, int, tuple[int, int] | None, str | None], _Resident] = OrderedDict()  # least recently used first
        self._loras = None  # MergedLoras of the model of the last job
        self.model_loads = 0
        self.parallel_builds = 0
        self._vae = ResidentVae()
        self._lookahead: list[int] | None = None  # PipeFusion's lookahead [used, missed] in the last sampling job

    def _model(self, ref, state: ParallelState):
        import comfy.model_management
        import comfy.sd

        from .lora_merge import MergedLoras
        from .parallel_model import parallelize
        from .shell_model import model_options_for
        from .stage_loading import load_stage
        from .weight_sharding import load_sharded, world_group

        stages, stage = state.pipefusion.size, state.pipefusion.rank
        # A sharded model holds this rank's pieces for this world: the world and rank are part of what it is; a
        # stage holds the blocks its balance cut.
        pieces = (state.world_size, state.rank) if ref.weight_sharding == "blocks" else None
        balance = ref.pipefusion_balance if stages > 1 else None
        key = (ref.path, ref.weight_dtype, stages, stage, pieces, balance)
        if key not in self._resident:
            if len(self._resident) >= max(1, RESIDENT_MODELS):
                self._resident.popitem(last=False)
                self._loras = None
                comfy.model_management.unload_all_models()  # the dropped model's memory goes before the next loads
            if pieces is not None:
                base = load_sharded(ref.path, ref.weight_dtype, world_group())
            elif stages > 1:
                base = load_stage(ref.path, ref.weight_dtype, stages, stage, balance)
            else:
                base = comfy.sd.load_diffusion_model(ref.path, model_options=model_options_for(ref.weight_dtype))
            self._resident[key] = _Resident(base, MergedLoras(base))
            self.model_loads += 1
        resident = self._resident[key]
        self._resident.move_to_end(key)
        self._loras = resident.loras
        if state.config not in resident.parallel:
            resident.parallel[state.config] = parallelize(resident.base, state)
            self.parallel_builds += 1
        return resident.parallel[state.config]

    def regroup(self) -> None:
        """The worker joins a process group of another world: parallel models built on the old groups go, the
        resident models (and their merged LoRAs) stay."""
        for resident in self._resident.values():
            resident.parallel.clear()
        for key in [k for k in self._resident if k[4] is not None]:  # sharded pieces are the old world's
            del self._resident[key]

    def prepare(self, ref, state: ParallelState) -> None:
        """Make the model of `ref` (a PoolModelRef, or a PoolVaeRef) resident."""
        if isinstance(ref, PoolVaeRef):
            self._vae.get(ref)
            return
        self._model(ref, state)

    def run(self, job, state: ParallelState, control) -> dict[str, Any]:
        from .job import run_job
        from .stale_forwards import LOOKAHEAD_ATTACHMENT

        if isinstance(job, VaeJob):
            return {"tensor": self._vae.run(job)}
        model = self._model(job.model, state)
        self._loras.apply(job.loras)
        control.start(len(job.sigmas) - 1)
        last_x0: dict[str, Any] = {}

        previews = job.previews and state.rank == 0  # only rank 0 is asked for them

        def callback(step, x0, x, total_steps):
            last_x0["x0"] = x0
            control.after_step(step + 1, x0[:1].to("cpu", copy=True) if previews else None)

        report: dict[str, Any] = {}
        lookahead = model.get_attachment(LOOKAHEAD_ATTACHMENT)  # PipeFusion models only; counts on the first stage
        before = (lookahead.used, lookahead.missed) if lookahead is not None else (0, 0)
        samples = run_job(model, job, callback, state, report)
        self._lookahead = None if lookahead is None else [lookahead.used - before[0], lookahead.missed - before[1]]
        x0 = last_x0.get("x0")
        return {"samples": samples.cpu(), "x0": None if x0 is None else x0.cpu(), **report}

    def stats(self) -> dict[str, Any]:
        from .stage_loading import held_block_parameters
        from .weight_sharding import sharded_blocks

        loras = self._loras
        last = next(reversed(self._resident.values()), None)  # the model of the last job
        held, total = held_block_parameters(last.base.model) if last is not None else (0, 0)
        sharded = sharded_blocks(last.base) if last is not None else None
        return {"model_loads": self.model_loads, "parallel_builds": self.parallel_builds,
                "resident": [list(key) for key in self._resident] or None,  # least recently used first
                "block_parameters_held": held, "block_parameters_total": total,
                "sharded_block_bytes": sharded.resident_bytes() if sharded else None,  # this rank's pieces
                "whole_block_bytes": sharded.block_bytes() if sharded else None,
                "loras": loras.describe() if loras else [], "lora_switches": loras.switches if loras else 0,
                "lora_keys_changed": loras.last_keys_changed if loras else 0, "vae_loads": self._vae.loads,
                "pipefusion_lookahead": self._lookahead}
