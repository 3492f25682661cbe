"""API-format workflows (what POST /prompt takes): load, edit inputs, derive the stock twin, make runnable offline.

An API workflow maps node id -> {"class_type", "inputs", "_meta"}; an input is a literal (widget value) or a link
``[source_node_id, output_index]``. UI workflows (litegraph JSON with "nodes" and "links", what drag-and-drop and
"Save" use) cannot be queued; ComfyUI's "Export (API)" turns one into the API format.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

Workflow = dict[str, dict[str, Any]]

# The pack's nodes and their stock twins (same graph position, same outputs): kept inputs are the stock ones.
STOCK_TWINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "XDiTUNetLoader": ("UNETLoader", ("unet_name", "weight_dtype")),
    "XDiTSamplerCustomAdvanced": ("SamplerCustomAdvanced", ("noise", "guider", "sampler", "sigmas", "latent_image")),
    "XDiTLoraLoader": ("LoraLoaderModelOnly", ("model", "lora_name", "strength_model")),
    "XDiTFluxLoraLoader": ("LoraLoaderModelOnly", ("model", "lora_name", "strength_model")),
    "XDiTKSampler": ("KSampler", ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                                  "latent_image", "denoise")),
    "XDiTKSamplerAdvanced": ("KSamplerAdvanced", ("model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler",
                                                  "positive", "negative", "latent_image", "start_at_step", "end_at_step",
                                                  "return_with_leftover_noise")),
    "XDiTVAELoader": ("VAELoader", ("vae_name",)),
    "XDiTVAEDecode": ("VAEDecode", ("samples", "vae")),
    "XDiTVAEEncode": ("VAEEncode", ("pixels", "vae")),
}
UNET_LOADERS = frozenset({"XDiTUNetLoader", "UNETLoader"})
VAE_LOADERS = frozenset({"XDiTVAELoader", "VAELoader"})
# The tiny Flux 16-channel VAE the test server and the demo put in models/vae (testing/server_launcher.py).
OFFLINE_VAE_NAME = "tiny-flux-vae.safetensors"
LATENT_SIZED = frozenset({"EmptySD3LatentImage", "EmptyLatentImage", "EmptyFlux2LatentImage", "ModelSamplingFlux", "Flux2Scheduler"})
STEPPED = frozenset({"BasicScheduler", "Flux2Scheduler", "LTXVScheduler", "KSampler", "KSamplerAdvanced", "XDiTKSampler", "XDiTKSamplerAdvanced"})
TEST_CONDITIONING = "XDiTTestConditioning"  # tests/xdit_test_nodes: seeded random CONDITIONING


class WorkflowError(ValueError):
    """A workflow file or an edit to it is not usable; the message says what to change."""


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def check_api_workflow(data: Any, source: str = "workflow") -> Workflow:
    """Return ``data`` if it is an API-format workflow, else raise WorkflowError saying how to get one."""
    if is_ui_workflow(data):
        raise WorkflowError(
            f"{source} is a UI-format workflow (litegraph JSON with nodes and links), which cannot be queued. "
            "Use the matching workflows/api/*_api.json file, or in ComfyUI open it and use Workflow > Export (API)."
        )
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{source} is not an API-format workflow (expected a JSON object of node id -> node)")
    bad = [node_id for node_id, node in data.items()
           if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)
                   and isinstance(node.get("inputs"), dict))]
    if bad:
        raise WorkflowError(f"{source} is not an API-format workflow: entries {bad[:5]} lack class_type/inputs")
    return data


def load_api_workflow(path: str | Path) -> Workflow:
    """Read an API-format workflow file (see check_api_workflow for what is refused)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WorkflowError(f"cannot read {path} as JSON: {error}") from None
    return check_api_workflow(data, str(path))


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def find_node(workflow: Workflow, key: str) -> str:
    """The id of the node named by ``key``: a node id, or a class_type or title that exactly one node has."""
    if key in workflow:
        return key
    matches = [node_id for node_id, node in workflow.items()
               if key in (node["class_type"], node.get("_meta", {}).get("title"))]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(f"{node_id} ({node['class_type']})" for node_id, node in workflow.items())
    if matches:
        raise WorkflowError(f"{key!r} names several nodes ({', '.join(matches)}); use a node id: {listing}")
    raise WorkflowError(f"no node {key!r} in the workflow; valid nodes (id, or a unique type/title): {listing}")


