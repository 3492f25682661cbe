"""What a pool worker does with a sampling job: keep the model resident, run ComfyUI's sampling on it.

Runs inside a Ray actor (ray_backend.worker.PoolWorker names it by import path). One model is resident per worker
at a time, keyed by file, dtype and PipeFusion stage (a stage loads only its own blocks, stage_loading.py); the
parallel clone is cached per parallel config, so a second prompt on the same model and degrees loads and builds
nothing. A job's LoRA stack is merged into the resident model before it
runs (lora_merge.py): switching LoRAs changes the weights they touch and loads nothing.
"""
from __future__ import annotations

from typing import Any

from parallel_core import ParallelConfig, ParallelState

from .comfy_runtime import init_worker

SERVICE_PATH = "comfyui_xdit.worker_service:SamplingService"


class SamplingService:
    def __init__(self, device: str):
        init_worker(cpu=(device == "cpu"))
        self._key: tuple[str, str, int, int] | None = None
        self._base = None
        self._parallel: dict[ParallelConfig, Any] = {}
        self._loras = None  # MergedLoras of the resident model
        self.model_loads = 0
        self.parallel_builds = 0

    def _model(self, ref, state: ParallelState):
        import comfy.model_management
        import comfy.sd

        from .lora_merge import MergedLoras
        from .parallel_model import parallelize
        from .shell_model import model_options_for
        from .stage_loading import load_stage

        stages, stage = state.pipefusion.size, state.pipefusion.rank
        key = (ref.path, ref.weight_dtype, stages, stage)
        if key != self._key:
            self._base, self._parallel, self._loras, self._key = None, {}, None, None
            comfy.model_management.unload_all_models()  # the previous model's memory goes before the next loads
            if stages > 1:
                self._base = load_stage(ref.path, ref.weight_dtype, stages, stage)
            else:
                self._base = comfy.sd.load_diffusion_model(ref.path, model_options=model_options_for(ref.weight_dtype))
            self._loras = MergedLoras(self._base)
            self._key = key
            self.model_loads += 1
        if state.config not in self._parallel:
            self._parallel[state.config] = parallelize(self._base, state)
            self.parallel_builds += 1
        return self._parallel[state.config]

    def prepare(self, ref, state: ParallelState) -> None:
        """Make the model of `ref` (a PoolModelRef) resident."""
        self._model(ref, state)

    def run(self, job, state: ParallelState, control) -> dict[str, Any]:
        from .job import run_job

        model = self._model(job.model, state)
        self._loras.apply(job.loras)
        control.start(len(job.sigmas) - 1)
        last_x0: dict[str, Any] = {}

        previews = job.previews and state.rank == 0  # only rank 0 is asked for them

        def callback(step, x0, x, total_steps):
            last_x0["x0"] = x0
            control.after_step(step + 1, x0[:1].to("cpu", copy=True) if previews else None)

        samples = run_job(model, job, callback, state)
        x0 = last_x0.get("x0")
        return {"samples": samples.cpu(), "x0": None if x0 is None else x0.cpu()}

    def stats(self) -> dict[str, Any]:
        from .stage_loading import held_block_parameters

        loras = self._loras
        held, total = held_block_parameters(self._base.model) if self._base is not None else (0, 0)
        return {"model_loads": self.model_loads, "parallel_builds": self.parallel_builds, "resident": list(self._key) if self._key else None,
                "block_parameters_held": held, "block_parameters_total": total,
                "loras": loras.describe() if loras else [], "lora_switches": loras.switches if loras else 0,
                "lora_keys_changed": loras.last_keys_changed if loras else 0}
