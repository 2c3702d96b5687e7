"""Engine runs: one vLLM engine per worker subprocess, driven over a pipe, and the interleaved measurement.

A worker is ``python -m speedbench.runs ENGINE MODEL_DIR MAX_NUM_SEQS`` (``bench/`` on the path):
it serves JSON-line commands with one engine (stock: ``VLLM_PLUGINS=none``; plugin; inllm: the
plugin on the default in-LLM route, transprune/aim/fastv/explain between decoder layers; the plugin engine runs ``VLMPRUNE_ROUTE=probe``) and times
``embed_multimodal`` inside its own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

Every engine gets the same :data:`ENGINE_KWARGS`: the in-LLM mode's required flags (eager, no
chunked prefill) and no prefix caching (repeated prompts are timed, not served from the cache): stock, the pre-LLM plugin and the in-LLM engine
differ only by their environment, so one stock row is the baseline of every row.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from speedbench.workload import Config, request_spec

BENCH_DIR = Path(__file__).resolve().parents[1]


ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=1024,
    limit_mm_per_prompt={"image": 1},
    enable_prefix_caching=False,  # repeated prompts must be recomputed
    enable_chunked_prefill=True,  # vLLM's default, as `vlmprune serve` leaves it (every engine alike)
    mm_processor_cache_gb=0,  # and re-processed, as unique images would be
    max_num_batched_tokens=2048,  # vLLM's CPU server default; holds every prompt of max_model_len
    seed=0,
)


class EmbedTimer:
    """Wall time inside the stock and (if loaded) the plugin's ``embed_multimodal``, per call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.stock_s = 0.0
        self.outer_s = 0.0
        self.llm_s = 0.0
        self.images = 0

    def install(self, plugin: bool) -> None:
        from vllm.model_executor.models import llava as vllm_llava

        timer = self

        def wrap(cls: type, attr: str, count: bool) -> None:
            original = cls.embed_multimodal

            def timed(self, **kwargs):  # type: ignore[no-untyped-def]
                start = time.perf_counter()
                out = original(self, **kwargs)
                setattr(timer, attr, getattr(timer, attr) + time.perf_counter() - start)
                if count:
                    timer.images += len(out)
                return out

            cls.embed_multimodal = timed

        wrap(vllm_llava.LlavaForConditionalGeneration, "stock_s", not plugin)
        forward = vllm_llava.LlavaForConditionalGeneration.forward

        def timed_forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()  # the LLM's forward (in-LLM stages included), not the sampler
            out = forward(self, *args, **kwargs)
            timer.llm_s += time.perf_counter() - start
            return out

        vllm_llava.LlavaForConditionalGeneration.forward = timed_forward
        if plugin:
            from vlmprune.vllm_plugin.llava import PrunedLlava

            wrap(PrunedLlava, "outer_s", True)

    def read(self, plugin: bool) -> dict[str, float]:
        outer = self.outer_s if plugin else self.stock_s
        return {"embed_s": outer, "tower_s": self.stock_s, "plugin_s": outer - self.stock_s, "llm_s": self.llm_s,
                "images": self.images}


def _prompt(spec: dict[str, Any], text_prompt: Any = None) -> dict[str, Any]:
    """The request of ``spec``; a text-only one (``text_prompt(text, ratio)``) for the engine ideal."""
    from vlmprune.testbed.tiny import make_image

    text = "USER: <image>\n" + spec["question"] + " ASSISTANT:"
    if spec.get("text_only_ratio") is not None:
        return text_prompt(text, spec["text_only_ratio"])
    request: dict[str, Any] = {
        "prompt": text,
        "multi_modal_data": {"image": make_image(336, 336, seed=spec["seed"])},
    }
    if spec["policy"] is not None:
        request["mm_processor_kwargs"] = {"vlmprune": spec["policy"]}
    return request


def worker_main(engine: str, model_dir: str, max_num_seqs: int) -> None:
    """Serve commands (JSON lines on stdin) with one engine; replies on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else (vLLM's logs) goes to stderr
    plugin = engine != "stock"
    timer = EmbedTimer()
    timer.install(plugin)
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=model_dir, max_num_seqs=max_num_seqs, **ENGINE_KWARGS)
    model_cls = llm.apply_model(lambda model: type(model).__name__)[0]
    import torch

    info = {
        "ready": True,
        "start_s": time.perf_counter() - started,
        "model_class": model_cls,
        "block_size": int(llm.llm_engine.vllm_config.cache_config.block_size),
        "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
    }
    proto.write(json.dumps(info) + "\n")
    text_prompt = _text_prompt_builder(llm)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "quit":
                break
            requests = [_prompt(s, text_prompt) for s in cmd["requests"]]
            params = SamplingParams(max_tokens=cmd["max_tokens"], temperature=0.0, ignore_eos=True)
            timer.reset()
            start = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            wall = time.perf_counter() - start
            reply = {
                "wall_s": wall,
                "prompt_lens": [len(o.prompt_token_ids) for o in outputs],
                "out_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                **timer.read(plugin),
            }
        except Exception:  # reported to the driver, which stops the run
            reply = {"error": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")
    llm.llm_engine.engine_core.shutdown()


def _text_prompt_builder(llm: Any):
    """``(text, ratio) -> prompt``: the token ids of ``text`` with its one ``<image>`` token replaced
    by ``kept_count(n_visual, ratio)`` ordinary word tokens: the pruned prompt's length, no image."""
    from vlmprune.policy import kept_count

    config = llm.llm_engine.vllm_config.model_config.hf_config
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    tokenizer = llm.get_tokenizer()
    filler = tokenizer.encode("box", add_special_tokens=False)[0]

    def build(text: str, ratio: float) -> dict[str, Any]:
        ids = tokenizer.encode(text)
        at = ids.index(config.image_token_index)
        return {"prompt_token_ids": ids[:at] + [filler] * kept_count(n_visual, ratio) + ids[at + 1:]}

    return build


