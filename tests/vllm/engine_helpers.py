"""Helpers of the vLLM plugin tests: tiny models for vLLM, engines, a background stock run, comparisons."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_stock_runner import ENGINE_KWARGS, sampling_params, summarize, vllm_request

HERE = Path(__file__).parent


def build_model(family: str, root: Path, **options: Any):
    """(directory, transformers model, processor) of a tiny model saved in the vLLM layout
    (``options``: the tiny builder's keyword arguments)."""
    from vlmprune.testbed.vllm_layout import build_for_vllm

    return build_for_vllm(family, root, **options)


class StockRun:
    """A stock vLLM engine (plugin excluded with ``VLLM_PLUGINS``) in a background subprocess."""

    def __init__(self, model_dir: Path, requests: list[dict[str, Any]], workdir: Path) -> None:
        self.spec = workdir / "stock_spec.json"
        self.out = workdir / "stock_out.json"
        self.spec.write_text(json.dumps({"model": str(model_dir), "requests": requests}))
        env = dict(os.environ, VLLM_PLUGINS="none")
        self.log = open(workdir / "stock.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "vllm_stock_runner.py"), str(self.spec), str(self.out)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def result(self, timeout: float = 300) -> dict[str, Any]:
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        if rc != 0:
            tail = Path(self.log.name).read_text()[-3000:]
            raise RuntimeError(f"stock vLLM run failed (rc={rc}):\n{tail}")
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Engine:
    """A vLLM ``LLM`` with the plugin, plus helpers that return :func:`summarize`-d outputs."""

    def __init__(self, model_dir: Path, **overrides: Any) -> None:
        from vllm import LLM

        kwargs = dict(ENGINE_KWARGS, **overrides)
        started = time.perf_counter()
        self.llm = LLM(model=str(model_dir), **kwargs)
        self.start_s = time.perf_counter() - started
        self.model_dir = model_dir

    def run(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outputs = self.llm.generate([vllm_request(s) for s in specs], sampling_params(), use_tqdm=False)
        return [summarize(o) for o in outputs]

    def run_one(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.run([spec])[0]

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def assert_same_output(got: dict[str, Any], want: dict[str, Any], atol: float = 1e-4, what: str = "") -> None:
    """Same prompt ids and greedy tokens; top logprobs equal within ``atol``."""
    assert got["prompt_token_ids"] == want["prompt_token_ids"], f"{what}: prompt ids differ"
    assert got["token_ids"] == want["token_ids"], f"{what}: generated tokens differ"
    for step, (a, b) in enumerate(zip(got["logprobs"], want["logprobs"])):
        for token in set(a) & set(b):
            assert abs(a[token] - b[token]) <= atol, f"{what}: step {step} token {token}: {a[token]} vs {b[token]}"
        assert set(a) & set(b), f"{what}: step {step} shares no top token"


def spec(prompt: str = "what is this ?", images=((96, 64, 1),), policy: Any = "absent") -> dict[str, Any]:
    """A request spec; ``policy="absent"`` sends no ``mm_processor_kwargs`` at all."""
    out: dict[str, Any] = {"prompt": prompt, "images": [list(i) for i in images]}
    if policy != "absent":
        out["vlmprune"] = policy
    return out


def hf_request(request_spec: dict[str, Any]):
    """The reference backend's request for the same spec (same template, same images)."""
    from vlmprune.backends.hf.pipeline import Request
    from vlmprune.testbed.tiny import make_image

    return Request(prompt=request_spec["prompt"], images=[make_image(w, h, seed=s) for w, h, s in request_spec["images"]])


def median_latency(engine: "Engine", size: tuple[int, int], ratio: float, seed: int, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` one-image fastervlm requests at ``ratio`` (fresh images)."""
    laps = []
    for i in range(repeats):
        request = spec(images=((*size, 100 + seed + i),), policy={"method": "fastervlm", "ratio": ratio})
        started = time.perf_counter()
        engine.run_one(request)
        laps.append(time.perf_counter() - started)
    return statistics.median(laps)
