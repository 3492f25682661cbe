"""A real headless ComfyUI server with this pack installed: own base directory, free loopback port, captured log.

Used by the tests and by the demo. The base directory holds custom_nodes/ with links to this repository (as
``comfyui-xdit``, the way a user installs it) and to the stand-in conditioning pack tests/xdit_test_nodes (no
text-encoder weights exist offline), plus models/ folders that the caller fills with tiny weights. ComfyUI rescans
model folders on each request, so files may be added while the server boots.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_NODES = REPO_ROOT / "tests" / "xdit_test_nodes"
REPO_LINK_NAME = "comfyui-xdit"
# File names of the tiny Flux checkpoints in the server's models/diffusion_models, by variant.
TINY_UNET_NAMES = {"dev": "tiny-flux-dev.safetensors", "schnell": "tiny-flux-schnell.safetensors"}
STARTUP_TIMEOUT_S = 180.0  # ~17 s alone; a busy 2-core machine (model writers in parallel) takes longer
STOP_TIMEOUT_S = 15.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # ComfyUI colours its log levels


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base(base: Path) -> Path:
    """Create a ComfyUI base directory: custom_nodes/ with the repo and the test pack, empty model folders."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for name, target in ((REPO_LINK_NAME, REPO_ROOT), (TEST_NODES.name, TEST_NODES)):
        link = custom_nodes / name
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    for folder in ("diffusion_models", "vae_approx", "vae", "text_encoders"):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        # A first visit otherwise opens the template browser over the canvas (the frontend's new-user flow).
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return base


def server_env(comfy_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server (and the workers it may start): ComfyUI's folder first on PYTHONPATH, then
    `extra` (e.g. a shorter XDIT_STALL_TIMEOUT_S for a test server of its own).

    ComfyUI has a top-level module ``nodes`` and this repo a top-level folder ``nodes/``: an inherited PYTHONPATH
    holding the repo root must come after ComfyUI. The pack's __init__.py appends the repo root itself.
    """
    env = dict(os.environ)
    inherited = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    env["PYTHONPATH"] = os.pathsep.join([str(comfy_dir), *inherited])
    env["COMFYUI_PATH"] = str(comfy_dir)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows what happened up to a crash
    env.update(extra or {})
    return env


@dataclass
class ComfyServer:
    """A running ComfyUI server process and where to reach it."""

    url: str
    base: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def models_dir(self, folder: str) -> Path:
        return self.base / "models" / folder

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.is_file():
            return "(no server log)"
        text = _ANSI.sub("", self.log_path.read_text(errors="replace"))
        return "\n".join(text.splitlines()[-lines:])

    def get_json(self, route: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(f"{self.url}{route}", timeout=timeout) as response:
            return json.load(response)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until GET /object_info answers; raise with the log tail if the server exits or stays silent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                self.get_json("/object_info", timeout=10)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer GET /object_info within {timeout:.0f} s; "
                           f"log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate (ComfyUI exits on SIGTERM), kill if it hangs, then kill what it left in its process group.

        The server runs in a session of its own, so its group holds only what it started: a Ray cluster started by
        the nodes loses most processes with it, but some Ray agents ignore SIGTERM and would outlive it.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # nothing left


def launch_server(comfy_dir: Path, base: Path, log_path: Path, port: int | None = None,
                  env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """Start ``main.py`` from ``comfy_dir`` on a free loopback port without waiting for it (see wait_ready);
    `env` adds to (or overrides) the server's environment, `extra_args` are more ComfyUI command-line flags."""
    port = port or free_port()
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:", *extra_args,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=comfy_dir, env=server_env(comfy_dir, env), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return ComfyServer(url=f"http://127.0.0.1:{port}", base=base, log_path=log_path, process=process)
