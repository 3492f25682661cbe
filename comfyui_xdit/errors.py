"""Errors that tell a ComfyUI user what to change."""


class UnsupportedByXDiT(ValueError):
    """An input or model feature this pack cannot run in parallel; the message names the workaround."""
