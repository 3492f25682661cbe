"""comfyui-xdit as a ComfyUI custom-node pack: registers the nodes; starts nothing (Ray starts on first use) unless
XDIT_PRESTART_WORKERS asks for the pool to start with ComfyUI."""
import os
import sys

# Our packages (comfyui_xdit, parallel_core, ray_backend) import by their top-level names. Appended, never
# prepended: this folder holds a `nodes/` package, and ComfyUI's own top-level `nodes` module must win.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
