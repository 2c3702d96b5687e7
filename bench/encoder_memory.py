"""Encoder work and engine memory under concurrent image requests: ratio 0 vs 0.9, with and without
the plugin's encoder-budget surcharge (:mod:`vlmprune.vllm_plugin.encoder_budget`).

vLLM admits images into an engine step while their *placeholder* counts fit the step's encoder
budget, and profiled its memory with unpruned images. A pruned image has fewer placeholders but
runs the whole vision tower, so without the surcharge a step at ratio 0.9 encodes many more images
at once than at ratio 0. This script sends ``--requests`` one-image requests at once (distinct
images: no encoder-cache hits) to the speed benchmark's LLaVA-geometry model and reports, per
configuration, the images per encoder call and the engine's resident memory: its peak during the
batch above its level just before it (sampled every 2 ms from ``/proc/self/statm``; the engine core
runs in the measuring process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Each configuration runs in a
fresh process of its own (one engine per process).

    python bench/encoder_memory.py                 # 3 configurations, a few minutes on 2 cores
    python bench/encoder_memory.py --requests 16 --method fastervlm

Results: ``bench/results/encoder_memory.{md,json}``. Memory, not time: the load average is printed
but a busy machine does not change what is measured much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

CONFIGS = {
    "ratio 0": (0.0, True),
    "ratio 0.9": (0.9, True),
    "ratio 0.9, no surcharge": (0.9, False),
}
"""name -> (ratio, surcharge installed)."""
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The highest resident size of this process while the block runs (a sampling thread)."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_one(model_dir: str, name: str, method: str, requests: int, budget: int) -> dict:
    """One configuration in this process: a fresh engine, one warm-up request, then the batch."""
    ratio, surcharge = CONFIGS[name]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not surcharge:  # the engine core runs in this process: its scheduler reads this switch
        from vlmprune.vllm_plugin import encoder_budget

        encoder_budget.CHARGE_UNPRUNED = False
    from vllm import LLM, SamplingParams

    from speedbench.runs import ENGINE_KWARGS
    from vlmprune.testbed.tiny import make_image
    from vlmprune.vllm_plugin.fields import encoder_calls

    kwargs = {**ENGINE_KWARGS, "max_num_batched_tokens": budget, "max_num_seqs": requests}
    llm = LLM(model=model_dir, **kwargs)

    def batch(seed: int, n: int) -> list:
        policy = {"method": method, "ratio": ratio}
        return [{"prompt": "USER: <image>\nwhat is in the picture ? ASSISTANT:",
                 "multi_modal_data": {"image": make_image(336, 336, seed=seed + i)},
                 "mm_processor_kwargs": {"vlmprune": policy}} for i in range(n)]

    params = SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate(batch(10_000, 1), params, use_tqdm=False)  # warm-up: first-call allocations
    llm.apply_model(encoder_calls)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        outs = llm.generate(batch(0, requests), params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    (calls,) = llm.apply_model(encoder_calls)
    assert len(outs) == requests and sum(calls) == requests, calls
    return {"config": name, "ratio": ratio, "surcharge": surcharge, "method": method, "requests": requests,
            "step_budget": budget, "images_per_encoder_call": calls, "max_images_per_call": max(calls),
            "encoder_calls": len(calls), "rss_before_mib": rss.before / 2**20, "rss_peak_mib": rss.peak / 2**20,
            "rss_rise_mib": (rss.peak - rss.before) / 2**20, "batch_s": elapsed,
            "prompt_tokens": len(outs[0].prompt_token_ids)}


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Encoder work and engine memory: ratio 0 vs 0.9",
        "",
        f"`python bench/encoder_memory.py --requests {meta['requests']} --method {meta['method']} "
        f"--budget {meta['budget']}` on the speed benchmark's model (`{meta['model']}`: CLIP 336 px, "
        f"576 visual tokens per image), vLLM {meta['vllm']}, {meta['cpus']} CPUs, load average "
        f"{meta['load']} at the start. {meta['requests']} one-image requests sent at once (distinct images),"
        " `max_tokens=2`; the step budget (`max_num_batched_tokens`) is also vLLM's encoder budget.",
        "",
        "| configuration | images per encoder call | encoder calls | RSS before (MiB) | peak RSS during the batch (MiB) | rise (MiB) | batch (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | max {r['max_images_per_call']} ({', '.join(map(str, r['images_per_encoder_call']))}) "
                     f"| {r['encoder_calls']} | {r['rss_before_mib']:.0f} | {r['rss_peak_mib']:.0f} "
                     f"| {r['rss_rise_mib']:.0f} | {r['batch_s']:.1f} |")
    lines += ["", "Each row is a fresh engine in a process of its own, after one warm-up request. The batch time"
              " is not a speed result (one run, no repetitions; `bench/speed.py` measures speed).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--method", default="pool", help="a pre-LLM method (default pool: no scoring of its own)")
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens (3 unpruned images of 577)")
    p.add_argument("--tag", default="")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.model_dir, args.one, args.method, args.requests, args.budget)))
        return

    import vllm

    from speedbench.bench_model import FULL_MODEL, build_bench_model
    from speedbench.runs import engine_preload

    model_dir = build_bench_model(FULL_MODEL)
    meta = {"requests": args.requests, "method": args.method, "budget": args.budget, "model": FULL_MODEL.name,
            "vllm": vllm.__version__, "cpus": os.cpu_count(), "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    print(f"[encoder_memory] load average {meta['load']}; {len(CONFIGS)} configurations", flush=True)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "LD_PRELOAD": engine_preload(),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    rows = []
    for i, name in enumerate(CONFIGS, 1):
        print(f"[encoder_memory] {i}/{len(CONFIGS)} {name} ...", flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--model-dir", str(model_dir), "--requests",
               str(args.requests), "--method", args.method, "--budget", str(args.budget)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not result:
            sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(result[0][len("RESULT "):]))
        r = rows[-1]
        print(f"    max {r['max_images_per_call']} images per encoder call, RSS rise {r['rss_rise_mib']:.0f} MiB", flush=True)
    stem = RESULTS / f"encoder_memory{('_' + args.tag) if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "configs": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(rows, meta))
    print(render(rows, meta))


if __name__ == "__main__":
    main()
