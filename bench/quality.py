"""Accuracy vs pruning ratio of every method on a testbed model (the project's quality benchmark).

Runs :func:`vlmprune.evaluate.evaluate` (transformers reference backend, greedy answers, the same
test-split samples for every cell) for each method x ratio and writes, to ``bench/results/``:

- ``quality_<model>.json``: every result (accuracy, per family, chance, kept tokens);
- ``quality_<model>.md``: accuracy table (rows: methods, columns: ratios), retention (accuracy /
  ratio-0 accuracy) and the per-family breakdown at each method's ratio 0.9;
- ``quality_<model>.png``: accuracy vs ratio, one line per method, chance level dashed.

Ratio 0 keeps every token for every method (the stock model), so it is evaluated once and shared.
A method whose requirements are missing (``explain`` without trained CNN weights) is reported as
skipped with the reason, not silently dropped.

Two rows are not methods but bracket ``explain`` (the same pipeline, another token ranking; see
``explain_scores`` in :mod:`vlmprune.evaluate`): ``explain-input``, the CNN replaced by its own raw
input (the floor the CNN must beat), and ``oracle``, the teacher's relevance itself (the ceiling
a student could reach; evaluation only, never served: it needs a backward pass per sample).

    python bench/quality.py                      # demo, every method that fits it, 300 samples
    python bench/quality.py --model demo-next    # the AnyRes model (adds globalcom2)
    python bench/quality.py --samples 100 --methods fastervlm,random
    python bench/quality.py --methods aim --merge   # re-run rows, keep the others of the saved json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RATIOS = (0.0, 0.5, 0.75, 0.9, 0.95)
EXPLAIN_ROWS = {"explain": "cnn", "explain-input": "input", "oracle": "oracle"}
"""Row name -> what ranks the tokens in the explain pipeline (``evaluate(explain_scores=...)``)."""


def ordered(cells: dict) -> list[str]:
    """Row names in table order: as run, except that explain's floor and ceiling rows follow it."""
    rows = [r for r in cells if r not in EXPLAIN_ROWS or r == "explain"]
    extra = [r for r in EXPLAIN_ROWS if r != "explain" and r in cells]
    at = rows.index("explain") + 1 if "explain" in rows else len(rows)
    return rows[:at] + extra + rows[at:]


def table_rows(data: dict) -> list[tuple[str, dict]]:
    """``(row name, its cells)`` in :func:`ordered` order."""
    return [(m, data["cells"][m]) for m in ordered(data["cells"])]


def _row_call(row: str) -> tuple[str, str]:
    """(method, explain_scores) that evaluate one benchmark row."""
    return ("explain", EXPLAIN_ROWS[row]) if row in EXPLAIN_ROWS else (row, "cnn")


def run(model: str, methods: list[str], ratios: list[float], samples: int, seed: int, device: str | None = None,
        base: dict | None = None) -> dict:
    """Every row x ratio; ``base``: a ratio-0 result to reuse (ratio 0 is the stock model for every
    method, so a merged re-run takes the saved one instead of evaluating it again)."""
    from vlmprune.evaluate import evaluate

    cells: dict[str, dict[str, dict]] = {}
    skipped: dict[str, str] = {}
    if base is None:
        base = evaluate(model, "fastervlm", 0.0, samples=samples, seed=seed, progress=False, device=device)
        print(f"ratio 0 (all methods): accuracy {base['accuracy']:.3f} ({base['wall_s']:.0f} s)", file=sys.stderr)
    for method in methods:
        cells[method] = {"0.0": base}
        teachers: dict = {}  # oracle: the teacher's relevance per sample, shared by the ratios
        for ratio in ratios:
            if ratio == 0:
                continue
            try:
                real, scores = _row_call(method)
                result = evaluate(model, real, ratio, samples=samples, seed=seed, progress=False, device=device,
                                  explain_scores=scores, teacher_cache=teachers if scores == "oracle" else None)
            except (ValueError, FileNotFoundError) as exc:  # e.g. explain without trained weights
                skipped[method] = str(exc)
                print(f"{method}: skipped ({exc})", file=sys.stderr)
                cells.pop(method)
                break
            cells[method][str(ratio)] = result
            print(f"{method}@{ratio}: accuracy {result['accuracy']:.3f}, kept {result['kept_tokens']:.0f} "
                  f"({result['wall_s']:.0f} s)", file=sys.stderr)
    return {"model": model, "samples": samples, "seed": seed, "ratios": ratios, "cells": cells, "skipped": skipped,
            "device": base["device"],
            "chance": base["chance"], "per_family_samples": base["per_family_samples"]}


