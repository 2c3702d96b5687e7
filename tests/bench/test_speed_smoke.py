"""bench/speed.py: its FLOPs ideal, summaries, targets and writers; and (slow) one real ``--quick`` run.

The fast tests feed the summariser synthetic samples (no engine). The ``slow`` test runs the whole
benchmark on the quick model with real stock and plugin vLLM engines (about 1-3 min on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.bench import BENCH_DIR, load_bench

BENCH = BENCH_DIR / "speed.py"


speed = load_bench("speed")  # puts bench/ on sys.path, where its parts live (bench/speedbench/)
from speedbench import bench_model, report, summary, workload  # noqa: E402


def _hf_config(model=None):
    """The transformers config of a bench model spec (no weights built)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    m = model or bench_model.QUICK_MODEL
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=m.image_size, patch_size=m.patch_size, hidden_size=m.vit_hidden,
            intermediate_size=m.vit_intermediate, num_hidden_layers=m.vit_layers, num_attention_heads=m.vit_heads,
        ),
        text_config=LlamaConfig(
            vocab_size=80, hidden_size=m.lm_hidden, intermediate_size=m.lm_intermediate, num_hidden_layers=m.lm_layers,
            num_attention_heads=m.lm_heads, num_key_value_heads=m.lm_kv_heads, head_dim=m.lm_hidden // m.lm_heads,
        ),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def test_ideal_speedup_is_the_flops_ratio():
    """ideal = prefill_flops(576) / prefill_flops(kept), vision included; 1 at no pruning, grows as tokens go."""
    from vlmprune import flops

    config = _hf_config(bench_model.FULL_MODEL)
    vision, lm = flops.from_hf_config(config)
    assert vision.patches_per_view == 576 and lm.layers == bench_model.FULL_MODEL.lm_layers
    assert summary.ideal_speedup(config, 40, 576, 576)["ideal"] == pytest.approx(1.0)
    got = summary.ideal_speedup(config, 40, 576, 58)
    want = flops.prefill_flops(lm, 40, 576, vision).total / flops.prefill_flops(lm, 40, 58, vision).total
    assert got["ideal"] == pytest.approx(want)
    # The vision tower is not pruned: the LLM-only ideal is higher.
    assert 1 < got["ideal"] < got["ideal_llm_only"]
    # The full bench model is LLM-dominated, as LLaVA-1.5-7B is (its tower is ~4 % of prefill).
    assert got["vision_share"] < 0.1
    assert summary.ideal_speedup(config, 40, 576, 29)["ideal"] > got["ideal"]


@pytest.mark.parametrize(
    ("method", "ratio", "kept"),
    [("fastervlm", 0.9, 58), ("random", 0.95, 29), ("pool", 0.75, 144), ("aim", 0.9, 58), ("transprune", 0.5, 288),
     ("fastervlm", 0.0, 576), (None, 0.0, 576)],
    ids=["fastervlm-0.9", "random-0.95", "pool-0.75", "aim-0.9", "transprune-0.5", "ratio0", "stock"],
)
def test_expected_kept_follows_kept_count(method, ratio, kept):
    """In vLLM every method prunes at the LLM input to kept_count(576, ratio); stock and ratio 0 keep all."""
    config = workload.Config("x", "plugin" if method else "stock", method, ratio)
    assert summary.expected_kept(config, 576, 12) == kept


def test_ideal_with_scoring_counts_the_probe():
    """Probe methods pay for their scoring (ideal + scoring < ideal); random and pool score nothing."""
    config = _hf_config(bench_model.FULL_MODEL)
    for method in ("transprune", "aim", "explain", "fastervlm"):
        got = summary.ideal_speedup(config, 40, 576, 58, workload.Config("x", "plugin", method, 0.9), 9)
        assert got["scoring_gflops"] > 0 and got["ideal_with_scoring"] < got["ideal"], method
    pool = summary.ideal_speedup(config, 40, 576, 58, workload.Config("x", "plugin", "pool", 0.9), 9)
    assert pool["scoring_gflops"] == 0 and pool["ideal_with_scoring"] == pool["ideal"]


def test_percentile():
    """Linear interpolation between order statistics; empty input is an error."""
    assert summary.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert summary.percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert summary.percentile([5.0], 90) == 5.0
    with pytest.raises(ValueError):
        summary.percentile([], 50)


