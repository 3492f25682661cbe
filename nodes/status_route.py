"""GET /xdit/status on ComfyUI's server: the pool's workers, resident models and load counts."""
from __future__ import annotations

from aiohttp import web

from comfyui_xdit.pool_client import PRESTART, QUEUED_START, REGISTRY


def register_status_route() -> None:
    try:
        from server import PromptServer
    except ImportError:  # imported outside a ComfyUI server (tests, scripts): no route to add
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get("/xdit/status")
    async def xdit_status(request):
        pool = REGISTRY.current
        return web.json_response({"pool": pool.status() if pool else None, "prestart": PRESTART, "queued_start": QUEUED_START})