def fitting_methods(model: str) -> list[str]:
    """Every method that applies to ``model``'s family (``vlmprune.methods.METHODS`` order)."""
    from transformers import AutoConfig

    from vlmprune.methods import METHODS
    from vlmprune.testbed.registry import resolve_model

    family = AutoConfig.from_pretrained(resolve_model(model)).model_type
    names = [name for name, spec in METHODS.items() if family in spec.models]
    if "explain" in names:  # its floor and ceiling right after it
        at = names.index("explain") + 1
        names[at:at] = [row for row in EXPLAIN_ROWS if row != "explain"]
    return names


def check_mergeable(old: dict, new: dict) -> None:
    """ValueError unless a run with ``new``'s model, samples and seed, at some of ``old``'s ratios,
    can merge into ``old``."""
    for key in ("model", "samples", "seed"):
        if old.get(key) != new.get(key):
            raise ValueError(f"--merge: the saved run has {key}={old.get(key)!r}, this one {new.get(key)!r}")
    extra = sorted(set(new.get("ratios", [])) - set(old.get("ratios", [])))
    if extra:
        raise ValueError(f"--merge: ratios {extra} are not in the saved run's {old.get('ratios')!r}")


def merged(old: dict, new: dict) -> dict:
    """``new``'s rows over ``old``'s (same model, samples and seed, ratios among the saved ones):
    re-running some rows keeps the others of an earlier run, in the earlier run's order, new rows
    last. A re-run row replaces the whole saved row (never a mix of two runs): ratios it was not
    re-run at are missing cells ("-" in the table)."""
    check_mergeable(old, new)
    cells = {m: new["cells"].get(m, row) for m, row in old["cells"].items()}
    cells.update({m: row for m, row in new["cells"].items() if m not in cells})
    skipped = {m: r for m, r in {**old.get("skipped", {}), **new["skipped"]}.items() if m not in cells}
    rerun = sorted(set(new["cells"]) | set(new["skipped"]))
    history = [*old.get("merges", []), {"rows": rerun, "ratios": new.get("ratios"), "wall_s": new.get("wall_s")}]
    return {**old, "cells": cells, "skipped": skipped, "merges": history}


def overall_chance(data: dict) -> float:
    """Sample-weighted majority-answer accuracy over the families."""
    n = data["per_family_samples"]
    return sum(data["chance"][f] * n[f] for f in n) / sum(n.values())


def _cell(row: dict, ratio: float, fmt) -> str:
    """One table cell: ``fmt(result)``, or "-" where the row was not run at ``ratio``."""
    cell = row.get(str(ratio))
    return "-" if cell is None else fmt(cell)


