"""Tensor parallelism 2 on real vLLM CPU engines: every request is served as at TP=1, or refused.

vLLM's CPU build runs tensor parallelism over shared memory (``distributed_executor_backend="mp"``,
one worker process per rank, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``).
The tiny models' ViT, LM and KV head counts divide by 2, except Qwen's single KV head, which vLLM
replicates on both ranks. Per configuration (family, route, encoder TP mode) one TP=2 plugin engine
runs in this process while the same requests run on a TP=1 plugin engine in a subprocess: the probe
route (every method at the LLM input) and the default in-LLM route (``transprune``, ``aim``,
``fastv`` between the decoder layers, with vLLM's chunked prefill and prefix caching on).

Compared per request: the prompt (the kept count), the kept tokens (rank 0's trace; the ranks agree
or the LM's all-reduces would mix different rows and the answers would differ), the greedy tokens,
and the top logprobs within ``ATOL`` (the ranks sum their partial results in another order).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import IN_LLM_ENGINE, Engine, StockRun, assert_same_output, build_model, chat_spec, saved_env
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig
from vlmprune.methods import METHODS, served_route
from vlmprune.policy import PolicyError
from vlmprune.trace import TRACE_DIR_ENV
from vlmprune.vllm_plugin.probe import EXPLAIN_CHECKPOINT

pytestmark = pytest.mark.slow

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
TP_ENGINE = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
ATOL = 1e-3
"""Top logprobs, TP=2 vs TP=1 (seen: about 1e-6 in float32)."""
RATIO = 0.75
QUESTION = "what colour is the box ?"
IMAGES = {
    "llava": ((96, 64, 1), (64, 96, 2)),
    "llava_next": ((96, 64, 1), (64, 96, 2)),
    "qwen2_5_vl": ((112, 168, 1), (168, 112, 2)),
}
IN_LLM = ("transprune", "aim", "fastv")
CONFIGS = {  # name: (family, route, engine options, methods (None: every method the route serves))
    "llava-probe": ("llava", "probe", {}, None),
    "llava_next-probe": ("llava_next", "probe", {}, None),
    "qwen2_5_vl-probe": ("qwen2_5_vl", "probe", {}, None),  # head-sharded ViT: the scores are summed across ranks
    "qwen2_5_vl-probe-data": ("qwen2_5_vl", "probe", {"mm_encoder_tp_mode": "data"}, ["fastervlm", "random"]),
    "llava-in_llm": ("llava", "in_llm", IN_LLM_ENGINE, IN_LLM),
    "llava_next-in_llm": ("llava_next", "in_llm", IN_LLM_ENGINE, IN_LLM),
    "qwen2_5_vl-in_llm": ("qwen2_5_vl", "in_llm", IN_LLM_ENGINE, IN_LLM),
}
"""The in-LLM engines run the default route's settings (chunked prefill, prefix caching, a step
budget that holds each image-to-end span)."""


def served_methods(family: str, route: str) -> list[str]:
    with saved_env({"VLMPRUNE_ROUTE": route}):
        return [m for m in METHODS if served_route(m, family) != "refused"]


def refused_methods(family: str, route: str) -> list[str]:
    with saved_env({"VLMPRUNE_ROUTE": route}):
        return [m for m in METHODS if served_route(m, family) == "refused"]


def policy(method: str, model_dir, trace: str, ratio: float = RATIO) -> dict:
    out = {"method": method, "ratio": ratio, "trace": trace}
    if METHODS[method].probe:
        out["instruction"] = QUESTION
    if method == "explain":
        out["checkpoint"] = str(model_dir / EXPLAIN_CHECKPOINT)
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def env(request, tmp_path_factory, timings):
    """The TP=2 engine of one configuration, and the TP=1 engine's answers to ``specs``."""
    family, route, engine_options, methods = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(f"tp_{request.param}")
    model_dir, _model, processor = build_model(family, root)
    torch.manual_seed(0)
    RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3)).eval().save(model_dir / EXPLAIN_CHECKPOINT)
    one, two = IMAGES[family][:1], IMAGES[family]
    methods = methods or served_methods(family, route)
    specs = [chat_spec(processor, QUESTION, one)]
    for method in methods:
        for images in (one, two):
            trace = f"tp-{method}-{len(images)}-images"
            specs.append(chat_spec(processor, QUESTION, images, policy=policy(method, model_dir, trace)))
    traces = {1: root / "traces_tp1", 2: root / "traces_tp2"}
    for folder in traces.values():
        folder.mkdir()
    reference = StockRun(model_dir, specs, root, plugin=True, env={"VLMPRUNE_ROUTE": route, TRACE_DIR_ENV: str(traces[1])},
                         **engine_options)
    try:
        with saved_env({**TP_ENV, "VLMPRUNE_ROUTE": route, TRACE_DIR_ENV: str(traces[2])}):
            engine = Engine(model_dir, **TP_ENGINE, **engine_options)
            timings[f"{request.param}_tp2_start_s"] = engine.start_s
            try:
                yield SimpleNamespace(name=request.param, family=family, route=route, engine=engine, specs=specs, processor=processor,
                                      model_dir=model_dir, reference=reference.result(timeout=600)["outputs"],
                                      traces=traces, images=IMAGES[family])
            finally:
                engine.shutdown()
    finally:
        reference.stop()


def read_traces(folder, trace_id: str, n_images: int) -> list[dict]:
    """Per image, the tokens it keeps at the end and per in-LLM stage (rank 0's trace)."""
    records = [json.loads((folder / f"{trace_id}.{i}.json").read_text()) for i in range(n_images)]
    return [{"n_tokens": r["n_tokens"], "kept": r["kept"], "stages": r.get("stages")} for r in records]


def test_every_method_gives_the_tp1_answer(env):
    """Per method, one and two images: the TP=1 engine's prompt, kept tokens (per in-LLM stage too),
    greedy tokens, logprobs; and every method pruned something."""
    got = env.engine.run(env.specs)
    for spec, mine, want in zip(env.specs, got, env.reference):
        what = f"{env.name} {spec.get('vlmprune', 'stock')}"
        assert mine["prompt_token_ids"] == want["prompt_token_ids"], what
        assert_same_output(mine, want, atol=ATOL, what=what)
        if "vlmprune" in spec:
            trace, n = spec["vlmprune"]["trace"], len(spec["images"])
            records = read_traces(env.traces[2], trace, n)
            assert records == read_traces(env.traces[1], trace, n), what
            assert all(len(r["kept"]) < r["n_tokens"] for r in records), f"{what} pruned nothing"
            assert (env.route == "in_llm") == all(r["stages"] for r in records), f"{what}: stages {records}"


def test_methods_the_route_cannot_serve_are_refused_and_the_engine_serves_on(env):
    """An unknown method, the family's misfits and, on the probe route, fastv (in-LLM only) get a
    PolicyError naming the method; the next request is answered as before."""
    refused = [*refused_methods(env.family, env.route), "no-such-method"]
    for method in refused:
        bad = chat_spec(env.processor, QUESTION, env.images[:1], policy={"method": method, "ratio": 0.5})
        with pytest.raises(PolicyError, match=method):
            env.engine.run_one(bad)
        assert_same_output(env.engine.run_one(env.specs[0]), env.reference[0], atol=ATOL, what=f"stock after {method}")