def test_configs_and_requests_are_shared():
    """Every configuration gets the same prompt and image for a request index; instruction only where needed."""
    configs = workload.make_configs(["fastervlm", "pool"], [0.0, 0.5, 0.9])
    assert [c.name for c in configs] == ["stock", "plugin r=0", "fastervlm r=0.5", "fastervlm r=0.9", "pool r=0.5",
                                         "pool r=0.9", "engine ideal r=0.5", "engine ideal r=0.9"]
    a, b = workload.request_spec(3, configs[0]), workload.request_spec(3, configs[3])
    assert (a["question"], a["seed"]) == (b["question"], b["seed"])
    assert a["policy"] is None and b["policy"] == {"method": "fastervlm", "ratio": 0.9}
    assert a["text_only_ratio"] is None and b["text_only_ratio"] is None
    ideal = workload.request_spec(3, configs[-1])
    assert (ideal["question"], ideal["policy"], ideal["text_only_ratio"]) == (a["question"], None, 0.9)
    tp = workload.Config("t", "plugin", "transprune", 0.9).policy("what is this ?")
    assert tp["instruction"] == "what is this ?"


def _synthetic(configs, stock_ttft=2.0, r0_factor=1.0, reps=5):
    """Samples where TTFT scales with the prompt length (an ideal engine) plus a fixed 0.1 s."""
    samples = {}
    for c in configs:
        served = kept = summary.expected_kept(c, 576, 2)
        if c.engine == "inllm":  # TTFT from the mean tokens per layer, prompt length as served
            kept = round(sum(summary.visual_per_layer(c, 576, 2)) / 2)
        ttft = 0.1 + (stock_ttft - 0.1) * (kept + 40) / (576 + 40)
        if c.name == "plugin r=0":
            ttft *= r0_factor
        samples[c.name] = {
            "ttft": [ttft * (1 + 0.01 * i) for i in range(reps)],
            "prompt_len": [served + 40] * reps,
            "embed": [{"embed_s": 0.05, "tower_s": 0.04, "plugin_s": 0.01, "images": 1}] * reps,
            "rps": [1 / ttft, 1.1 / ttft],
        }
    return {"samples": samples, "loadavg_1min": [1.0, 2.0]}


def _result(configs, data):
    meta = {
        "tag": "test", "model": dataclasses.asdict(bench_model.QUICK_MODEL), "n_visual": 576, "params_m": 1.0,
        "vllm": "0.32.0", "cpu": "x86_64", "cores": 2, "start_s": {"stock": 5.0, "plugin": 6.0}, "reps": 5,
        "batch": 4, "rounds": 2, "tries": 1, "loadavg_1min": data["loadavg_1min"], "wall_s": 60.0, "command": "python bench/speed.py",
    }
    result = {"meta": meta, "samples": data["samples"]}
    result["rows"] = summary.summarize(configs, data, _hf_config(), 576)
    result["targets"] = summary.targets(result["rows"])
    return result


def test_summary_targets_and_writers(tmp_path):
    """Speedups, targets and the three output files from synthetic samples."""
    configs = workload.make_configs(["fastervlm", "aim"], [0.0, 0.5, 0.9])
    result = _result(configs, _synthetic(configs, r0_factor=1.05))
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["stock"]["speedup_p50"] == pytest.approx(1.0)
    assert rows["fastervlm r=0.9"]["kept_tokens"] == 58
    assert rows["fastervlm r=0.9"]["speedup_p50"] > rows["fastervlm r=0.5"]["speedup_p50"] > 1
    assert rows["plugin r=0"]["speedup_paired"] == pytest.approx(1 / 1.05)
    tg = result["targets"]
    assert tg["ratio0_ttft_vs_stock"] == pytest.approx(0.05)
    assert tg["ratio0_within_3pct"] is False
    assert set(tg["at_0.9"]) == {"fastervlm", "aim"}
    assert tg["at_0.9"]["fastervlm"]["share"] == pytest.approx(rows["fastervlm r=0.9"]["speedup_p50"] / rows["fastervlm r=0.9"]["ideal"])

    paths = report.write_outputs(result, tmp_path, "test")
    assert set(paths) == {"json", "md", "png"}
    data = json.loads(paths["json"].read_text())
    assert {"meta", "samples", "rows", "targets"} <= set(data)
    md = paths["md"].read_text()
    assert "| fastervlm r=0.9 | plugin | 58 |" in md and "NOT met" in md and "+5.0 %" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_in_llm_configs_and_names():
    """In-LLM methods get an in-LLM row and (both) a probe row; fastv has no probe; off keeps old names."""
    both = workload.make_configs(["fastervlm", "transprune", "fastv"], [0.0, 0.9], "both")
    assert [(c.name, c.engine) for c in both] == [
        ("stock", "stock"), ("plugin r=0", "plugin"), ("fastervlm r=0.9", "plugin"), ("transprune r=0.9", "inllm"),
        ("transprune (probe) r=0.9", "plugin"), ("fastv r=0.9", "inllm"), ("engine ideal r=0.9", "stock"),
    ]
    only = workload.make_configs(["aim", "fastv"], [0.9], "only")
    assert [(c.name, c.engine) for c in only] == [
        ("stock", "stock"), ("plugin r=0", "inllm"), ("aim r=0.9", "inllm"), ("fastv r=0.9", "inllm"),
        ("engine ideal r=0.9", "stock"),
    ]
    assert only[1].method == "aim"
    off = workload.make_configs(["aim"], [0.9], "off")
    assert [(c.name, c.engine) for c in off][2] == ("aim r=0.9", "plugin")
    with pytest.raises(ValueError, match="fastv"):
        workload.make_configs(["fastv"], [0.9], "off")


