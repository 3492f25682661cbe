"""comfy_runtime against a real ComfyUI 0.30.0: locating, the cached-tree fast path, in-process and worker imports."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_xdit.comfy_runtime import (
    BYTECODE_STAMP,
    COMFYUI_VERSION,
    PREPARED_MARKER,
    SKIPPED_REQUIREMENTS,
    cached_comfyui,
    comfyui_path,
    comfyui_version,
    enclosing_comfyui,
    import_comfy,
    is_comfyui_checkout,
    requirement_lines,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "comfyui_xdit"
# Locating ComfyUI prefers the one a checkout sits in (custom_nodes/) over the cache: cache tests need neither.
not_in_custom_nodes = pytest.mark.skipif(enclosing_comfyui() is not None,
                                         reason="this checkout lives in a ComfyUI's custom_nodes/")


def _fake_checkout(path: Path, version: str = "0.0.1") -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "main.py").write_text("")
    (path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return path


def _python(code: str, env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=300)


def test_comfyui_path_is_comfyui_0_30_0(comfy_root: Path) -> None:
    path = comfyui_path()
    assert path == comfy_root
    assert is_comfyui_checkout(path)
    assert comfyui_version(path) == COMFYUI_VERSION == "0.30.0"
    import comfy.model_management

    assert Path(comfy.model_management.__file__).is_relative_to(comfy_root)


def test_comfyui_path_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_checkout(tmp_path / "MyComfy")
    monkeypatch.setenv("COMFYUI_PATH", str(fake))
    assert comfyui_path(prepare=False) == fake.resolve()


def test_comfyui_path_rejects_env_that_is_no_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="COMFYUI_PATH=.* is not a ComfyUI checkout"):
        comfyui_path()


@not_in_custom_nodes
def test_prepared_cache_is_used_without_pip(comfy_root: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYUI_PATH")
    monkeypatch.setenv("COMFYUI_XDIT_CACHE", str(tmp_path / "cache"))
    cached = _fake_checkout(cached_comfyui(), COMFYUI_VERSION)
    # The session's environment satisfies ComfyUI's requirements, so a marked tree is ready as it is.
    shutil.copy(comfy_root / "requirements.txt", cached / "requirements.txt")
    with pytest.raises(RuntimeError, match="setup-comfyui"):
        comfyui_path(prepare=False)  # not marked: a half-done preparation is never used
    (cached / PREPARED_MARKER).write_text("")
    module = cached / "comfy" / "model_management.py"
    module.write_text("DEVICE = 'cpu'\n")
    bytecode = Path(importlib.util.cache_from_source(str(module)))
    assert comfyui_path(prepare=False) == cached
    assert not bytecode.exists()  # a worker never writes to the tree
    assert comfyui_path(prepare=True) == cached  # no download, no pip: that would fail on this fake tree
    # A tree prepared before bytecode was part of preparing gets it now, once, whatever PYTHONDONTWRITEBYTECODE says.
    assert bytecode.is_file() and (cached / BYTECODE_STAMP).is_file()
    compiled_at = bytecode.stat().st_mtime_ns
    assert comfyui_path(prepare=True) == cached
    assert bytecode.stat().st_mtime_ns == compiled_at


@not_in_custom_nodes
def test_a_cache_that_cannot_take_bytecode_is_used_as_it_is(comfy_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import compileall

    monkeypatch.delenv("COMFYUI_PATH")
    monkeypatch.setenv("COMFYUI_XDIT_CACHE", str(tmp_path / "cache"))
    cached = _fake_checkout(cached_comfyui(), COMFYUI_VERSION)
    shutil.copy(comfy_root / "requirements.txt", cached / "requirements.txt")
    (cached / PREPARED_MARKER).write_text("")

    def read_only(*args, **kwargs):  # what a shared cache mounted read-only answers (root could write a chmod-ed one)
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(compileall, "compile_dir", read_only)
    assert comfyui_path(prepare=True) == cached
    assert not (cached / BYTECODE_STAMP).exists()
    assert "could not write ComfyUI's bytecode" in capsys.readouterr().err


def test_requirement_lines_leave_torch_alone(comfy_root: Path) -> None:
    from packaging.requirements import Requirement

    names = {Requirement(line).name.lower() for line in requirement_lines(comfy_root)}
    assert "einops" in names and "transformers" in names
    assert not names & SKIPPED_REQUIREMENTS


@pytest.mark.parametrize("layout", ["copy", "symlink"])
def test_repo_inside_custom_nodes_uses_that_comfyui(tmp_path: Path, layout: str) -> None:
    host = _fake_checkout(tmp_path / "ComfyUI")
    repo = host / "custom_nodes" / "comfyui-xdit"
    if layout == "copy":
        shutil.copytree(PACKAGE_DIR, repo / "comfyui_xdit", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        elsewhere = tmp_path / "src" / "comfyui-xdit"
        shutil.copytree(PACKAGE_DIR, elsewhere / "comfyui_xdit", ignore=shutil.ignore_patterns("__pycache__"))
        repo.parent.mkdir()
        repo.symlink_to(elsewhere)
    env = {key: value for key, value in os.environ.items() if key != "COMFYUI_PATH"}
    env["PYTHONPATH"] = str(repo)
    result = _python("from comfyui_xdit.comfy_runtime import comfyui_path; print(comfyui_path(prepare=False))",
                     env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == host.resolve()


def test_import_comfy_is_idempotent(comfy_root: Path, tmp_path: Path) -> None:
    assert import_comfy() == comfy_root
    assert import_comfy(comfy_root) == comfy_root
    assert os.environ["COMFYUI_PATH"] == str(comfy_root)
    with pytest.raises(RuntimeError, match="already imported"):
        import_comfy(_fake_checkout(tmp_path / "Other"))


def test_worker_subprocess_imports_the_same_comfyui(comfy_root: Path) -> None:
    code = (
        "import importlib.util\n"
        "from comfyui_xdit.comfy_runtime import init_worker\n"
        "root = init_worker()\n"
        "import comfy.model_management as mm\n"
        "print(root)\n"
        "print(importlib.util.find_spec('nodes').origin)\n"
        "print(mm.get_torch_device().type)\n"
    )
    # Run from the repository root, whose nodes/ folder must not shadow ComfyUI's nodes.py.
    result = _python(code, dict(os.environ))
    assert result.returncode == 0, result.stderr
    root, nodes_origin, device = result.stdout.strip().splitlines()[-3:]
    assert Path(root) == comfy_root
    assert Path(nodes_origin) == comfy_root / "nodes.py"
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")


_WORKER_COMPUTE = (
    "import json\n"
    "from comfyui_xdit.comfy_runtime import init_worker\n"
    "init_worker(cpu=True)\n"
    "import comfy.cli_args, comfy.model_management as mm, comfy.ldm.modules.attention as attention\n"
    "print(json.dumps({'attention': attention.optimized_attention.__name__, 'unet_dtype': str(mm.unet_dtype()),\n"
    "                  'fast': sorted(f.value for f in comfy.cli_args.args.fast)}))\n"
)


def test_a_worker_computes_with_the_comfyui_processs_compute_arguments(comfy_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI started with --use-split-cross-attention --bf16-unet --fast autotune (and --port, which stays
    behind): a worker imports ComfyUI with the same attention kernel, model dtype and fast features."""
    import comfy.cli_args

    from comfyui_xdit.comfy_args import COMFY_ARGS_ENV, compute_args_env

    args = comfy.cli_args.args
    assert compute_args_env() == {}, "a ComfyUI with default arguments carries none"
    monkeypatch.setattr(args, "use_split_cross_attention", True)
    monkeypatch.setattr(args, "bf16_unet", True)
    monkeypatch.setattr(args, "fast", {comfy.cli_args.PerformanceFeature.AutoTune})
    monkeypatch.setattr(args, "port", 9999)
    carried = compute_args_env()
    assert json.loads(carried[COMFY_ARGS_ENV]) == {"bf16_unet": True, "fast": ["autotune"], "use_split_cross_attention": True}
    default = _python(_WORKER_COMPUTE, dict(os.environ))
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout.splitlines()[-1]) == {"attention": "attention_sub_quad", "unet_dtype": "torch.float32", "fast": []}
    worker = _python(_WORKER_COMPUTE, {**os.environ, **carried})
    assert worker.returncode == 0, worker.stderr
    assert json.loads(worker.stdout.splitlines()[-1]) == {"attention": "attention_split", "unet_dtype": "torch.bfloat16", "fast": ["autotune"]}


