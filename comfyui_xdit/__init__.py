"""Tooling around comfyui-xdit: locating/preparing a ComfyUI runtime, tiny test models, and the CLI.

Kept free of heavy imports (torch, ComfyUI) so `python -m comfyui_xdit --help` and subprocess bootstrap stay cheap.
"""
