"""Open a safetensors file the user gave us, and say in plain words which file is wrong and how.

The safetensors library reports a damaged file as "incomplete metadata, file not fully covered" or "header too
large", without the file's name; a pickle renamed .safetensors reads as "header too large". This module looks at
the first bytes itself (never unpickling anything) and names the file and the fix.
"""
from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import UnsupportedByXDiT

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# A header longer than this is no real checkpoint's (a 12B-parameter DiT's is ~100 KB); the library's own limit is 100 MB.
_MAX_HEADER_BYTES = 100 * 2**20


def require_safetensors(path: str | Path, what: str) -> None:
    if not str(path).endswith(SAFETENSORS_SUFFIXES):
        raise UnsupportedByXDiT(f"{what} {Path(path).name}: XDiT reads .safetensors files only (they load without unpickling); "
                                f"convert the file first")


def diagnose(path: str | Path) -> str:
    """Why `path` is not a readable safetensors file, from its first bytes and size (nothing is unpickled)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "it is a torch.save zip archive (a .pt/.ckpt) renamed .safetensors; it was not opened, because loading it would unpickle code"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle (a .pt/.ckpt/.bin) renamed .safetensors; it was not opened, because unpickling can run code"
    if size < 8:
        return f"it is {size} bytes long, too short for a safetensors header (the download was cut off?)"
    (header_bytes,) = struct.unpack("<Q", head)
    if header_bytes > _MAX_HEADER_BYTES or header_bytes > size - 8:
        return (f"its header claims {header_bytes:,} bytes but the file has {size:,}: it is truncated, corrupt, or not a "
                f"safetensors file")
    with path.open("rb") as file:
        file.seek(8)
        try:
            header = json.loads(file.read(header_bytes))
            needed = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "its header is not valid safetensors metadata (corrupt)"
    if needed > size - 8 - header_bytes:
        return f"its tensors need {needed:,} bytes but the file holds {size - 8 - header_bytes:,}: it is truncated (the download was cut off?)"
    return "its header does not describe its tensors consistently (corrupt)"


@contextlib.contextmanager
def open_safetensors(path: str | Path, what: str) -> Iterator:
    """safe_open(path) for reading on the CPU; a damaged file raises UnsupportedByXDiT naming it and the fix."""
    require_safetensors(path, what)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise UnsupportedByXDiT(f"{what} {Path(path).name} cannot be read: {diagnose(path)}. Download or export it again "
                                f"(library said: {error})") from None
    with handle as file:
        yield file