def test_a_worker_refuses_a_compute_argument_its_comfyui_lacks(comfy_root: Path) -> None:
    from comfyui_xdit.comfy_args import COMFY_ARGS_ENV

    result = _python(_WORKER_COMPUTE, {**os.environ, COMFY_ARGS_ENV: json.dumps({"use_future_attention": True})})
    assert result.returncode != 0
    assert "no argument(s) ['use_future_attention']" in result.stderr and "same ComfyUI version" in result.stderr


@not_in_custom_nodes
def test_worker_without_prepared_comfyui_fails_fast(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "COMFYUI_PATH"}
    env["COMFYUI_XDIT_CACHE"] = str(tmp_path / "empty-cache")
    result = _python("from comfyui_xdit.comfy_runtime import init_worker; init_worker()", env)
    assert result.returncode != 0
    assert "setup-comfyui" in result.stderr
    assert not (tmp_path / "empty-cache").exists()



@pytest.mark.fast
def test_pip_output_drops_missing_index_warnings_and_keeps_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from comfyui_xdit.comfy_runtime import _pip

    # An index and a find-links folder that do not exist: pip warns about each (two wordings), then fails; no network.
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    with pytest.raises(RuntimeError, match="failed"):
        _pip("download", "--no-deps", "-d", str(tmp_path / "downloads"), "no-such-package-xdit")
    shown = capsys.readouterr().err
    assert "No matching distribution found for no-such-package-xdit" in shown
    assert "is ignored" not in shown, shown
