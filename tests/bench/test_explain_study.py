"""bench/explain_study.py: held-out recall of CNN variants from a label cache (records of the
shape ``vlmprune train explain`` caches; here synthetic attention with a learnable teacher)."""

from __future__ import annotations

import json

import torch

from tests.bench import load_bench
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig
from vlmprune.testbed.train_explain import topk_recall


def test_study_measures_checkpoints_and_trained_variants_on_the_test_records(tmp_path):
    study = load_bench("explain_study")
    gen = torch.Generator().manual_seed(0)
    records = []
    for i in range(30):
        attn = torch.rand(48, generator=gen)
        records.append({"index": i, "correct": i != 3, "student": attn, "teacher": attn.roll(1)})
    torch.save({"records": records}, tmp_path / "c.labels.pt")
    ckpt = tmp_path / "cnn.pt"
    RelevanceCNN(RelevanceCNNConfig(channels=(4,), kernel_size=3)).save(ckpt)
    out = tmp_path / "study.json"
    variants = [{"name": "ckpt", "checkpoint": str(ckpt)}, {"name": "ranks", "loss": "ranks", "channels": [4, 8],
                                                             "epochs": 2, "batch_size": 8}]
    assert study.main([str(tmp_path / "c.labels.pt"), str(out), json.dumps(variants), "--pool", "20"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"ckpt", "ranks"} and data["ranks"]["best_epoch"] in (1, 2)
    assert data["ckpt"]["test_samples"] == 10  # records 20..29, all answered correctly
    model = RelevanceCNN.load(ckpt)
    want = sum(topk_recall(model.relevance(r["student"]), r["teacher"], 0.5) for r in records[20:]) / 10
    assert abs(data["ckpt"]["top50_recall"] - want) < 1e-3
    for key in ("top10_recall", "mass10_recall", "top5_recall_input_attention"):
        assert 0.0 <= data["ranks"][key] <= 1.0
