"""`make setup` on a fresh machine: uv is found or installed where the Makefile then looks for it.

The README's two commands start with `make setup`. These tests run the repository's real Makefile
with a clean HOME and a PATH that holds only a Python, make and the system tools (no uv), as on a
new machine, and once with a uv already on PATH. They install uv from PyPI with pip (the one
network use the project allows), so they need the package registry, as `make setup` itself does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _system_python() -> str:
    """A python3 outside this venv (the venv uv builds has no pip, a fresh machine's python has)."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    for name in ("python3.11", "python3"):
        found = shutil.which(name, path=path)
        if found and subprocess.run([found, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return found
    pytest.fail("no python3 with pip on PATH outside the venv: `make setup` needs one to install uv")


def _fresh_env(tmp_path: Path, extra_bin: Path | None = None) -> dict[str, str]:
    """HOME in tmp, PATH = [extra_bin] + a folder with python3 only + /usr/bin:/bin."""
    py_bin = tmp_path / "py-bin"
    py_bin.mkdir(exist_ok=True)
    python = _system_python()
    for name in ("python3", "python3.11"):
        link = py_bin / name
        if not link.exists():
            link.symlink_to(python)
    dirs = [str(py_bin), "/usr/bin", "/bin"]
    if extra_bin is not None:
        dirs.insert(0, str(extra_bin))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV", "MAKE"))}
    env.update(HOME=str(tmp_path / "home"), PATH=os.pathsep.join(dirs))
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def _make(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_fresh_machine_without_uv_installs_it_where_setup_uses_it(tmp_path):
    """No uv anywhere: `make uv` installs it into TOOLS and prints that path; set-up then calls it."""
    env = _fresh_env(tmp_path)
    assert shutil.which("uv", path=env["PATH"]) is None, "the clean PATH must not hold a uv"
    tools = tmp_path / "tools"
    out = _make(["uv", f"TOOLS={tools}"], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    uv = Path(out.stdout.strip().splitlines()[-1])
    assert uv == tools / "bin" / "uv"
    version = subprocess.run([str(uv), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("uv ")
    # The set-up recipe (dry run) creates the venv and installs with exactly that uv.
    plan = _make(["-n", "setup", f"TOOLS={tools}", f"VENV={tmp_path / 'venv'}"], env, REPO)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"{uv} venv {tmp_path / 'venv'}" in plan.stdout
    assert f"{uv} pip install" in plan.stdout


def test_uv_already_on_path_is_used_and_nothing_is_installed(tmp_path):
    """A uv on PATH wins: the Makefile installs no private copy."""
    real_uv = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")
    if not Path(real_uv).exists():
        pytest.fail("this test needs the uv `make setup` used (on PATH or in .tools/bin)")
    user_bin = tmp_path / "user-bin"
    user_bin.mkdir()
    (user_bin / "uv").symlink_to(real_uv)
    env = _fresh_env(tmp_path, extra_bin=user_bin)
    tools = tmp_path / "tools"
    out = _make(["uv", f"TOOLS={tools}"], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(user_bin / "uv")
    assert not tools.exists()
