"""Damaged or disguised weight files: which file, what is wrong, what to do; a pickle is never unpickled."""
from __future__ import annotations

import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.errors import UnsupportedByXDiT
from comfyui_xdit.safetensors_files import open_safetensors

pytestmark = pytest.mark.fast


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(path))
    return path


def test_a_good_file_opens(good):
    with open_safetensors(good, "diffusion model") as f:
        assert torch.equal(f.get_tensor("w")[0], torch.arange(8, dtype=torch.float32))


@pytest.mark.parametrize(("make", "message"), [
    (lambda d, good: _write(d / "cut.safetensors", good.read_bytes()[:-40]), r"cut.safetensors cannot be read: its tensors need 256 bytes but the file holds 216: it is truncated"),
    (lambda d, good: _write(d / "empty.safetensors", b""), r"empty.safetensors cannot be read: it is 0 bytes long"),
    (lambda d, good: _write(d / "json.safetensors", struct.pack("<Q", 9) + b"{not json"), r"json.safetensors cannot be read: its header is not valid safetensors metadata"),
    (lambda d, good: _write(d / "absurd.safetensors", struct.pack("<Q", 2**62) + b"{}"), r"absurd.safetensors cannot be read: its header claims 4,611,686,018,427,387,904 bytes but the file has 10"),
    (lambda d, good: _write(d / "zip.safetensors", b"PK\x03\x04" + b"\0" * 60), r"zip.safetensors cannot be read: it is a torch.save zip archive"),
])
def test_damaged_files_name_the_file_and_the_fix(tmp_path, good, make, message):
    path = make(tmp_path, good)
    with pytest.raises(UnsupportedByXDiT, match=message + r".*Download or export it again"):
        with open_safetensors(path, "diffusion model"):
            pass


def test_a_pickle_renamed_safetensors_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = _write(tmp_path / "model.safetensors", pickle.dumps(_Marker(str(marker))))
    with pytest.raises(UnsupportedByXDiT, match="LoRA model.safetensors cannot be read: it is a Python pickle .* it was not opened"):
        with open_safetensors(path, "LoRA"):
            pass
    assert not marker.exists() and os.listdir(tmp_path) == ["model.safetensors"]


def test_other_suffixes_are_refused_before_opening(tmp_path):
    with pytest.raises(UnsupportedByXDiT, match="model.ckpt: XDiT reads .safetensors files only"):
        with open_safetensors(tmp_path / "model.ckpt", "diffusion model"):
            pass
