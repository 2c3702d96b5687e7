"""Training of the explain relevance CNN (vlmprune/testbed/train_explain.py, `vlmprune train explain`).

The micro model (tests/testbed/micro.py) has the demo's architecture but answers near chance, so the
runs here pass ``only_correct=False`` / ``--keep-wrong``: they check the plumbing (teacher labels,
student inputs, checkpoint, report, auto-discovery by the explain method, CLI errors), not quality.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.testbed.micro import train_micro
from vlmprune.core.explain import CHECKPOINT_NAME, RelevanceCNN
from vlmprune.testbed import train_explain as TE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return train_micro(tmp_path_factory.mktemp("explain") / "micro")


@pytest.fixture(scope="module")
def trained(micro):
    """One default-location training run, shared by the checks below."""
    cfg = TE.ExplainTrainConfig(samples=6, epochs=2, batch_size=4, only_correct=False)
    report = TE.train_explain(micro, cfg=cfg, threads=1, progress=False, log=lambda m: None)
    return micro, report


def test_checkpoint_report_and_auto_discovery(trained):
    """The checkpoint lands beside the model, loads, and `eval --method explain` finds it alone."""
    from vlmprune.evaluate import evaluate

    model_dir, report = trained
    ckpt = model_dir / CHECKPOINT_NAME
    assert report["out"] == str(ckpt) and ckpt.is_file()
    assert isinstance(RelevanceCNN.load(ckpt), RelevanceCNN)

    saved = json.loads(ckpt.with_suffix(".json").read_text())
    assert saved["samples"] == 6 and saved["used"] == 6
    assert saved["train_samples"] + saved["val_samples"] == 6 and saved["val_samples"] == 1
    assert len(saved["history"]) == 2 and saved["tokens_per_sample"] == 256
    assert 0.0 <= saved["teacher_accuracy"] <= 1.0
    val = saved["val"]
    assert val["kl"] >= 0 and 0.0 <= val["top50_recall"] <= 1.0 and 0.0 <= val["top50_recall_input_attention"] <= 1.0
    assert saved["timings"]["label_s_per_sample"] > 0

    result = evaluate(model_dir, "explain", 0.75, samples=3, progress=False)  # no checkpoint given
    assert result["samples"] == 3 and result["kept_tokens"] == 64 and result["visual_tokens"] == 256


def test_teacher_labels_and_student_inputs(trained):
    """Cached labels: teacher R_v is (N,), non-negative with positive mass; the student input is a
    (N,) slice of a softmax (non-negative, at most 1 in total)."""
    model_dir, _ = trained
    cache = torch.load(TE.labels_path(model_dir / CHECKPOINT_NAME), weights_only=True)
    assert len(cache["records"]) == 6 and cache["fingerprint"] == TE.model_fingerprint(model_dir)
    for rec in cache["records"]:
        teacher, student = rec["teacher"], rec["student"]
        assert teacher.shape == (256,) and student.shape == (256,)
        assert (teacher >= 0).all() and teacher.sum() > 0 and torch.isfinite(teacher).all()
        assert (student >= 0).all() and 0 < student.sum() <= 1 + 1e-5


def test_student_input_is_what_inference_scores(micro, trained, monkeypatch):
    """explain_inputs (the trainer's input) equals, bitwise, the vector the explain method hands
    the CNN during a pruned prefill of the same request."""
    from vlmprune.backends.hf import ReferenceBackend, Request
    from vlmprune.testbed import scenes

    engine = ReferenceBackend.from_pretrained(micro)
    s = scenes.sample("train", 0)
    req = Request(s.question, [scenes.render(s.scene, engine.model.config.vision_config.image_size)])
    seen = []
    original = RelevanceCNN.relevance
    monkeypatch.setattr(RelevanceCNN, "relevance", lambda self, attn: seen.append(attn.clone()) or original(self, attn))
    engine.prefill([req], {"method": "explain", "ratio": 0.5})
    (seq, images), = engine.sequences([req])
    assert len(seen) == 1 and torch.equal(seen[0], engine.explain_inputs(seq, images)[0])

    rel = TE.chefer_relevance(engine, seq, [int(engine.tokenizer.convert_tokens_to_ids("red"))])
    assert rel.shape == (seq.length,) and (rel >= 0).all() and rel[seq.image_spans[0]].sum() > 0


def test_labels_resume_from_cache(micro, tmp_path):
    """A second run labels only the samples the cache lacks; wrong answers skip the teacher while
    only_correct, and get one once wrong samples are wanted."""
    cache = tmp_path / "cnn.labels.pt"
    records, stats = TE.label_samples(micro, cache, 2, only_correct=True, progress=False, log=lambda m: None)
    assert stats["new"] == 2 and all((r["teacher"] is None) == (not r["correct"]) for r in records)
    records, stats = TE.label_samples(micro, cache, 3, only_correct=False, progress=False, log=lambda m: None)
    assert stats["new"] == 1 and len(records) == 3 and all(r["teacher"] is not None for r in records)
    records, stats = TE.label_samples(micro, cache, 3, only_correct=False, progress=False, log=lambda m: None)
    assert stats["new"] == 0 and stats["processed"] >= 3


def test_cli_trains_to_out(micro, tmp_path, capsys):
    """`vlmprune train explain` writes --out (+ its JSON) and prints one JSON line."""
    from vlmprune.cli import main

    out = tmp_path / "cnn.pt"
    code = main(["train", "explain", "--model", str(micro), "--out", str(out), "--samples", "3", "--epochs", "1",
                 "--keep-wrong", "--threads", "1", "--no-progress"])
    assert code == 0 and out.is_file() and out.with_suffix(".json").is_file()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["out"] == str(out) and line["samples"] == 3 and line["used"] == 3


def test_cli_trains_a_grid_cnn(micro, tmp_path):
    """``--cnn grid`` trains the 2-D CNN over the model's patch grid, ``--cnn-channels`` sizes it; the
    checkpoint loads as a grid CNN that the explain method scores with."""
    from vlmprune.cli import main
    from vlmprune.core.explain import RelevanceCNN
    from vlmprune.testbed.train_explain import patch_grid

    out = tmp_path / "grid.pt"
    assert main(["train", "explain", "--model", str(micro), "--out", str(out), "--samples", "3", "--epochs", "1",
                 "--keep-wrong", "--threads", "1", "--no-progress", "--cnn", "grid", "--cnn-channels", "4,8"]) == 0
    model = RelevanceCNN.load(out)
    rows, cols = patch_grid(micro)
    assert model.config.grid == (rows, cols) and model.config.channels == (4, 8)
    assert model.relevance(torch.rand(rows * cols)).shape == (rows * cols,)


@pytest.mark.parametrize(
    "args, flag",
    [
        (("--cnn-channels", "4,x"), "--cnn-channels"),
        (("--cnn-channels", "0"), "--cnn-channels"),
        (("--samples", "0"), "--samples"),
        (("--epochs", "0"), "--epochs"),
        (("--batch-size", "0"), "--batch-size"),
        (("--threads", "0"), "--threads"),
        (("--seed", "-1"), "--seed"),
        (("--steps", "5"), "--steps"),
    ],
)
def test_cli_rejects_bad_arguments(micro, args, flag, capsys):
    from vlmprune.cli import main

    assert main(["train", "explain", "--model", str(micro), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmprune: error:") and flag in err


def test_cli_model_errors(tmp_path, capsys):
    """A missing or junk --model, and explain flags given to `train demo`, are user errors."""
    from vlmprune.cli import main

    assert main(["train", "explain"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["train", "explain", "--model", str(tmp_path / "missing")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["train", "demo", "--samples", "5"]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["train", "demo", "--cnn", "grid"]) == 2
    assert "--cnn" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["ranks", "pairwise"])
def test_cli_trains_with_a_ranking_loss(micro, tmp_path, capsys, loss):
    """``--loss ranks|pairwise`` trains the same CNN (same checkpoint format, any N) against the
    teacher's order; the report names the loss and gives recall at every keep fraction, for the
    student and for its raw input."""
    from vlmprune.cli import main

    out = tmp_path / f"{loss}.pt"
    assert main(["train", "explain", "--model", str(micro), "--out", str(out), "--samples", "4", "--epochs", "2",
                 "--keep-wrong", "--threads", "1", "--no-progress", "--loss", loss, "--cnn-channels", "4,8"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["loss"] == loss and line["train_kl"] is None and line["train_loss"] >= 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["loss"] == loss
    for pct in (50, 25, 10, 5):
        for what in ("top", "mass"):
            for key in (f"{what}{pct}_recall", f"{what}{pct}_recall_input_attention"):
                assert 0.0 <= report["val"][key] <= 1.0, key
    model = RelevanceCNN.load(out)
    assert model.config.channels == (4, 8) and model.relevance(torch.rand(300)).shape == (300,)
    with pytest.raises(SystemExit) as exc:  # argparse's choices: usage error, exit 2
        main(["train", "explain", "--model", str(micro), "--loss", "mse"])
    assert exc.value.code == 2 and "--loss" in capsys.readouterr().err