def set_input(workflow: Workflow, node_key: str, input_name: str, value: Any) -> str:
    """Set a widget value in place; the node is found with find_node. Returns the node id."""
    node_id = find_node(workflow, node_key)
    inputs = workflow[node_id]["inputs"]
    if input_name not in inputs:
        valid = ", ".join(name for name, current in inputs.items() if not is_link(current)) or "(none)"
        raise WorkflowError(f"node {node_id} ({workflow[node_id]['class_type']}) has no input {input_name!r}; "
                            f"valid inputs: {valid}")
    if is_link(inputs[input_name]):
        source = inputs[input_name][0]
        raise WorkflowError(f"input {input_name!r} of node {node_id} is connected to node {source} "
                            f"({workflow[source]['class_type']}); only widget values can be set")
    inputs[input_name] = value
    return node_id


def stock_twin(workflow: Workflow) -> Workflow:
    """A copy with the pack's nodes replaced by their stock ComfyUI twins (the reference a pool run must match)."""
    twin = copy.deepcopy(workflow)
    for node in twin.values():
        if node["class_type"] in STOCK_TWINS:
            stock_type, kept = STOCK_TWINS[node["class_type"]]
            node["class_type"] = stock_type
            node["_meta"] = {"title": stock_type}
            node["inputs"] = {name: value for name, value in node["inputs"].items() if name in kept}
    return twin


def make_offline(workflow: Workflow, unet_name: str, vae_name: str = OFFLINE_VAE_NAME, size: int = 128,
                 steps: int | None = None, seed: int = 0, context_dim: int = 64, pooled_dim: int = 32,
                 text_mask: bool = False, image: str | None = None) -> Workflow:
    """A copy that runs with tiny weights and no text encoders: for tests and demos on machines without the models.

    Every CLIPTextEncode becomes XDiTTestConditioning (seeds ``seed``, ``seed + 1``, ... in node-id order, so a
    positive and a negative prompt differ) and the CLIP loaders feeding them are dropped; UNet loaders load
    ``unet_name``, VAE loaders ``vae_name``; latents, ModelSamplingFlux and Flux2Scheduler use ``size`` pixels square;
    ``steps`` overrides the steps of BasicScheduler, LTXVScheduler and the KSamplers; ``text_mask`` adds an all-ones
    text mask to the conditioning (what LTX-Video's T5 hands its model); ``image`` (a file in ComfyUI's input folder) is
    what every LoadImage loads. The tiny-model defaults match testing/tiny_models' default family.
    """
    offline = copy.deepcopy(workflow)
    encoders = sorted((node_id for node_id, node in offline.items() if node["class_type"] == "CLIPTextEncode"),
                      key=_id_order)
    clip_sources = {offline[node_id]["inputs"]["clip"][0] for node_id in encoders
                    if is_link(offline[node_id]["inputs"].get("clip"))}
    for index, node_id in enumerate(encoders):
        offline[node_id] = {
            "class_type": TEST_CONDITIONING,
            "inputs": {"seed": seed + index, "text_tokens": 7, "context_dim": context_dim, "pooled_dim": pooled_dim,
                       **({"text_mask": True} if text_mask else {})},
            "_meta": {"title": f"{offline[node_id].get('_meta', {}).get('title', 'CLIPTextEncode')} (offline)"},
        }
    for node_id in clip_sources:
        del offline[node_id]
    for node in offline.values():
        inputs = node["inputs"]
        if node["class_type"] in UNET_LOADERS:
            inputs["unet_name"] = unet_name
        elif node["class_type"] in VAE_LOADERS:
            inputs["vae_name"] = vae_name
        elif node["class_type"] in STEPPED and steps is not None:
            inputs["steps"] = steps
        elif node["class_type"] == "LoadImage" and image is not None:
            inputs["image"] = image
        if node["class_type"] in LATENT_SIZED:
            inputs["width"] = inputs["height"] = size
    dangling = [(node_id, name, value[0]) for node_id, node in offline.items()
                for name, value in node["inputs"].items() if is_link(value) and value[0] not in offline]
    if dangling:
        raise WorkflowError("after dropping the CLIP loaders these inputs point at removed nodes: "
                            + ", ".join(f"node {node_id} input {name} -> node {source}"
                                        for node_id, name, source in dangling))
    return offline


def _id_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)
