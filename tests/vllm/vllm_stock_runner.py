"""Requests as plain data, and a stock-vLLM runner for them (run as a subprocess by the tests).

The stock engine must run without the vlmprune plugin and in a process of its own (one process
never hosts two engines): ``python vllm_stock_runner.py SPEC.json OUT.json`` with
``VLLM_PLUGINS=none`` in the environment (vLLM's allow-list: no general plugin is loaded).

A request spec is ``{"prompt": str, "images": [[width, height, seed], ...], "vlmprune": policy|None}``;
the images are :func:`vlmprune.testbed.tiny.make_image` ones, so every process rebuilds the same pixels.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

# Kept small: these engines run on a shared 2-core CPU machine.
ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    limit_mm_per_prompt={"image": 2},
    enable_chunked_prefill=True,
    max_num_batched_tokens=32,
    max_num_seqs=8,
    seed=0,
)
"""``max_num_batched_tokens=32`` splits every image (36 to 88 tokens) over prefill chunks."""
MAX_TOKENS = 4
TOP_LOGPROBS = 5


def vllm_request(spec: dict[str, Any], chat_template: str | None = None) -> dict[str, Any]:
    """The ``LLM.generate`` prompt dict of a spec (LLaVA's ``USER: <image>\\n... ASSISTANT:`` format)."""
    from vlmprune.testbed.tiny import make_image

    images = [make_image(w, h, seed=s) for w, h, s in spec["images"]]
    text = "USER: " + "<image>\n" * len(images) + spec["prompt"] + " ASSISTANT:"
    if spec.get("text") is not None:  # a ready-made prompt (e.g. Qwen's ChatML, test_plugin_qwen.py)
        text = spec["text"]
    request: dict[str, Any] = {"prompt": text}
    if images:
        request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    if "vlmprune" in spec:
        request["mm_processor_kwargs"] = {"vlmprune": spec["vlmprune"]}
    return request


def summarize(output: Any) -> dict[str, Any]:
    """What the tests compare of one ``RequestOutput``: prompt ids, generated ids, top logprobs."""
    completion = output.outputs[0]
    logprobs = [
        {str(token): float(lp.logprob) for token, lp in step.items()} for step in (completion.logprobs or [])
    ]
    return {
        "prompt_token_ids": list(output.prompt_token_ids),
        "token_ids": list(completion.token_ids),
        "logprobs": logprobs,
    }


def sampling_params():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP_LOGPROBS, ignore_eos=True)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(model=spec["model"], **dict(ENGINE_KWARGS, **spec.get("engine", {})))
    start_s = time.perf_counter() - started
    outputs = llm.generate([vllm_request(r) for r in spec["requests"]], sampling_params(), use_tqdm=False)
    result = {"start_s": start_s, "outputs": [summarize(o) for o in outputs]}
    with open(out_path, "w") as f:
        json.dump(result, f)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2])
