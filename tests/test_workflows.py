"""Shipped workflows against a real ComfyUI server, and the `queue` CLI / API client end to end.

The UI files are checked against the running server's /object_info the way the frontend reads them: widget values
are positional, one per widget input in definition order, plus one "control after generate" value after a seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from comfyui_xdit.testing.server_launcher import REPO_ROOT, TINY_UNET_NAMES, ComfyServer
from PIL import Image

from comfyui_xdit.api_client import ComfyClient, ExecutionFailed, PromptRejected
from comfyui_xdit.workflow_tools import OFFLINE_VAE_NAME, TEST_CONDITIONING, is_link, load_api_workflow, make_offline, stock_twin

WORKFLOWS = REPO_ROOT / "workflows"
# API files live in workflows/api/: ComfyUI lists every JSON at the top of a pack's workflows/ folder as a
# template, and only the UI ones belong there.
API_FILES = sorted((WORKFLOWS / "api").glob("*_api.json"))
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
STOCK_E2E_TYPES = {"UNETLoader", "ModelSamplingFlux", "XDiTTestConditioning", "FluxGuidance", "BasicGuider",
                   "KSamplerSelect", "BasicScheduler", "RandomNoise", "EmptySD3LatentImage", "SamplerCustomAdvanced",
                   "VAELoader", "VAEDecode", "SaveImage", "SaveLatent"}
MODEL_FILE_INPUTS = frozenset({"unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "vae_name", "lora_name"})
# A user's picture is as absent here as the model files: LoadImage's own validation refuses a name missing from
# ComfyUI's input folder (its combo list is not checked).
INPUT_FILE_ERRORS = {("LoadImage", "custom_validation_failed", "image")}


def api_twin(ui_path: Path) -> Path:
    return WORKFLOWS / "api" / f"{ui_path.stem}_api.json"


def widget_names(node_info: dict[str, Any]) -> list[str]:
    """The node's widgets in the order the frontend creates them (and serialises widgets_values)."""
    names = []
    for section in ("required", "optional"):
        for name in node_info.get("input_order", {}).get(section, []):
            spec = node_info["input"][section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            names.append(name)
            # The frontend adds a control widget to seeds unless told otherwise, and to inputs that ask for one.
            if options.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed")):
                names.append("control_after_generate")
    return names


def node_types(path: Path) -> set[str]:
    data = json.loads(path.read_text())
    if path in API_FILES:
        return {node["class_type"] for node in data.values()}
    return {node["type"] for node in data["nodes"]}


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict[str, Any]:
    return ComfyClient(comfy_server.url).object_info()


@pytest.fixture(scope="module")
def stock_workflow() -> dict[str, Any]:
    """The dev workflow with stock nodes in place of the pack's, tiny weights and a 128 px image, plus SaveLatent."""
    workflow = make_offline(stock_twin(load_api_workflow(WORKFLOWS / "api" / "flux_dev_xdit_api.json")),
                            TINY_UNET_NAMES["dev"], size=128, steps=4)
    workflow["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "latents/e2e"}}
    assert {node["class_type"] for node in workflow.values()} == STOCK_E2E_TYPES
    return workflow


def queue_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "comfyui_xdit", "queue", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=timeout)


def test_every_ui_workflow_has_an_api_twin() -> None:
    assert UI_FILES and API_FILES
    assert [api_twin(path) for path in UI_FILES] == API_FILES


@pytest.mark.parametrize("path", UI_FILES + API_FILES, ids=lambda path: path.name)
def test_every_node_type_exists_on_the_server(path: Path, object_info: dict[str, Any]) -> None:
    missing = sorted(node_types(path) - set(object_info))
    assert not missing, f"{path.name} uses node types the server does not know: {missing}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda path: path.name)
def test_ui_widget_values_fit_the_nodes(path: Path, object_info: dict[str, Any]) -> None:
    ui = json.loads(path.read_text())
    api = json.loads(api_twin(path).read_text())
    assert ui["version"] == 0.4
    assert {str(node["id"]) for node in ui["nodes"]} == set(api)
    for node in ui["nodes"]:
        names = widget_names(object_info[node["type"]])
        values = node.get("widgets_values", [])
        assert len(values) == len(names), f"node {node['id']} ({node['type']}): {values} for widgets {names}"
        # Position by position, the UI values are the API file's inputs of the same name.
        api_inputs = api[str(node["id"])]["inputs"]
        assert api[str(node["id"])]["class_type"] == node["type"]
        by_name = {name: value for name, value in zip(names, values, strict=True) if name != "control_after_generate"}
        assert by_name == {name: value for name, value in api_inputs.items() if not is_link(value)}, node["type"]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda path: path.name)
