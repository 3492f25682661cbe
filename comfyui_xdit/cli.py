"""`python -m comfyui_xdit <subcommand>`: a registry of subcommands.

To add one, write ``run(args) -> int`` (and, if it takes options, ``configure(parser)``) and add a Subcommand to
SUBCOMMANDS. Heavy imports (torch, ComfyUI) belong inside ``run`` so that --help and other subcommands stay fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from comfyui_xdit import queue_cli
from comfyui_xdit.testing import demo


class UsageError(Exception):
    """Raised by a subcommand for bad option values: reported as a usage error, not a traceback."""


@dataclass(frozen=True)
class Subcommand:
    help: str
    run: Callable[[argparse.Namespace], int]
    configure: Callable[[argparse.ArgumentParser], None] | None = None


def _run_setup_comfyui(args: argparse.Namespace) -> int:
    from comfyui_xdit.comfy_runtime import comfyui_path, import_comfy

    path = comfyui_path(prepare=True)
    import_comfy(path)
    # comfy.sd pulls in torchvision, torchaudio, transformers, ...: importing it proves the environment complete.
    import comfy.sd  # noqa: F401

    print(path)
    return 0


def _configure_make_tiny_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", help="model family, one of comfyui_xdit.testing.tiny_models.FAMILIES (default: its first)")
    parser.add_argument("--variant", help="family variant (default: the family's first)")
    parser.add_argument("--size", default="tiny", help="tiny (tests), pipeline (PipeFusion tests: 4 double + 10 single blocks) or bench (benchmarks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                        help="override one config field, e.g. --set depth=3 (repeatable)")
    parser.add_argument("--out", required=True, help="output .safetensors path (for taef1: the vae_approx folder)")


def _run_make_tiny_model(args: argparse.Namespace) -> int:
    from comfyui_xdit.testing.tiny_models import FAMILIES, write_tiny_model

    try:
        path = write_tiny_model(args.family or next(iter(FAMILIES)), args.out, variant=args.variant, size=args.size, seed=args.seed,
                                **_parse_overrides(args.overrides))
    except ValueError as error:  # unknown family/variant/size, or a config ComfyUI would not read back
        raise UsageError(str(error)) from error
    print(path)
    return 0


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=JSON, got {item!r}")
        overrides[key] = json.loads(value)
    return overrides


SUBCOMMANDS: dict[str, Subcommand] = {
    "setup-comfyui": Subcommand(
        "prepare ComfyUI (download + requirements when needed), check that comfy.sd imports, print its path",
        _run_setup_comfyui,
    ),
    "make-tiny-model": Subcommand(
        "write a seeded tiny model checkpoint that ComfyUI loads and detects", _run_make_tiny_model,
        _configure_make_tiny_model,
    ),
    "demo": Subcommand(
        "the main job: headless ComfyUI + this pack + a local Ray pool run a shipped workflow; image and timings",
        demo.run, demo.configure,
    ),
    "queue": Subcommand(
        "run an API-format workflow on a ComfyUI server with a progress bar, and save its output files",
        queue_cli.run, queue_cli.configure,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, subcommand in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=subcommand.help, description=subcommand.help)
        if subcommand.configure is not None:
            subcommand.configure(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except UsageError as error:
        parser.error(f"{args.command}: {error}")
