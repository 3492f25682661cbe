"""Benchmarks for comfyui-xdit (run as modules, e.g. `python -m comfyui_xdit.bench.attention`)."""