def test_ui_links_are_the_api_links(path: Path) -> None:
    ui = json.loads(path.read_text())
    api = json.loads(api_twin(path).read_text())
    nodes = {node["id"]: node for node in ui["nodes"]}
    ui_edges = set()
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        target_input = nodes[target]["inputs"][target_slot]
        assert target_input["link"] == link_id and target_input["type"] == link_type
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        ui_edges.add((str(target), target_input["name"], str(origin), origin_slot))
    api_edges = {(node_id, name, value[0], value[1]) for node_id, node in api.items()
                 for name, value in node["inputs"].items() if is_link(value)}
    assert ui_edges == api_edges
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max(link[0] for link in ui["links"])


@pytest.mark.parametrize("path", API_FILES, ids=lambda path: path.name)
def test_api_workflow_validates_but_for_absent_model_files(path: Path, comfy_server: ComfyServer) -> None:
    # The server checks every input name, type and value; the real model files are the only thing it lacks.
    with pytest.raises(PromptRejected) as rejected:
        ComfyClient(comfy_server.url).queue_prompt(load_api_workflow(path))
    problems = {(entry["class_type"], error["type"], error.get("extra_info", {}).get("input_name"))
                for entry in rejected.value.node_errors.values() for error in entry["errors"]}
    assert problems, str(rejected.value)
    assert all((kind == "value_not_in_list" and name in MODEL_FILE_INPUTS) or (node, kind, name) in INPUT_FILE_ERRORS
               for node, kind, name in problems), str(rejected.value)


