"""`make setup` installs the right vLLM per host: CPU torch overrides on CPU machines only.

The GPU path cannot run here (no CUDA), so its decision is checked with ``make -n`` (what make would
run, nothing executed) and against the pyproject settings that uv reads on every host.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_TORCH = ["torch==2.13.0", "torchvision==0.28.0"]


def setup_commands(flavour: str, tmp_path: Path) -> list[str]:
    """The commands `make setup FLAVOUR=...` would run for a fresh venv (``true`` stands in for uv)."""
    make = shutil.which("make")
    assert make, "make is needed (apt-get install make)"
    proc = subprocess.run(
        [make, "-n", "setup", f"FLAVOUR={flavour}", f"VENV={tmp_path / 'venv'}", f"UV={shutil.which('true')}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_gpu_flavour_installs_official_vllm_with_its_own_torch(tmp_path):
    """FLAVOUR=gpu: `.[gpu,...]`, no --override and no overrides file (vLLM's own torch pins hold)."""
    lines = setup_commands("gpu", tmp_path)
    (install,) = [line for line in lines if " pip install " in line]
    assert '-e ".[gpu,server,dev]"' in install
    assert "--override" not in install and not any("torch==" in line for line in lines)


def test_cpu_flavour_overrides_torch_for_the_cpu_wheel(tmp_path):
    """FLAVOUR=cpu: the CPU wheel with torch 2.13.0 / torchvision 0.28.0 forced by --override."""
    lines = setup_commands("cpu", tmp_path)
    (install,) = [line for line in lines if " pip install " in line]
    overrides = tmp_path / "venv" / "overrides.txt"
    assert f"--override {overrides}" in install and '-e ".[cpu,server,dev]"' in install
    (write,) = [line for line in lines if str(overrides) in line and " pip install " not in line]
    assert all(pin in write for pin in CPU_TORCH)


def test_unknown_flavour_is_refused(tmp_path):
    proc = subprocess.run(["make", "-n", "setup", "FLAVOUR=rocm", f"VENV={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "FLAVOUR must be cpu or gpu, got 'rocm'" in proc.stderr


def test_pyproject_pins_no_torch_for_uv():
    """uv reads [tool.uv] of the project folder in `uv pip install` too, so a torch override there
    would also pin the CUDA host's torch (vLLM 0.33 needs 2.14): the CPU pins live in the Makefile."""
    tool_uv = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]
    for key in ("override-dependencies", "constraint-dependencies"):
        assert not any(d.startswith(("torch", "torchvision")) for d in tool_uv.get(key, [])), key

