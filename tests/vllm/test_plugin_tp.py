"""Tensor parallelism 2 on real vLLM CPU engines: every request is served as at TP=1, or refused.

vLLM's CPU build runs tensor parallelism over shared memory (``distributed_executor_backend="mp"``,
one worker process per rank, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``).
The tiny models' ViT, LM and KV head counts divide by 2, except Qwen's single KV head, which vLLM
replicates on both ranks. Per configuration (family, encoder TP mode) one TP=2 plugin engine runs in
this process while the same requests run on a TP=1 plugin engine in a subprocess; both on the probe
route (the launcher's default for TP engines: the in-LLM stages need every head on one rank, and a
TP engine on that route refuses to start, tested below).

Compared per request: the prompt (the kept count), the kept tokens (rank 0's trace; the ranks agree
or the LM's all-reduces would mix different rows and the answers would differ), the greedy tokens,
and the top logprobs within ``ATOL`` (the ranks sum their partial results in another order).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import Engine, StockRun, assert_same_output, build_model, chat_spec, saved_env
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig
from vlmprune.methods import METHODS, served_route
from vlmprune.policy import PolicyError
from vlmprune.trace import TRACE_DIR_ENV
from vlmprune.vllm_plugin.probe import EXPLAIN_CHECKPOINT

pytestmark = pytest.mark.slow

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLMPRUNE_ROUTE": "probe"}
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
CONFIGS = {
    "llava": ("llava", {}),
    "llava_next": ("llava_next", {}),
    "qwen2_5_vl": ("qwen2_5_vl", {}),  # head-sharded ViT: the scores are summed across ranks
    "qwen2_5_vl-data": ("qwen2_5_vl", {"mm_encoder_tp_mode": "data"}),  # each rank encodes some images
}


def served_methods(family: str) -> list[str]:
    with saved_env({"VLMPRUNE_ROUTE": "probe"}):
        return [m for m in METHODS if served_route(m, family) != "refused"]


def refused_methods(family: str) -> list[str]:
    with saved_env({"VLMPRUNE_ROUTE": "probe"}):
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
    family, engine_options = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(f"tp_{request.param}")
    model_dir, _model, processor = build_model(family, root)
    torch.manual_seed(0)
    RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3)).eval().save(model_dir / EXPLAIN_CHECKPOINT)
    one, two = IMAGES[family][:1], IMAGES[family]
    methods = served_methods(family) if not engine_options else ["fastervlm", "random"]
    specs = [chat_spec(processor, QUESTION, one)]
    for method in methods:
        for images in (one, two):
            trace = f"tp-{method}-{len(images)}-images"
            specs.append(chat_spec(processor, QUESTION, images, policy=policy(method, model_dir, trace)))
    traces = {1: root / "traces_tp1", 2: root / "traces_tp2"}
    for folder in traces.values():
        folder.mkdir()
    reference = StockRun(model_dir, specs, root, plugin=True, env={"VLMPRUNE_ROUTE": "probe", TRACE_DIR_ENV: str(traces[1])},
                         **engine_options)
    try:
        with saved_env({**TP_ENV, TRACE_DIR_ENV: str(traces[2])}):
            engine = Engine(model_dir, **TP_ENGINE, **engine_options)
            timings[f"{request.param}_tp2_start_s"] = engine.start_s
            try:
                yield SimpleNamespace(name=request.param, family=family, engine=engine, specs=specs, processor=processor,
                                      model_dir=model_dir, reference=reference.result(timeout=600)["outputs"],
                                      traces=traces, images=IMAGES[family])
            finally:
                engine.shutdown()
    finally:
        reference.stop()


def read_traces(folder, trace_id: str, n_images: int) -> list[list[int]]:
    return [json.loads((folder / f"{trace_id}.{i}.json").read_text())["kept"] for i in range(n_images)]


def test_every_method_gives_the_tp1_answer(env):
    """Per method, one and two images: the TP=1 engine's prompt, kept tokens, greedy tokens, logprobs."""
    got = env.engine.run(env.specs)
    for spec, mine, want in zip(env.specs, got, env.reference):
        what = f"{env.name} {spec.get('vlmprune', 'stock')}"
        assert mine["prompt_token_ids"] == want["prompt_token_ids"], what
        assert_same_output(mine, want, atol=ATOL, what=what)
        if "vlmprune" in spec:
            trace, n = spec["vlmprune"]["trace"], len(spec["images"])
            assert read_traces(env.traces[2], trace, n) == read_traces(env.traces[1], trace, n), what
    stock = len(got[0]["prompt_token_ids"])
    single = [o for s, o in zip(env.specs[1:], got[1:]) if len(s["images"]) == 1]
    assert single and all(len(o["prompt_token_ids"]) < stock for o in single), "a method pruned nothing"


def test_methods_the_route_cannot_serve_are_refused_and_the_engine_serves_on(env):
    """On the probe route fastv (in-LLM only) and the family's misfits get a PolicyError naming
    the method; the next request is answered as before."""
    refused = refused_methods(env.family)
    assert refused, "no refusable method for this family (the test would check nothing)"
    for method in refused:
        bad = chat_spec(env.processor, QUESTION, env.images[:1], policy={"method": method, "ratio": 0.5})
        with pytest.raises(PolicyError, match=method):
            env.engine.run_one(bad)
        assert_same_output(env.engine.run_one(env.specs[0]), env.reference[0], atol=ATOL, what=f"stock after {method}")


def test_the_in_llm_route_refuses_to_start_a_tp_engine_and_names_the_probe_route(tmp_path_factory):
    """A TP=2 engine on the in-LLM route stops at start with a message naming ``VLMPRUNE_ROUTE=probe``."""
    root = tmp_path_factory.mktemp("tp_in_llm")
    model_dir, _model, processor = build_model("llava", root)
    run = StockRun(model_dir, [chat_spec(processor, QUESTION, IMAGES["llava"][:1])], root, plugin=True,
                   env={**TP_ENV, "VLMPRUNE_ROUTE": "in_llm"}, **TP_ENGINE)
    with pytest.raises(RuntimeError, match="run failed") as failure:
        run.result(timeout=600)
    log = (root / "plugin.log").read_text()
    assert "tensor/pipeline parallel size must be 1" in log and "VLMPRUNE_ROUTE=probe" in log, failure.value

