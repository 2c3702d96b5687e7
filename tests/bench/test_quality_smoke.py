"""bench/quality.py end to end on a micro model (real transformers backend, real pruning; the
micro model's answers are near chance, so this checks the benchmark's plumbing and outputs, not
accuracy: bench/results/quality_demo.* holds the real run on the shipped demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import load_bench


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    from tests.testbed.micro import train_micro

    return train_micro(tmp_path_factory.mktemp("micro") / "model")


def test_quality_writes_table_plot_and_json(micro, tmp_path, capsys):
    """Two methods x two ratios: ratio 0 shared, kept tokens match the ratio, explain without CNN
    weights is reported as skipped (with the reason) instead of silently dropped."""
    quality = load_bench("quality")
    stem = tmp_path / "q"
    assert quality.main(["--model", str(micro), "--methods", "fastervlm,random,explain", "--ratios", "0.5,0.9",
                         "--samples", "5", "--out", str(stem)]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["ratios"] == [0.0, 0.5, 0.9]
    assert set(data["cells"]) == {"fastervlm", "random"}
    assert "relevance-CNN" in data["skipped"]["explain"]
    for method, row in data["cells"].items():
        assert row["0.0"] is data["cells"]["fastervlm"]["0.0"] or row["0.0"] == data["cells"]["fastervlm"]["0.0"]
        assert row["0.5"]["kept_tokens"] == 128 and row["0.9"]["kept_tokens"] == 26
        assert row["0.9"]["samples"] == 5
    md = stem.with_suffix(".md").read_text()
    assert "| fastervlm |" in md and "| random |" in md and "Skipped `explain`" in md
    assert stem.with_suffix(".png").stat().st_size > 1000
    # Re-rendering an earlier run gives the same table without evaluating anything.
    stem.with_suffix(".md").unlink()
    assert quality.main(["--from-json", str(stem.with_suffix(".json"))]) == 0
    assert stem.with_suffix(".md").read_text() == md


def test_explain_floor_and_ceiling_rows_and_merge(micro, tmp_path):
    """``explain-input`` (the CNN replaced by its raw input) and ``oracle`` (the teacher's relevance)
    run the explain pipeline without CNN weights and keep explain's count; ``--merge`` re-runs one
    row and keeps the saved others; explain_scores outside explain is a ValueError."""
    from vlmprune.evaluate import evaluate

    quality = load_bench("quality")
    stem = tmp_path / "q"
    args = ["--model", str(micro), "--ratios", "0.5", "--samples", "3", "--out", str(stem)]
    assert quality.main([*args, "--methods", "explain-input,oracle"]) == 0
    first = json.loads(stem.with_suffix(".json").read_text())
    assert list(first["cells"]) == ["explain-input", "oracle"]
    for row in first["cells"].values():
        assert row["0.5"]["kept_tokens"] == 128 and row["0.5"]["policy"]["method"] == "explain"
    assert [first["cells"][r]["0.5"]["explain_scores"] for r in ("explain-input", "oracle")] == ["input", "oracle"]
    assert quality.main([*args, "--methods", "random", "--merge"]) == 0
    merged = json.loads(stem.with_suffix(".json").read_text())
    assert list(merged["cells"]) == ["explain-input", "oracle", "random"]
    assert merged["cells"]["oracle"] == first["cells"]["oracle"]
    assert merged["merges"][-1]["rows"] == ["random"]
    with pytest.raises(ValueError, match="--merge"):
        quality.main([*args[:-4], "--samples", "2", "--out", str(stem), "--methods", "random", "--merge"])
    with pytest.raises(ValueError, match="explain_scores"):
        evaluate(micro, "fastervlm", 0.5, samples=1, explain_scores="oracle", progress=False)
    with pytest.raises(ValueError, match="explain_scores"):
        evaluate(micro, "explain", 0.5, samples=1, explain_scores="teacher", progress=False)
