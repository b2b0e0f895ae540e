"""podman as e2e/test_images.py drives it: the project's containers.conf (runc, cgroupfs, the caller's ulimits,
host network; docker/containers.conf says why), errors as one line with podman's own words."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = ROOT / "docker" / "containers.conf"


class PodmanError(RuntimeError):
    pass


def environment() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("podman") is None:
        raise PodmanError("podman is not installed (`make test-images` installs it with apt)")
    proc = subprocess.run(["podman", *args], env=environment(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[-1]
        raise PodmanError(f"podman {' '.join(args[:2])} failed: {last}")
    return proc


def cannot_run_containers(image: str) -> str | None:
    """Why no container can run here (None when one can): podman missing, the image missing, or the runtime
    refusing to start a container at all."""
    try:
        if podman("image", "exists", image, check=False).returncode != 0:
            return f"image {image} does not exist (build it with `make test-images`)"
        podman("run", "--rm", "--entrypoint", "true", image, timeout=120)
    except (PodmanError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None


def exit_code(container: str) -> int:
    return int(podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip())


def running(container: str) -> bool:
    proc = podman("inspect", "--format", "{{.State.Running}}", container, check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def logs(container: str, tail: int = 3000) -> str:
    proc = podman("logs", container, check=False)
    return (proc.stdout + proc.stderr)[-tail:]


def remove(*containers: str) -> None:
    for name in containers:
        podman("rm", "--force", "--time", "0", name, check=False)
