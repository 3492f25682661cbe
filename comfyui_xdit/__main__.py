"""`python -m comfyui_xdit`: see comfyui_xdit.cli for the subcommands."""

from comfyui_xdit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
