"""Stop what is left of a private Ray cluster: kill the processes still running after a grace period, then remove
the cluster's folder. In-process for a normal shutdown; as a detached process of its own (`python -m
ray_backend.reaper PLAN`) when ComfyUI ends, since Ray may end ComfyUI's process before it could do either."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil


def reap(processes: list[psutil.Process], grace_s: float = 5.0, folder: Path | None = None) -> None:
    """SIGKILL whatever of `processes` is still running after `grace_s`, then remove `folder` (nothing writes to it
    any more)."""
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def reap_detached(processes: list[psutil.Process], grace_s: float, folder: Path | None) -> None:
    """reap() in a new process of its own session, so that neither this process's end nor a terminal's Ctrl-C stops
    it. Processes are named by pid and start time: a pid reused meanwhile is left alone."""
    named = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            named.append([process.pid, process.create_time()])
    plan = json.dumps({"processes": named, "grace_s": grace_s, "folder": str(folder) if folder else None})
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    subprocess.Popen([sys.executable, "-m", "ray_backend.reaper", plan], env=env, start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _main(plan_json: str) -> None:
    plan = json.loads(plan_json)
    processes = []
    for pid, started in plan["processes"]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.create_time() == started:
                processes.append(process)
    reap(processes, plan["grace_s"], Path(plan["folder"]) if plan["folder"] else None)


if __name__ == "__main__":
    _main(sys.argv[1])
