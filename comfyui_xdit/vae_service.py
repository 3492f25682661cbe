"""The pool side of XDiTVAELoader / XDiTVAEDecode / XDiTVAEEncode: one VAE resident per worker, beside the
diffusion model, loaded from its file on first use; each job runs vae_parallel over every rank of the pool."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from parallel_core.spatial_conv import RowGroup

from .job_spec import PoolVaeRef, VaeJob


def vae_degrees(world_size: int) -> dict[str, int]:
    """The pool takes a parallel config with each job; a VAE job splits rows over the whole world (data's groups)."""
    return {"data_degree": world_size}


class ResidentVae:
    def __init__(self) -> None:
        self._path: str | None = None
        self._vae = None
        self.loads = 0

    def get(self, ref: PoolVaeRef):
        if ref.path != self._path:
            import comfy.sd
            import comfy.utils

            self._vae, self._path = None, None
            sd, metadata = comfy.utils.load_torch_file(ref.path, safe_load=True, return_metadata=True)
            self._vae = comfy.sd.VAE(sd=sd, metadata=metadata)
            self._vae.throw_exception_if_invalid()
            self._path = ref.path
            self.loads += 1
        return self._vae

    def run(self, job: VaeJob) -> Any:
        """This rank's rows of the image (decode) or latent (encode): vae_parallel.join_pieces joins every rank's."""
        from . import vae_parallel

        vae = self.get(job.vae)
        initialised = dist.is_available() and dist.is_initialized()
        rows = RowGroup(dist.get_rank(), dist.get_world_size()) if initialised else RowGroup(0, 1)
        run = {"decode": vae_parallel.decode, "encode": vae_parallel.encode}[job.kind]
        return run(vae, job.tensor, rows)