def markdown(data: dict) -> str:
    ratios = data["ratios"]
    head = "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |"
    rule = "|---|" + "---:|" * len(ratios)
    lines = [f"# Quality: accuracy vs ratio on `{data['model']}`", "",
             f"{data['samples']} test samples (the same for every cell), greedy answers, transformers reference "
             f"backend ({data.get('device', 'cpu')}), seed {data['seed']}. Chance (majority answer per family, weighted): "
             f"{overall_chance(data):.3f}."]
    if any(r in data["cells"] for r in EXPLAIN_ROWS if r != "explain"):
        lines += ["", "`explain-input`: the explain pipeline with its CNN replaced by the CNN's raw input (layer-0 "
                  "instruction attention); `oracle`: ranked by the teacher's relevance itself (evaluation only, "
                  "never served)."]
    for merge in data.get("merges", []):
        at = "" if merge.get("ratios") in (None, data["ratios"]) else \
            f" (at ratios {', '.join(f'{r:g}' for r in merge['ratios'] if r)} only; '-': not run)"
        lines += ["", f"Rows re-run later and merged into this run: {', '.join(merge['rows'])}{at}."]
    lines += ["", "## Accuracy", "", head, rule]
    for method, row in table_rows(data):
        lines.append(f"| {method} | " + " | ".join(_cell(row, r, lambda c: f"{c['accuracy']:.3f}") for r in ratios) + " |")
    lines += ["", "## Retention (accuracy / ratio-0 accuracy)", "", head, rule]
    for method, row in table_rows(data):
        a0 = row["0.0"]["accuracy"]
        lines.append(f"| {method} | " + " | ".join(
            _cell(row, r, lambda c: f"{c['accuracy'] / a0:.1%}" if a0 else "n/a") for r in ratios) + " |")
    families = list(data["per_family_samples"])
    if 0.9 in ratios:
        lines += ["", "## Per family at ratio 0.9", "",
                  "| method | " + " | ".join(f"{f} (n={data['per_family_samples'][f]})" for f in families) + " |",
                  "|---|" + "---:|" * len(families)]
        lines.append("| ratio 0 | " + " | ".join(
            f"{next(iter(data['cells'].values()))['0.0']['per_family'][f]:.3f}" for f in families) + " |")
        for method, row in table_rows(data):
            lines.append(f"| {method} | " + " | ".join(_cell(row, 0.9, lambda c: f"{c['per_family'][f]:.3f}")
                                                       for f in families) + " |")
        lines.append("| chance | " + " | ".join(f"{data['chance'][f]:.3f}" for f in families) + " |")
    lines += ["", "## Per family, every ratio", "", "| method | family | " + " | ".join(f"{r:g}" for r in ratios) + " |",
              "|---|---|" + "---:|" * len(ratios)]
    for method, row in table_rows(data):
        for f in families:
            lines.append(f"| {method} | {f} | " + " | ".join(_cell(row, r, lambda c: f"{c['per_family'][f]:.3f}")
                                                             for r in ratios) + " |")
    for method, reason in data["skipped"].items():
        lines += ["", f"Skipped `{method}`: {reason}"]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ratios = data["ratios"]
    for method, row in table_rows(data):
        done = [r for r in ratios if str(r) in row]  # a row merged at some ratios only
        ax.plot(done, [row[str(r)]["accuracy"] for r in done], marker="o", label=method)
    ax.axhline(overall_chance(data), color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("pruning ratio (fraction of visual tokens removed)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{data['model']}: accuracy vs ratio ({data['samples']} test samples)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every method that fits the model)")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS))
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--out", default=None, help="output stem (default bench/results/quality_<model>)")
    parser.add_argument("--from-json", default=None, help="re-render the table and plot of an earlier run")
    parser.add_argument("--merge", action="store_true",
                        help="keep the saved json's other rows (same model, samples and seed; ratios among the saved ones)")
    args = parser.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        stem = Path(args.from_json).with_suffix("")
        stem.with_suffix(".md").write_text(markdown(data))
        plot(data, stem.with_suffix(".png"))
        print(markdown(data))
        return 0
    ratios = [float(r) for r in args.ratios.split(",")]
    if 0.0 not in ratios:
        ratios = [0.0, *ratios]
    t0 = time.time()
    stem = Path(args.out) if args.out else RESULTS / f"quality_{Path(args.model).name}"
    saved = json.loads(stem.with_suffix(".json").read_text()) if args.merge and stem.with_suffix(".json").is_file() else None
    if saved is not None:  # before the (long) run, not after it
        check_mergeable(saved, {"model": args.model, "samples": args.samples, "seed": args.seed, "ratios": sorted(ratios)})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else fitting_methods(args.model)
    saved_base = next(iter(saved["cells"].values()))["0.0"] if saved and saved["cells"] else None
    data = run(args.model, methods, sorted(ratios), args.samples, args.seed, args.device, base=saved_base)
    data["wall_s"] = time.time() - t0
    stem.parent.mkdir(parents=True, exist_ok=True)
    if saved is not None:
        data = merged(saved, data)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    stem.with_suffix(".md").write_text(markdown(data))
    plot(data, stem.with_suffix(".png"))
    print(markdown(data))
    print(f"wrote {stem}.{{json,md,png}} in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
