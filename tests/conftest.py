"""Shared fixtures. ComfyUI is imported only by tests that ask for it, once per session."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from parallel_core.local_launch import preload_in_ranks

REPO_ROOT = Path(__file__).resolve().parents[1]
# What ComfyUI's import brings in besides its own modules (-X importtime in a rank: torch 3.1 s, scipy 1.1 s,
# transformers 0.7 s, torchvision 0.3 s; ComfyUI's own modules 0.7 s): imported once by the fork server the suite's
# CPU ranks fork from, instead of at every one of its ~100 launches (world 2: 9.5 s a launch before, 1.6 s after).
preload_in_ranks(["numpy", "torch._dynamo", "scipy.stats", "transformers", "torchvision", "safetensors.torch"])


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """The ComfyUI folder (found via comfyui_path()), imported into this process; CPU unless CUDA is present.

    Also exports COMFYUI_PATH, so subprocesses started by tests use the same ComfyUI.
    """
    from comfyui_xdit.comfy_runtime import import_comfy

    return import_comfy()


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m comfyui_xdit ARGS` to completion, capturing text output."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_cli(*args), cwd=REPO_ROOT, text=True, capture_output=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def tiny_flux_paths(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seed-0 tiny Flux checkpoints by variant ("dev", "schnell"), written through the CLI once per session."""
    folder = tmp_path_factory.mktemp("tiny_flux")
    paths = {variant: folder / f"flux-{variant}.safetensors" for variant in ("dev", "schnell")}
    # Both writers run at once: each pays ComfyUI's import time.
    writers = [
        subprocess.Popen(_cli("make-tiny-model", "--family", "flux", "--variant", variant, "--seed", "0",
                              "--out", str(path)),
                         cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for variant, path in paths.items()
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=300)
        assert writer.returncode == 0, stderr
    return paths


@pytest.fixture(scope="session")
def tiny_model_path(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """path_for(family): a seed-0 tiny checkpoint of that family ("flux2", "sd15", ...; see `make-tiny-model`),
    written through the CLI on first use and kept for the session."""
    folder = tmp_path_factory.mktemp("tiny_models")
    written: dict[str, Path] = {}

    def path_for(family: str) -> Path:
        if family not in written:
            path = folder / f"{family}.safetensors"
            done = subprocess.run(_cli("make-tiny-model", "--family", family, "--seed", "0", "--out", str(path)),
                                  cwd=REPO_ROOT, text=True, capture_output=True, timeout=300)
            assert done.returncode == 0, done.stderr
            written[family] = path
        return written[family]

    return path_for


@pytest.fixture(scope="session")
def comfy_server(request: pytest.FixtureRequest, comfy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real headless ComfyUI server for the whole session (comfyui_xdit/testing/server_launcher.py), on a free 127.0.0.1 port.

    Its custom_nodes/ holds this repo (as comfyui-xdit) and tests/xdit_test_nodes; models/diffusion_models the
    tiny Flux dev and schnell (names in server_launcher.TINY_UNET_NAMES) and the tiny SD1.5 U-Net
    (server_graphs.TINY_SD15_NAME); models/vae_approx a tiny taef1, models/vae the tiny Flux VAE the XDiT VAE nodes
    of the shipped workflows load offline (workflow_tools.OFFLINE_VAE_NAME). A failing
    test that uses it gets the server log's tail in its report.
    """
    from comfyui_xdit.testing.server_launcher import TINY_UNET_NAMES, launch_server, prepare_base

    from comfyui_xdit.testing.tiny_vae import write_server_vaes

    base = prepare_base(tmp_path_factory.mktemp("comfy_base"))
    server = launch_server(comfy_root, base, base / "comfyui.log")
    try:
        # Weights are written while the server boots (~17 s): it rescans model folders on every request.
        for variant, path in request.getfixturevalue("tiny_flux_paths").items():
            (server.models_dir("diffusion_models") / TINY_UNET_NAMES[variant]).symlink_to(path)
        (server.models_dir("diffusion_models") / "tiny-sd15.safetensors").symlink_to(request.getfixturevalue("tiny_model_path")("sd15"))
        write_server_vaes(server.base / "models")
        server.wait_ready()
        yield server
    finally:
        server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that asks for the shared server is in the server tier, wherever it lives.
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("comfy_server")
    if report.failed and server is not None:
        report.sections.append(("ComfyUI server log (tail)", server.log_tail()))


def _cli(*args: str) -> list[str]:
    # Run from the repository root so the package imports even when it is not installed.
    return [sys.executable, "-m", "comfyui_xdit", *args]
