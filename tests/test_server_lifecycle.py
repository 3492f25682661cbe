"""Stopping ComfyUI stops the pool: no Ray process or worker outlives a SIGTERM to the server."""
from __future__ import annotations

import signal
import time

import psutil
import pytest

from comfyui_xdit.testing.server_launcher import TINY_UNET_NAMES, launch_server, prepare_base
from server_graphs import flux_graph

from comfyui_xdit.api_client import ComfyClient

pytestmark = pytest.mark.server


def test_sigterm_to_comfyui_stops_every_pool_and_ray_process(comfy_root, tiny_flux_paths, tmp_path):
    base = prepare_base(tmp_path / "base")
    (base / "models" / "diffusion_models" / TINY_UNET_NAMES["dev"]).symlink_to(tiny_flux_paths["dev"])
    server = launch_server(comfy_root, base, tmp_path / "comfyui.log")
    try:
        server.wait_ready()
        ComfyClient(server.url).run(flux_graph(True, world_size=2, ulysses_degree=2), timeout=600)
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        names = {p.name() for p in descendants}
        assert any("raylet" in n for n in names), f"expected a local Ray cluster under ComfyUI, found {names}"
        server.process.send_signal(signal.SIGTERM)  # the server only, as a service manager would
        server.process.wait(timeout=60)
        deadline = time.monotonic() + 30
        alive = descendants
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.5)
        assert not alive, f"left running after ComfyUI exited: {[(p.pid, p.name()) for p in alive]}\n{server.log_tail()}"
    finally:
        server.stop()
