"""Start the pool when a prompt that needs it is queued, not when its loader runs.

ComfyUI calls on-prompt handlers (PromptServer.add_on_prompt_handler) with a prompt as it is queued, before it is
validated. When nothing runs or waits in the queue, no pool is up and the prompt's XDiTUNetLoader nodes all ask for
the private local cluster with one valid world size, the pool starts in the background: Ray and the workers start
while ComfyUI validates the prompt and runs the nodes before the loader, which then finds the pool (or waits for
it). Nothing else is ever started: the workflow names no address (a configured cluster is connected by the loader
as before), and world_size is bounded as the loader bounds it (its own checks, then the cluster's capacity).
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from ray_backend.clusters import LOCAL, ClusterNotConfigured

from . import cluster_config
from .pool_client import start_for_queued_prompt


def local_pool_request(prompt: Any, loader: type) -> tuple[int, str] | None:
    """(world_size, unet_name) when every `loader` node (XDiTUNetLoader) of the API prompt `prompt` asks, with literal
    inputs that pass the loader's own checks (VALIDATE_INPUTS, world_size's bounds), for one world size on the
    private local cluster; else None (start nothing)."""
    if not isinstance(prompt, dict):
        return None
    nodes = [node.get("inputs") for node in prompt.values() if isinstance(node, dict) and node.get("class_type") == loader.__name__]
    if not nodes or not all(isinstance(inputs, dict) for inputs in nodes):
        return None
    limit = loader.INPUT_TYPES()["optional"]["world_size"][1]["max"]
    checked_names = tuple(inspect.signature(loader.VALIDATE_INPUTS).parameters)
    requests = set()
    for inputs in nodes:
        checked = {name: inputs[name] for name in checked_names if name in inputs}
        world, address, unet = checked.get("world_size", 0), checked.get("ray_address", LOCAL), inputs.get("unet_name")
        if type(world) is not int or not 0 <= world <= limit or not isinstance(unet, str) or not isinstance(address, str):
            return None  # a link, a wrong type or an out-of-range value: the loader decides when it runs
        try:
            if not cluster_config.target_for(address).is_local:
                return None
        except ClusterNotConfigured:
            return None
        if loader.VALIDATE_INPUTS(**checked) is not True:
            return None
        requests.add((world, unet))
    return requests.pop() if len(requests) == 1 else None


def _model_bytes(unet_name: str) -> int | None:
    import folder_paths

    if unet_name not in folder_paths.get_filename_list("diffusion_models"):
        return None  # the prompt fails validation on it
    path = folder_paths.get_full_path("diffusion_models", unet_name)
    return os.path.getsize(path) if path else None


def register_queued_start(loader: type) -> None:
    """Have ComfyUI's server call us with every prompt queued (see the module docstring)."""
    try:
        from server import PromptServer
    except ImportError:  # imported outside a ComfyUI server (tests, scripts): no queue to watch
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    def on_prompt(json_data: dict) -> dict:
        if PromptServer.instance.prompt_queue.get_tasks_remaining() != 0:
            return json_data  # a prompt runs or waits: it may be using or resizing the pool
        request = local_pool_request(json_data.get("prompt"), loader)
        if request is not None:
            model_bytes = _model_bytes(request[1])
            if model_bytes is not None:
                start_for_queued_prompt(request[0], model_bytes)
        return json_data  # unchanged

    PromptServer.instance.add_on_prompt_handler(on_prompt)