def test_in_llm_kept_and_ideal_count_per_layer():
    """In-LLM rows: the prompt keeps every token (transprune, fastv) or AIM's merge count, and the
    ideal is the FLOPs ratio over the per-layer counts, higher than the same count at layer 0 only."""
    from vlmprune import flops

    layers = bench_model.FULL_MODEL.lm_layers
    config = _hf_config(bench_model.FULL_MODEL)
    for method in ("transprune", "fastv"):
        assert summary.expected_kept(workload.Config("x", "inllm", method, 0.9), 576, layers) == 576
    aim_in = workload.Config("x", "inllm", "aim", 0.9)
    per_layer = summary.visual_per_layer(aim_in, 576, layers)
    assert summary.expected_kept(aim_in, 576, layers) == per_layer[0] < 576
    fastv = workload.Config("x", "inllm", "fastv", 0.9)
    fv = summary.visual_per_layer(fastv, 576, layers)
    assert fv[0] == 576 and fv[-1] < 576 and len(fv) == layers
    vision, lm = flops.from_hf_config(config)
    got = summary.ideal_speedup(config, 40, 576, fv, fastv, 9)
    assert got["ideal"] == pytest.approx(
        flops.prefill_flops(lm, 40, 576, vision).total / flops.prefill_flops(lm, 40, fv, vision).total
    )
    assert 1 < got["ideal"] < summary.ideal_speedup(config, 40, 576, fv[-1])["ideal"]
    assert 0 < got["scoring_gflops"] and got["ideal_with_scoring"] < got["ideal"]


