"""Side-by-side prefill speed of stock vLLM and the vlmprune plugin on a LLaVA-1.5-geometry model.

What it measures, in ONE run, on the same prompts and images (random weights: speed only):

- **TTFT** (p50 / p90): one request at a time, ``max_tokens=1``, wall time of ``LLM.generate``
  (front-end processing + vision tower + prefill + first sample);
- **requests/s at saturation**: a batch of ``--batch`` requests submitted at once, ``max_tokens=4``;
- **the plugin's own overhead**: time inside ``embed_multimodal`` per image, split into the stock
  vision tower + projector (vLLM's ``LlavaForConditionalGeneration.embed_multimodal``) and what the
  plugin adds around it (policy fields, [CLS] signals, selection/merging);
- next to the **ideal prefill speedup** of the FLOPs model (:func:`vlmprune.flops.prefill_flops`,
  vision tower + projector + LLM, baseline / pruned, with the bench model's own config).

Configurations: stock vLLM (the plugin excluded with ``VLLM_PLUGINS=none``) and the plugin at ratio 0
and at each ratio of ``--ratios`` for every pre-LLM method the plugin serves for LLaVA; the in-LLM
methods (``transprune``, ``aim``, ``fastv``) run on a third engine on the default route (in-LLM)
(pruned between decoder layers, rows ``M r=R``) and, with ``--in-llm both`` (default), their probe
variants (pruned at the LLM input) on the plugin engine as rows ``M (probe) r=R`` (fastv has none).
Every engine runs as `vlmprune serve` leaves vLLM (eager, chunked prefill on) but without prefix caching
(repeats are recomputed), so
one stock row is the baseline of all. Each engine
lives in a worker subprocess of its own (one process never hosts two engines; all stay alive and
are driven in turn over a pipe; they are started one after the other); configurations are interleaved (every repetition runs every
configuration once, in a shuffled order) so that load from other jobs on a shared machine hits all
of them alike. Results: ``bench/results/speed_<tag>.{md,json,png}``.

    python bench/speed.py            # full run: 38 configurations (about 30-40 min on the 2-core CPU machine)
    python bench/speed.py --methods fastervlm,transprune,aim,fastv --ratios 0.9   # 8 rows, < 12 min
    python bench/speed.py --quick    # small model, few repetitions (a few minutes)

The engines run with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine core in the worker's own process) so
that ``embed_multimodal`` can be timed from the worker; stock and plugin run the same engine setup.

This file is the command line and the run's order; the parts live in ``bench/speedbench/`` (the
bench model, the workload, the engine runs, the summary statistics, the report).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
if str(HERE) not in sys.path:  # the parts in bench/speedbench/, also when this file is loaded by path
    sys.path.insert(0, str(HERE))

from speedbench.bench_model import CACHE, FULL_MODEL, QUICK_MODEL, BenchModel, build_bench_model  # noqa: E402
from speedbench.report import render_markdown, write_outputs  # noqa: E402
from speedbench.runs import ENGINE_KWARGS, Worker, measure  # noqa: E402
from speedbench.summary import summarize, targets  # noqa: E402
from speedbench.workload import IN_LLM_CHOICES, Config, make_configs, plugin_methods  # noqa: E402


def rerender(path: Path, out_dir: Path) -> int:
    """Recompute rows and targets of a saved result from its raw samples and write it again."""
    result = json.loads(path.read_text())
    spec = BenchModel(**result["meta"]["model"])
    configs = [Config(**c) for c in result["configs"]]
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(build_bench_model(spec))
    data = {"samples": result["samples"], "loadavg_1min": result["meta"]["loadavg_1min"]}
    result["rows"] = summarize(configs, data, hf_config, spec.visual_tokens, result["meta"].get("block_size"))
    result["targets"] = targets(result["rows"])
    write_outputs(result, out_dir, result["meta"]["tag"])
    print(render_markdown(result))
    return 0


def _parse_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"ratios must be in [0, 1), got {bad}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repetitions (a few minutes)")
    parser.add_argument("--ratios", type=_parse_floats, default=None, help="default 0,0.5,0.75,0.9,0.95 (quick: 0,0.9)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated; default: every method the plugin serves for LLaVA, plus fastv "
                             "(in-LLM names: transprune, aim, fastv, explain)")
    parser.add_argument("--in-llm", choices=IN_LLM_CHOICES, default="both",
                        help="in-LLM methods (transprune, aim, fastv, explain): 'both' = rows 'M r=R' on an engine with "
                             "the default in-LLM route (pruned between decoder layers) and 'M (probe) r=R' on the plugin "
                             "engine (pruned at the LLM input; none for fastv); 'only' = in-LLM rows only; "
                             "'off' = probe rows only, named 'M r=R' (no in-LLM engine, no fastv). Default both")
    parser.add_argument("--reps", type=int, default=None, help="TTFT repetitions per configuration (default 10, quick 3)")
    parser.add_argument("--batch", type=int, default=None, help="requests per throughput batch (default 8, quick 4)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 3, quick 1)")
    parser.add_argument("--tries", type=int, default=None, help="runs per TTFT sample, fastest kept (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None, help="file suffix (default: full / quick)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-summarise and re-render a saved speed_<tag>.json (no engines)")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return rerender(args.from_json, args.out)
    quick = args.quick
    spec = QUICK_MODEL if quick else FULL_MODEL
    ratios = args.ratios or ([0.0, 0.9] if quick else [0.0, 0.5, 0.75, 0.9, 0.95])
    reps = args.reps or (3 if quick else 10)
    batch = args.batch or (4 if quick else 8)
    rounds = args.rounds or (1 if quick else 3)
    tries = args.tries or (2 if quick else 3)
    tag = args.tag or ("quick" if quick else "full")
    for name, value in (("reps", reps), ("batch", batch), ("rounds", rounds), ("tries", tries)):
        if value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    from vlmprune.methods import names

    available = plugin_methods()
    if args.in_llm != "off":
        available += sorted(names("in_llm") - set(available))
    methods = available if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available]
    if unknown or not methods:
        parser.error(f"--methods: {unknown or methods!r} not served by the plugin for LLaVA"
                     f"{'' if args.in_llm != 'off' else ' with --in-llm off'}; available: {', '.join(available)}")
    configs = make_configs(methods, ratios, args.in_llm)

    started = time.perf_counter()
    print(f"[speed] building/loading {spec.name} under {CACHE}", file=sys.stderr)
    model_dir = build_bench_model(spec)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    params = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 4 / 1e6
    logs = Path(tempfile.gettempdir()) / "vlmprune-bench-logs"  # vLLM's engine logs: large, not results
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[speed] engine logs: {logs}", file=sys.stderr)
    engines = [e for e in ("stock", "plugin", "inllm") if any(c.engine == e for c in configs)]
    print(f"[speed] starting {', '.join(engines)} engines ({len(configs)} configurations)", file=sys.stderr)
    workers: dict[str, Worker] = {}
    try:
        for e in engines:  # started one after the other: two engines never load at once
            workers[e] = Worker(e, model_dir, batch, logs / f"speed_{tag}_{e}.log")
            workers[e].ready()
        infos = {e: w.info for e, w in workers.items()}
        want = {"stock": "LlavaForConditionalGeneration", "plugin": "PrunedLlava", "inllm": "PrunedLlava"}
        if any(i["model_class"] != want[e] for e, i in infos.items()):
            raise RuntimeError(f"unexpected model classes: {infos}")
        data = measure(configs, workers, reps, batch, rounds, tries)
    finally:
        for w in workers.values():
            w.close()
    import vllm

    result = {
        "meta": {
            "tag": tag,
            "model": dataclasses.asdict(spec),
            "n_visual": spec.visual_tokens,
            "params_m": params,
            "vllm": vllm.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "start_s": {e: i["start_s"] for e, i in infos.items()},
            "reps": reps,
            "batch": batch,
            "rounds": rounds,
            "tries": tries,
            "loadavg_1min": data["loadavg_1min"],
            "wall_s": time.perf_counter() - started,
            "command": "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "engine_kwargs": ENGINE_KWARGS,
            "engines": engines,
            "block_size": infos["stock"].get("block_size"),
        },
        "configs": [dataclasses.asdict(c) for c in configs],
        "samples": data["samples"],
    }
    result["rows"] = summarize(configs, data, hf_config, spec.visual_tokens, result["meta"]["block_size"])
    result["targets"] = targets(result["rows"])
    paths = write_outputs(result, args.out, tag)
    print(render_markdown(result))
    print(f"[speed] wrote {', '.join(str(p) for p in paths.values())} in {result['meta']['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