def engine_preload() -> str:
    """The ``LD_PRELOAD`` vLLM's CPU platform gives the engine processes it spawns (tcmalloc + torch's libgomp).

    With the engine core in the worker's own process that setting would come too late (it only
    affects child processes), so the worker is started with it: the same libraries as a default
    (multiprocessing) vLLM engine.
    """
    import glob
    import importlib.util

    libs = []
    vllm_spec = importlib.util.find_spec("vllm")
    torch_spec = importlib.util.find_spec("torch")
    if vllm_spec and vllm_spec.origin:
        vllm_pkg = Path(vllm_spec.origin).parent
        for pattern in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            found = sorted(glob.glob(str(vllm_pkg / "libs" / pattern)))
            if found:
                libs.append(found[0])
                break
    if torch_spec and torch_spec.origin:
        torch_pkg = Path(torch_spec.origin).parent
        found = sorted(glob.glob(str(torch_pkg.parent / "torch.libs" / "libgomp*.so*")))
        found += sorted(glob.glob(str(torch_pkg / "lib" / "libgomp*.so*")))
        if found:
            libs.append(found[0])
    current = os.environ.get("LD_PRELOAD", "")
    return ":".join([lib for lib in libs if lib not in current] + ([current] if current else []))


class Worker:
    """Driver side of a worker subprocess."""

    def __init__(self, engine: str, model_dir: Path, max_num_seqs: int, log: Path) -> None:
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        preload = engine_preload()
        if preload:
            env["LD_PRELOAD"] = preload
        if engine == "stock":
            env["VLLM_PLUGINS"] = "none"  # vLLM's allow-list: no general plugin loaded
        else:
            env.pop("VLLM_PLUGINS", None)
        env.pop("VLMPRUNE_IN_LLM", None)
        if engine == "inllm":
            env.pop("VLMPRUNE_ROUTE", None)  # the default route: transprune/aim/fastv between decoder layers
        else:
            env["VLMPRUNE_ROUTE"] = "probe"  # the plugin engine's '(probe)' rows: pruned at the LLM input
        self.engine = engine
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "speedbench.runs", engine, str(model_dir), str(max_num_seqs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.engine} worker died (rc={self.proc.returncode}); log tail:\n{self._tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.engine} worker failed:\n{reply['error']}")
        return reply

    def _tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def ready(self) -> dict[str, Any]:
        self.info = self._read()
        return self.info

    def run(self, requests: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": "run", "requests": requests, "max_tokens": max_tokens}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def measure(
    configs: list[Config], workers: dict[str, Worker], reps: int, batch: int, rounds: int, tries: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Interleaved TTFT repetitions, then throughput rounds; raw samples per configuration.

    Each TTFT sample is the fastest of ``tries`` back-to-back runs of the same request (fresh image
    each time): on a shared machine other jobs only ever add time, and with vLLM's two OpenMP
    threads a job holding one core makes a prefill several times slower, so a single run measures
    the neighbours as much as the engine. Every try is kept in ``ttft_tries``.
    """
    from tqdm import tqdm

    rng = random.Random(seed)
    raw: dict[str, dict[str, list]] = {
        c.name: {"ttft": [], "ttft_tries": [], "embed": [], "prompt_len": [], "rps": []} for c in configs
    }
    load: list[float] = []

    def run(config: Config, specs: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        reply = workers[config.engine].run(specs, max_tokens)
        want = 0 if config.text_only else len(specs)
        if reply["images"] != want:  # the encoder must run for every request, or we time a cache
            raise RuntimeError(f"{config.name}: {reply['images']} images encoded for {len(specs)} requests")
        return reply

    # Warm-up: every configuration once (first calls allocate and compile).
    for config in tqdm(configs, desc="warm-up", file=sys.stderr):
        run(config, [request_spec(10_000, config)], 1)
    bar = tqdm(total=reps * len(configs) + rounds * len(configs), desc="measure", file=sys.stderr)
    for rep in range(reps):
        load.append(os.getloadavg()[0])
        order = configs[:]
        rng.shuffle(order)
        for config in order:
            replies = [run(config, [request_spec(rep, config, t)], 1) for t in range(tries)]
            best = min(replies, key=lambda r: r["wall_s"])
            raw[config.name]["ttft"].append(best["wall_s"])
            raw[config.name]["ttft_tries"].append([r["wall_s"] for r in replies])
            raw[config.name]["prompt_len"].append(best["prompt_lens"][0])
            raw[config.name]["embed"].append({k: best[k] for k in ("embed_s", "tower_s", "plugin_s", "llm_s", "images")})
            bar.update()
    for rnd in range(rounds):
        load.append(os.getloadavg()[0])
        order = configs[:]
        rng.shuffle(order)
        for config in order:
            if config.text_only:  # the engine ideal is a TTFT figure
                bar.update()
                continue
            specs = [request_spec(1000 + rnd * batch + j, config) for j in range(batch)]
            reply = run(config, specs, 4)
            raw[config.name]["rps"].append(batch / reply["wall_s"])
            bar.update()
    bar.close()
    load.append(os.getloadavg()[0])
    return {"samples": raw, "loadavg_1min": load}


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
