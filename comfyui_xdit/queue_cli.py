"""`python -m comfyui_xdit queue WORKFLOW.json`: run an API-format workflow on a ComfyUI server, save its outputs.

Exit codes: 0 done, 1 the server rejected or failed the prompt (the error is printed plainly), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from comfyui_xdit.workflow_tools import WorkflowError, load_api_workflow, set_input

DEFAULT_SERVER = "http://127.0.0.1:8188"  # ComfyUI's own default address


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", help="API-format workflow JSON (e.g. one of workflows/api/)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI server URL (default: {DEFAULT_SERVER})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change a widget value before queueing; NODE is a node id or a unique node type or "
                             "title, VALUE is read as JSON when it parses, else as a string (repeatable)")
    parser.add_argument("--out", type=Path, help="download the output files (images, latents) into this folder")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait)")


def run(args: argparse.Namespace) -> int:
    # Imported here: the websocket client is needed by this subcommand only, and cli imports this module.
    from comfyui_xdit.api_client import ComfyAPIError, ComfyClient
    from comfyui_xdit.cli import UsageError

    try:
        workflow = load_api_workflow(args.workflow)
        for item in args.sets:
            set_input(workflow, *parse_set(item))
    except WorkflowError as error:
        raise UsageError(str(error)) from None
    client = ComfyClient(args.server)
    progress = ProgressDisplay(workflow)
    try:
        result = client.run(workflow, on_event=progress.on_event, timeout=args.timeout)
        progress.close()
        print(f"prompt {result.prompt_id} done", file=sys.stderr)
        # stdout carries only the outputs: local paths with --out, else where they lie on the server.
        for file in result.files:
            if args.out:
                print(client.download(file, args.out))
            else:
                print(f"{file.type}/{file.subfolder + '/' if file.subfolder else ''}{file.filename} (on the server)")
    except ComfyAPIError as error:
        progress.close()
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def parse_set(item: str) -> tuple[str, str, Any]:
    """``"9.noise_seed=5"`` -> ("9", "noise_seed", 5); VALUE is JSON when it parses, else the raw string."""
    target, sep, raw = item.partition("=")
    node, dot, input_name = target.rpartition(".")  # input names have no dots; node titles may
    if not sep or not dot or not node or not input_name:
        raise WorkflowError(f"--set expects NODE.INPUT=VALUE, got {item!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return node, input_name, value


class ProgressDisplay:
    """One tqdm bar per node that reports progress (the sampler's steps), fed by the websocket events."""

    def __init__(self, workflow: dict[str, dict[str, Any]]):
        self.workflow = workflow
        self.bar: tqdm | None = None
        self.node: str | None = None

    def on_event(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type != "progress":
            return
        node, total = str(data.get("node")), int(data["max"])
        if self.bar is None or node != self.node or total != self.bar.total:
            self.close()
            class_type = self.workflow.get(node, {}).get("class_type", "?")
            self.bar = tqdm(total=total, desc=f"node {node} ({class_type})", unit="step", file=sys.stderr)
            self.node = node
        self.bar.update(int(data["value"]) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
