"""A pool service without ComfyUI, for ray_backend's own tests: each job all-reduces a number over the ranks;
a job with "hang_rank" leaves that rank asleep (a stuck worker)."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class EchoService:
    def __init__(self, device: str):
        self.jobs = 0

    def prepare(self, model_ref, state) -> None:
        pass

    def run(self, job: dict, state, control) -> dict:
        if job.get("hang_rank") == state.rank:
            time.sleep(3600)
        value = torch.tensor([float(job["value"]) * (state.rank + 1)])
        dist.all_reduce(value)
        control.start(1)
        control.after_step(1)
        self.jobs += 1
        return {"sum": value.item(), "world": state.world_size}

    def stats(self) -> dict:
        return {"jobs": self.jobs}