def test_make_offline_swaps_text_encoders_for_seeded_conditioning() -> None:
    workflow = load_api_workflow(WORKFLOWS / "api" / "flux_dev_xdit_api.json")
    # A negative prompt beside the positive one, as a CFGGuider workflow would have.
    workflow["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["3", 0]}}
    offline = make_offline(workflow, "tiny.safetensors", size=64, steps=2, seed=5)
    assert "3" not in offline  # the DualCLIPLoader
    assert [(offline[node_id]["class_type"], offline[node_id]["inputs"]["seed"]) for node_id in ("4", "20")] == \
        [(TEST_CONDITIONING, 5), (TEST_CONDITIONING, 6)]
    assert offline["1"]["inputs"]["unet_name"] == "tiny.safetensors"
    assert offline["12"]["inputs"]["vae_name"] == OFFLINE_VAE_NAME
    assert offline["8"]["inputs"]["steps"] == 2
    assert offline["10"]["inputs"]["width"] == offline["2"]["inputs"]["height"] == 64
    assert workflow["3"]["class_type"] == "DualCLIPLoader"  # the input is left as it was


def test_queue_refuses_a_ui_workflow(run_cli) -> None:
    result = run_cli("queue", str(UI_FILES[0]), "--server", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "UI-format" in result.stderr and "_api.json" in result.stderr and "Export (API)" in result.stderr


def test_queue_set_names_valid_nodes_and_inputs(run_cli) -> None:
    dev_api = str(WORKFLOWS / "api" / "flux_dev_xdit_api.json")
    unknown_node = run_cli("queue", dev_api, "--set", "99.steps=4")
    assert unknown_node.returncode == 2
    assert "no node '99'" in unknown_node.stderr and "8 (BasicScheduler)" in unknown_node.stderr
    unknown_input = run_cli("queue", dev_api, "--set", "BasicScheduler.stepz=4")
    assert unknown_input.returncode == 2
    assert "no input 'stepz'" in unknown_input.stderr and "scheduler, steps, denoise" in unknown_input.stderr
    linked = run_cli("queue", dev_api, "--set", "8.model=1")
    assert linked.returncode == 2 and "connected to node 2" in linked.stderr


def test_queue_cli_runs_a_stock_workflow_end_to_end(comfy_server: ComfyServer, stock_workflow: dict[str, Any],
                                                     tmp_path: Path) -> None:
    workflow_file = tmp_path / "stock_api.json"
    workflow_file.write_text(json.dumps(stock_workflow))
    out = tmp_path / "out"
    result = queue_cli(str(workflow_file), "--server", comfy_server.url, "--out", str(out),
                       "--set", "SaveImage.filename_prefix=e2e_cli", "--set", "9.noise_seed=7")
    assert result.returncode == 0, result.stderr
    saved = [Path(line) for line in result.stdout.splitlines()]
    assert sorted(path.suffix for path in saved) == [".latent", ".png"]
    assert all(path.is_file() and path.is_relative_to(out) for path in saved)
    image_path = next(path for path in saved if path.suffix == ".png")
    assert image_path.name.startswith("e2e_cli")
    with Image.open(image_path) as image:
        assert image.size == (128, 128) and len(image.getcolors(128 * 128)) > 100
    assert "4/4" in result.stderr  # tqdm's bar for the sampler's four steps


def test_client_reports_events_and_outputs(comfy_server: ComfyServer, stock_workflow: dict[str, Any],
                                           tmp_path: Path) -> None:
    workflow = json.loads(json.dumps(stock_workflow))
    workflow["9"]["inputs"]["noise_seed"] = 11  # a new seed: ComfyUI would serve a repeated prompt from its cache
    client = ComfyClient(comfy_server.url)
    seen: list[str] = []
    result = client.run(workflow, on_event=lambda event_type, data: seen.append(event_type), timeout=180)
    assert [event_type for event_type, _ in result.events] == seen
    assert seen[0] in ("status", "execution_start") and seen[-1] == "execution_success"
    assert {"execution_start", "executing", "progress", "executed"} <= set(seen)
    steps = [data["value"] for event_type, data in result.events if event_type == "progress"]
    assert steps[-1] == 4
    assert {(file.node_id, file.kind) for file in result.files} == {("14", "images"), ("15", "latents")}
    assert client.history(result.prompt_id)["status"]["status_str"] == "success"
    image = client.download(next(file for file in result.files if file.kind == "images"), tmp_path)
    assert image.read_bytes() == (comfy_server.output_dir / image.name).read_bytes()


def test_errors_come_back_plainly(comfy_server: ComfyServer, stock_workflow: dict[str, Any],
                                  tmp_path: Path) -> None:
    client = ComfyClient(comfy_server.url)
    missing = json.loads(json.dumps(stock_workflow))
    missing["1"]["inputs"]["unet_name"] = "no-such-model.safetensors"
    with pytest.raises(PromptRejected) as rejected:
        client.run(missing, timeout=60)
    assert "node 1 (UNETLoader)" in str(rejected.value) and "no-such-model.safetensors" in str(rejected.value)
    # A context width the model does not take passes validation and fails inside the sampler.
    workflow_file = tmp_path / "bad_context.json"
    workflow_file.write_text(json.dumps(stock_workflow))
    result = queue_cli(str(workflow_file), "--server", comfy_server.url, "--set", "4.context_dim=48")
    assert result.returncode == 1
    assert "error: node 11 (SamplerCustomAdvanced) failed: RuntimeError" in result.stderr
    with pytest.raises(ExecutionFailed) as failed:
        bad = json.loads(json.dumps(stock_workflow))
        bad["4"]["inputs"]["context_dim"] = 40
        client.run(bad, timeout=60)
    assert (failed.value.node_id, failed.value.node_type) == ("11", "SamplerCustomAdvanced")