def test_summary_with_in_llm_rows(tmp_path):
    """An in-LLM row next to its probe row: same label scheme in the targets, KV blocks equal to stock."""
    configs = workload.make_configs(["fastervlm", "transprune"], [0.0, 0.9], "both")
    data = _synthetic(configs)
    cfg = _hf_config()
    rows = {r["config"]: r for r in summary.summarize(configs, data, cfg, 576, block_size=16)}
    tp, probe, stock = rows["transprune r=0.9"], rows["transprune (probe) r=0.9"], rows["stock"]
    assert tp["kept_tokens"] == 576 and tp["kv_blocks"] == stock["kv_blocks"] == -(-stock["prompt_len"] // 16)
    assert probe["kept_tokens"] == 58 and probe["kv_blocks"] < stock["kv_blocks"]
    assert tp["kept_per_layer"] == summary.visual_per_layer(configs[3], 576, 2) and tp["kept_mean"] < 576
    result = _result(configs, data)
    assert set(result["targets"]["at_0.9"]) == {"fastervlm", "transprune", "transprune (probe)"}
    md = report.render_markdown(result)
    assert "| transprune r=0.9 | inllm | 576 |" in md and "| transprune (probe) r=0.9 | plugin | 58 |" in md


def test_breakdown_and_engine_ideal():
    """The TTFT split of the fastest repetition, and the engine ideal: stock's TTFT with its LLM
    forward replaced by the text row's, median over paired repetitions."""
    configs = workload.make_configs(["fastervlm"], [0.0, 0.9])
    data = _synthetic(configs)
    llm = {"stock": 1.6, "plugin r=0": 1.6, "fastervlm r=0.9": 0.2, "engine ideal r=0.9": 0.15}
    for name, s in data["samples"].items():
        images = 0 if name.startswith("engine ideal") else 1
        s["embed"] = [{"embed_s": 0.05 * images, "tower_s": 0.04 * images, "plugin_s": 0.01 * images,
                       "llm_s": llm[name] * (1 + 0.01 * i), "images": images} for i in range(len(s["ttft"]))]
    rows = {r["config"]: r for r in summary.summarize(configs, data, _hf_config(), 576)}
    stock, fv, text = data["samples"]["stock"], rows["fastervlm r=0.9"], data["samples"]["engine ideal r=0.9"]
    paired = [t - a["llm_s"] + b["llm_s"] for t, a, b in zip(stock["ttft"], stock["embed"], text["embed"])]
    want = statistics.median(stock["ttft"]) / statistics.median(paired)
    assert fv["engine_ideal"] == pytest.approx(want) and 1 < want < fv["ideal"] * 10
    assert fv["share_of_engine_ideal"] == pytest.approx(fv["speedup_p50"] / want)
    assert (fv["tower_ms"], fv["plugin_ms"], fv["llm_ms"]) == pytest.approx((40.0, 10.0, 200.0))
    assert fv["rest_ms"] == pytest.approx(1000 * min(data["samples"]["fastervlm r=0.9"]["ttft"]) - 50 - 200)
    assert "engine_ideal" not in rows["stock"] and rows["engine ideal r=0.9"]["tower_ms"] == 0.0
    md = report.render_markdown(_result(configs, data))
    assert "| fastervlm r=0.9 | " in md and f"{want:.2f}x" in md and "of the measured engine ideal" in md


def test_ratio0_within_tolerance_is_met():
    """A plugin at ratio 0 as fast as stock meets the 3 % target."""
    configs = workload.make_configs(["fastervlm"], [0.0, 0.9])
    tg = _result(configs, _synthetic(configs, r0_factor=1.01))["targets"]
    assert tg["ratio0_within_3pct"] is True


def test_bad_arguments_exit_2(capsys):
    """A ratio outside [0, 1) is a usage error naming the value."""
    with pytest.raises(SystemExit) as exc:
        speed.main(["--ratios", "0,1.5"])
    assert exc.value.code == 2
    assert "1.5" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """``bench/speed.py --quick`` with real stock, plugin and in-LLM engines writes a complete report."""
    pytest.importorskip("vllm")
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLMPRUNE_BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--methods", "fastervlm,fastv", "--ratios", "0,0.25", "--reps", "2",
         "--tries", "1", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "speed_quick.json").read_text())
    names = [r["config"] for r in data["rows"]]
    assert names == ["stock", "plugin r=0", "fastervlm r=0.25", "fastv r=0.25", "engine ideal r=0.25"]
    rows = {r["config"]: r for r in data["rows"]}
    assert data["meta"]["engines"] == ["stock", "plugin", "inllm"]
    # The served prompts really shrink: 576 image tokens -> 432 at ratio 0.25, same text.
    assert rows["stock"]["prompt_len"] - rows["fastervlm r=0.25"]["prompt_len"] == 576 - 432
    # In-LLM fastv serves every token (pruned after layer 1 of 2) and allocates stock's KV blocks.
    fv = rows["fastv r=0.25"]
    assert fv["engine"] == "inllm" and fv["prompt_len"] == rows["stock"]["prompt_len"]
    assert fv["kept_per_layer"] == [576, 288] and fv["kv_blocks"] == rows["stock"]["kv_blocks"] > 0
    assert rows["plugin r=0"]["prompt_len"] == rows["stock"]["prompt_len"]
    assert all(len(s["ttft"]) == 2 for s in data["samples"].values())
    assert rows["fastervlm r=0.25"]["plugin_ms_per_image"] > 0  # the plugin's own work was timed
    # The engine ideal's text prompt is exactly as long as the pruned one, and ran no image.
    ideal = rows["engine ideal r=0.25"]
    assert ideal["prompt_len"] == rows["fastervlm r=0.25"]["prompt_len"] and ideal["tower_ms"] == 0.0
    assert all(rows[n]["llm_ms"] > 0 and rows[n]["tower_ms"] > 0 for n in ("stock", "fastervlm r=0.25"))
    assert rows["fastervlm r=0.25"]["engine_ideal"] > 0 and "share_of_engine_ideal" in rows["fastv r=0.25"]
    assert "TTFT breakdown" in (tmp_path / "speed_quick.md").read_text()
    assert (tmp_path / "speed_quick.md").exists() and (tmp_path / "speed_quick.png").exists()
