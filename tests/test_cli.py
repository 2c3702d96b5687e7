"""The ``vlmprune`` command line: methods, flops, policy, serve; user errors exit 2 without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmprune.policy import kept_count

from vlmprune.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPECTED_METHODS = {"fastervlm", "globalcom2", "aim", "transprune", "fastv", "explain", "random", "pool"}


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_methods_json_subprocess_lists_every_method():
    """`python -m vlmprune.cli methods --json` lists all methods with name, stage and models."""
    proc = _run("vlmprune.cli", "methods", "--json")
    assert proc.returncode == 0, proc.stderr
    methods = json.loads(proc.stdout)
    assert {m["name"] for m in methods} == EXPECTED_METHODS
    for m in methods:
        assert m["stage"] in ("pre_llm", "llm_input", "in_llm")
        assert isinstance(m["models"], list) and m["models"]
    assert next(m for m in methods if m["name"] == "globalcom2")["models"] == ["llava_next"]


def test_python_dash_m_vlmprune_and_lean_imports():
    """`python -m vlmprune methods` works, and the methods command imports no torch/transformers/vLLM."""
    proc = _run("vlmprune", "methods")
    assert proc.returncode == 0, proc.stderr
    assert "transprune" in proc.stdout and "in_llm" in proc.stdout
    code = (
        "import sys\nfrom vlmprune.cli import main\nrc = main(['methods', '--json'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'fastapi') if m in sys.modules]\n"
        "assert rc == 0 and not heavy, heavy\n"
    )
    proc = _run(code=code)
    assert proc.returncode == 0, proc.stderr


def test_methods_table(capsys):
    """Without --json: one readable line per method with its stage."""
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["method", "stage", "models"]
    assert {line.split()[0] for line in lines[1:]} == EXPECTED_METHODS


@pytest.mark.parametrize(
    "argv, field",
    [
        (["policy", "--method", "fastervlm", "--ratio", "1.5"], "'ratio'"),
        (["policy", "--method", "aim", "--ratio", "abc"], "'ratio'"),
        (["policy", "--method", "aim", "--set", "pagerank_iterations=0"], "'pagerank_iterations'"),
        (["policy", "--method", "aim", "--set", "bogus=1"], "'bogus'"),
        (["policy", "--method", "nope"], "'nope'"),
        (["policy", "--method", "globalcom2", "--model", "llava"], "'llava'"),
        (["policy", "--json", "[1, 2]"], "--json"),
        (["flops", "--ratios", "0,1.5"], "--ratios"),
        (["flops", "--text-tokens", "-3"], "--text-tokens"),
    ],
    ids=["ratio-range", "ratio-type", "option-range", "unknown-option", "unknown-method", "unsupported-model",
         "json-not-object", "flops-ratio", "flops-text"],
)
def test_user_errors_exit_2_naming_the_field(argv, field, capsys):
    """Invalid input: exit 2, one `vlmprune: error:` line naming the field, no traceback."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vlmprune: error: ")
    assert field in captured.err
    assert "Traceback" not in captured.err


def test_bad_ratio_subprocess_exit_code():
    """The installed entry point returns status 2 for a bad ratio, naming the field."""
    proc = _run("vlmprune", "policy", "--method", "transprune", "--ratio", "2")
    assert proc.returncode == 2
    assert "'ratio'" in proc.stderr and "Traceback" not in proc.stderr


def test_policy_prints_resolved_json(capsys):
    """A valid policy comes back with defaults filled in and the ratio bucketed."""
    assert main(["policy", "--method", "aim", "--ratio", "0.7512", "--set", "probe_layers=3"]) == 0
    policy = json.loads(capsys.readouterr().out)
    assert policy["method"] == "aim" and policy["ratio"] == 0.75
    assert policy["probe_layers"] == 3 and policy["merge_keep"] == 0.4375
    assert main(["policy", "--json", '{"method": "globalcom2", "ratio": 0.5}', "--model", "llava_next"]) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == 0.5


def test_flops_json_and_markdown(capsys):
    """`flops --json` rows fall with the ratio; the markdown names the papers' figures."""
    assert main(["flops", "--model", "llava-next-7b", "--ratios", "0,0.9", "--text-tokens", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("fastervlm", 0.0), ("fastervlm", 0.9), ("transprune", 0.0), ("transprune", 0.9)
    ]
    assert all(r["model"] == "llava-next-7b" and r["n_text"] == 10 for r in rows)
    assert rows[1]["total_tflops"] < rows[0]["total_tflops"] / 3
    assert {p["source"] for p in data["papers"]} == {"TransPrune", "FasterVLM", "GlobalCom2"}
    assert main(["flops"]) == 0
    out = capsys.readouterr().out
    assert "| llava-1.5-7b | transprune | 0.95 |" in out and "43.58" in out


def test_unknown_subcommand_is_an_argparse_error(capsys):
    """argparse's own errors also exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "vlmprune: error:" in capsys.readouterr().err


def test_serve_demo_prunes_the_prompt(capsys, tmp_path):
    """`demo` runs the reference backend: the prompt shrinks by the pruned tokens."""
    assert main(["demo", "--ratios", "0,0.9", "--max-new-tokens", "2", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0.000", "0.900"))]
    assert len(rows) == 2
    (_, visual0, kept0, prompt0, *_), (_, visual9, kept9, prompt9, *_) = rows
    assert visual0 == visual9 == kept0
    assert int(kept9) == kept_count(int(visual0), 0.9)
    assert int(prompt0) - int(prompt9) == int(kept0) - int(kept9)


def test_serve_demo_rejects_unfit_method(capsys):
    """A method that does not fit the demo model exits 2 naming both."""
    assert main(["demo", "--method", "globalcom2"]) == 2
    err = capsys.readouterr().err
    assert "globalcom2" in err and "llava" in err
