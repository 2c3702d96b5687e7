"""Rendering of a result: the markdown report, the speedup plot and the ``speed_<tag>.*`` files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from speedbench.summary import ENGINE_TARGET_SHARE, TTFT_TARGET_SHARE, row_label


def render_markdown(result: dict[str, Any]) -> str:
    """The result as a markdown report: setup, the table, the targets."""
    meta, rows, tg = result["meta"], result["rows"], result["targets"]
    lines = [
        f"# vLLM plugin speed: {meta['model']['name']} ({meta['tag']})",
        "",
        f"- model: LLaVA-1.5 geometry, {meta['n_visual']} visual tokens, random weights, float32; "
        f"{meta['params_m']:.0f} M parameters (CLIP {meta['model']['vit_layers']} x {meta['model']['vit_hidden']}, "
        f"Llama {meta['model']['lm_layers']} x {meta['model']['lm_hidden']}); vision + projector = "
        f"{100 * rows[0]['vision_share']:.1f} % of baseline prefill FLOPs",
        f"- vLLM {meta['vllm']}, {meta['cpu']}, {meta['cores']} cores; engine start "
        + ", ".join(f"{e} {t:.0f} s" for e, t in meta["start_s"].items()),
        "- engines: every one with the launcher's settings (`enforce_eager`, chunked prefill on, "
        "`max_num_batched_tokens=2048`) but no prefix caching (repeats are recomputed), so the one stock row is the baseline of every row; they differ "
        "only by environment: stock `VLLM_PLUGINS=none`, plugin (`VLMPRUNE_ROUTE=probe`: pre-LLM methods, `(probe)` rows), inllm "
        "(the default route: transprune, aim, fastv, explain between decoder layers)",
        f"- TTFT: {meta['reps']} interleaved repetitions per configuration (max_tokens=1, one request at a time), "
        f"each the fastest of {meta.get('tries', 1)} back-to-back tries; "
        f"throughput: {meta['rounds']} round(s) of {meta['batch']} requests at once (max_tokens=4)",
        f"- load average (1 min) during the run: min {min(meta['loadavg_1min']):.2f}, "
        f"median {statistics.median(meta['loadavg_1min']):.2f}, max {max(meta['loadavg_1min']):.2f}; "
        f"wall time {meta['wall_s'] / 60:.1f} min",
        f"- command: `{meta['command']}`",
        "",
        "| config | engine | kept (prompt) | kept (mean/layer) | KV blocks | TTFT p50 (s) | TTFT p90 (s) | TTFT min (s) | speedup p50 | paired | min | ideal (FLOPs) "
        "| ideal + scoring | LLM-only ideal | p50/ideal | req/s (median) | vs stock | req/s (best) | vs stock "
        "| embed ms/img | plugin ms/img | embed ms (fastest) | plugin ms (fastest) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["config"].startswith("engine ideal"):
            continue  # in the breakdown table below
        lines.append(
            f"| {r['config']} | {r.get('engine', '')} | {r['kept_tokens']} | {r.get('kept_mean', r['kept_tokens']):.1f} | "
            f"{r.get('kv_blocks') if r.get('kv_blocks') is not None else '-'} | {r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.3f} | {r['ttft_min_s']:.3f} | "
            f"{r['speedup_p50']:.2f}x | {r['speedup_paired']:.2f}x | {r['speedup_min']:.2f}x | {r['ideal']:.2f}x | "
            f"{r['ideal_with_scoring']:.2f}x | {r['ideal_llm_only']:.2f}x | "
            f"{r['speedup_over_ideal']:.2f} | {r['rps']:.3f} | {r['rps_vs_stock']:.2f}x | {r['rps_best']:.3f} | "
            f"{r['rps_best_vs_stock']:.2f}x | "
            f"{r['embed_ms_per_image']:.1f} | {r['plugin_ms_per_image']:.1f} | {r['embed_ms_fastest']:.1f} | "
            f"{r['plugin_ms_fastest']:.1f} |"
        )
    lines += breakdown_table(rows)
    lines += [
        "",
        "speedup p50 = stock TTFT p50 / config TTFT p50; paired = median over repetitions of the per-request "
        "ratio (same image and prompt, run back to back); min = stock's fastest / config's fastest repetition (the "
        "least disturbed by other jobs on a shared machine); ideal = baseline / pruned prefill FLOPs "
        "(vision + projector + LLM, causal attention, the measured text length; in-LLM rows count the visual "
        "tokens entering each decoder layer, `kept (mean/layer)` = their mean, `flops.method_visual_per_layer`); "
        "ideal + scoring adds the method's own scoring FLOPs (`method_probe_flops`: the shallow probe on the "
        "plugin engine, the in-LLM scoring on the inllm engine); kept (prompt) = visual tokens in the served "
        "prompt (in-LLM transprune/fastv keep all 576 there and prune between layers; aim merges first); "
        "KV blocks = ceil(prompt length / block size) per request, what the scheduler allocates: the in-LLM "
        "design saves compute only, so its blocks equal stock's (aim: its merged prompt's); "
        "p50/ideal = speedup p50 / ideal (the target's measure); plugin ms/img = time the "
        "plugin adds inside `embed_multimodal` around vLLM's own vision tower + projector (mean over repetitions; "
        "'fastest' = in the fastest repetition).",
        "",
        "## Targets",
        "",
        f"- plugin at ratio 0 vs stock vLLM (paired TTFT): {100 * tg['ratio0_ttft_vs_stock']:+.1f} % "
        f"(target within ±3 %: {'met' if tg['ratio0_within_3pct'] else 'NOT met'}); fastest repetitions "
        f"{100 * tg['ratio0_ttft_min_vs_stock']:+.1f} % ({'met' if tg['ratio0_within_3pct_min'] else 'NOT met'}); "
        f"the plugin's own time at ratio 0: {tg['ratio0_plugin_ms_per_image']:.2f} ms per image = "
        f"{100 * tg['ratio0_plugin_share_of_ttft']:.2f} % of stock's fastest TTFT; "
        f"throughput {100 * tg['ratio0_rps_vs_stock']:+.1f} % (median), {100 * tg['ratio0_rps_best_vs_stock']:+.1f} % (best)",
    ]
    from vlmprune.core.schedule import fastv_layer

    n_layers = meta["model"]["lm_layers"]
    k = fastv_layer(n_layers)
    lines.append(
        f"- in-LLM rows' ideals differ per method (per-layer counts): see each row's `ideal (FLOPs)`; the bench "
        f"LLM has N = {n_layers} layers, so fastv (K = 2 of 32, depth-scaled: K = {k}) removes at most "
        f"(N-K)/N = {(n_layers - k) / n_layers:.2f} of the image (beyond that it keeps no visual token after layer K)"
    )
    for method, t in tg["at_0.9"].items():
        engine = ""
        if t.get("engine_ideal") is not None:
            engine = (f"; of the measured engine ideal {t['engine_ideal']:.2f}x: {t['share_engine']:.2f} "
                      f"(target >= {ENGINE_TARGET_SHARE}: {'met' if t['met_engine'] else 'NOT met'}; fastest "
                      f"{t['share_engine_min']:.2f})")
        lines.append(
            f"- {method} at ratio 0.9: TTFT speedup {t['speedup']:.2f}x vs ideal {t['ideal']:.2f}x = "
            f"{t['share']:.2f} of ideal (target >= {TTFT_TARGET_SHARE}: {'met' if t['met'] else 'NOT met'}); "
            f"fastest repetitions {t['speedup_min']:.2f}x = {t['share_min']:.2f} of ideal "
            f"({'met' if t['met_min'] else 'NOT met'}){engine}"
        )
    return "\n".join(lines) + "\n"


def breakdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """Where each configuration's TTFT goes (fastest repetition) and its share of the engine ideal."""
    if not any(r.get("llm_ms") is not None for r in rows):
        return []

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    out = [
        "",
        "### TTFT breakdown (fastest repetition) and the measured engine ideal",
        "",
        "| config | TTFT min (ms) | vision tower + projector | plugin | LLM forward | rest | engine ideal | p50 / engine ideal | min / engine ideal (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ideal = r.get("engine_ideal")
        shares = ("-", "-", "-") if ideal is None else (
            f"{ideal:.2f}x", f"{r['share_of_engine_ideal']:.2f}", f"{r['share_of_engine_ideal_min']:.2f}")
        out.append(
            f"| {r['config']} | {1000 * r['ttft_min_s']:.1f} | {ms(r.get('tower_ms'))} | {ms(r.get('plugin_ms'))} | "
            f"{ms(r.get('llm_ms'))} | {ms(r.get('rest_ms'))} | {' | '.join(shares)} |"
        )
    out += [
        "",
        "vision tower + projector = vLLM's own `embed_multimodal`; plugin = what the plugin adds around it; LLM "
        "forward = the model's forward (decoder layers, in-LLM stages and their scoring included); rest = TTFT "
        "minus both (front-end image processing, scheduling, sampling). `engine ideal r=R` rows: stock vLLM on the "
        "same text with the image replaced by `kept_count(576, R)` text tokens; engine ideal = stock TTFT with "
        "its LLM forward replaced by that row's (paired per repetition, median): the speedup of a pruner that "
        "costs nothing, inside this engine.",
    ]
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """TTFT speedup vs ratio per method, with the FLOPs model's ideal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    r0 = next(r for r in rows if r["config"] == "plugin r=0")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = sorted({row_label(r["config"]) for r in rows if r["method"] and r["ratio"] > 0})
    methods = sorted({r["method"] for r in rows if r["method"] and r["ratio"] > 0})
    for method in labels:
        pts = [(0.0, r0["speedup_min"], r0["speedup_p50"])] + sorted(
            (r["ratio"], r["speedup_min"], r["speedup_p50"]) for r in rows
            if r["method"] and r["ratio"] > 0 and row_label(r["config"]) == method
        )
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} (fastest)")
        ax.scatter([p[0] for p in pts], [p[2] for p in pts], marker="x", s=18, alpha=0.45, color=line.get_color())
    first = next(r for r in rows if r["method"] == methods[0] and r["ratio"] > 0)
    ideal = [(0.0, 1.0)] + sorted(
        (r["ratio"], r["ideal"]) for r in rows if row_label(r["config"]) == row_label(first["config"]) and r["ratio"] > 0
    )
    ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k--", label=f"ideal (FLOPs model, {row_label(first['config'])})")
    ax.plot(
        [p[0] for p in ideal], [TTFT_TARGET_SHARE * p[1] for p in ideal], "k:", linewidth=1,
        label=f"{TTFT_TARGET_SHARE} x ideal (target)",
    )
    ax.set_xlabel("ratio (fraction of visual tokens removed)")
    ax.set_ylabel("TTFT speedup vs stock vLLM\n(lines: fastest repetitions; x: p50)")
    ax.set_title(f"vlmprune in vLLM {result['meta']['vllm']} (CPU): {result['meta']['model']['name']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str) -> dict[str, Path]:
    """Write ``speed_<tag>.json``, ``.md`` and ``.png`` to ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"speed_{tag}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=1, default=float) + "\n")
    paths["md"].write_text(render_markdown(result))
    plot(result, paths["png"])
    return paths
