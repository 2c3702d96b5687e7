"""`vlmprune eval` and `vlmprune train` on the command line (real processes).

The eval runs use a micro model trained here by the real recipe code in a few seconds (its answers
are near chance; these tests check the command, not the accuracy: tests/testbed/test_demo.py checks
the shipped weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REQUIRED = {"accuracy", "samples", "visual_tokens", "kept_tokens", "per_family", "chance", "method", "ratio"}


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from tests.testbed.micro import train_micro

    out = train_micro(tmp_path_factory.mktemp("micro") / "model")
    return str(out)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vlmprune", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_eval_json_last_line(micro_model):
    """--samples 8 --json: the last stdout line is one JSON object with the required keys."""
    proc = _run("eval", "--model", micro_model, "--backend", "hf", "--method", "fastervlm", "--ratio", "0.75",
                "--samples", "8", "--seed", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert REQUIRED <= set(result)
    assert result["samples"] == 8 and result["visual_tokens"] == 256 and result["kept_tokens"] == 64
    assert set(result["per_family"]) == set(result["chance"]) == {"attribute", "count", "presence", "position", "glyph"}
    assert 0.0 <= result["accuracy"] <= 1.0


def test_eval_text_mode_ends_with_json(micro_model, capsys):
    """Without --json a table comes first, and the JSON object is still the last line (in-process)."""
    from vlmprune.cli import main

    assert main(["eval", "--model", micro_model, "--method", "random", "--ratio", "0.5", "--samples", "3",
                 "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"model {micro_model}")
    result = json.loads(lines[-1])
    assert result["kept_tokens"] == 128 and result["policy"]["method"] == "random"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--backend", "tgi"), "backend"),
        (("--ratio", "1.5"), "ratio"),
        (("--ratio", "abc"), "--ratio"),
        (("--method", "nope"), "nope"),
        (("--samples", "0"), "samples"),
        (("--model", "/no/such/model"), "neither"),
        (("--split", "dev"), "split"),
        (("--set", "oops"), "--set"),
    ],
    ids=["unknown-backend", "ratio", "ratio-text", "method", "samples", "model", "split", "set"],
)
def test_eval_user_errors(args, message, capsys):
    """User errors exit 2 with one `vlmprune: error:` line naming the problem (in-process, fast)."""
    from vlmprune.cli import main

    assert main(["eval", "--samples", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmprune: error:") and message in err


# `--backend vllm` is available now: tests/testbed/test_eval_vllm.py runs it against `--backend hf`.


@pytest.mark.parametrize("args, flag", [(("--steps", "0"), "--steps"), (("--threads", "0"), "--threads"),
                                        (("--vit-steps", "0"), "--vit-steps")])
def test_train_rejects_bad_arguments(args, flag, capsys):
    from vlmprune.cli import main

    assert main(["train", "demo", *args]) == 2
    assert flag in capsys.readouterr().err
