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
    """A stock vLLM engine (plugin excluded with ``VLLM_PLUGINS``) in a background subprocess, or
    with ``plugin=True`` a plugin engine of another configuration."""

    def __init__(self, model_dir: Path, requests: list[dict[str, Any]], workdir: Path,
                 env: dict[str, str] | None = None, plugin: bool = False, **engine: Any) -> None:
        """``engine``: overrides of the runner's ``ENGINE_KWARGS``; ``plugin``: load vlmprune (a
        reference engine of another configuration, e.g. tensor_parallel_size=1); ``env``: added."""
        name = "plugin" if plugin else "stock"
        self.spec = workdir / f"{name}_spec.json"
        self.out = workdir / f"{name}_out.json"
        self.spec.write_text(json.dumps({"model": str(model_dir), "requests": requests, "engine": engine}))
        env = dict(os.environ, **(env or {}))
        if not plugin:
            env["VLLM_PLUGINS"] = "none"
        self.log = open(workdir / f"{name}.log", "w")
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

    return Request(prompt=request_spec["prompt"], images=[make_image(w, h, seed=s) for w, h, s in request_spec["images"]],
                   preamble=request_spec.get("preamble"))


def median_latency(engine: "Engine", size: tuple[int, int], ratio: float, seed: int, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` one-image fastervlm requests at ``ratio`` (fresh images)."""
    laps = []
    for i in range(repeats):
        request = spec(images=((*size, 100 + seed + i),), policy={"method": "fastervlm", "ratio": ratio})
        started = time.perf_counter()
        engine.run_one(request)
        laps.append(time.perf_counter() - started)
    return statistics.median(laps)


# --- In-LLM mode (vllm_plugin/inllm.py): engines, runs with the stage log, the reference's stages --

IN_LLM_ENV_VARS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
"""Engine core in this process (the stage log is read with ``apply_model``); the route is the
default one (in-LLM: ``VLMPRUNE_ROUTE`` unset)."""
IN_LLM_ENGINE = dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_model_len=1024,
                     max_num_batched_tokens=512, block_size=32)
"""vLLM's defaults as the launcher leaves them (chunked prefill and prefix caching on), with a step
budget shorter than the longest prompts: a prompt with a long text before its image is prefilled
in chunks up to the image, then its span from the image to the end in one step
(``inllm_plan.mark_request``, wrapped in by ``patches``). In-LLM requests must never read a prefix-cache hit, the
others still do. Blocks of 32 tokens (CPU attention needs a multiple of 32; its default, 128, is
longer than these prompts): so hits do happen, and a compacted layer group's rows cross block
boundaries."""
ROUTE_PROBE = {"VLMPRUNE_ROUTE": "probe"}
"""The probe route (transprune / aim scored by the shallow probe at the LLM input, fastv refused):
the plugin modules that test it set it for the whole module (the processor reads it per request)."""
IN_LLM_STEPS = 8


class saved_env:
    """Set environment variables for a block and restore the previous values after it."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> "saved_env":
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)
        return self

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def chat_spec(processor, prompt: str, images=(), policy: Any = "absent", preamble: str | None = None) -> dict[str, Any]:
    """A request spec whose ``text`` is the reference backend's own chat-templated prompt
    (``preamble``: an earlier text turn, as :class:`vlmprune.backends.hf.pipeline.Request`'s)."""
    from vlmprune.backends.hf.pipeline import chat_messages

    text = processor.apply_chat_template(chat_messages(prompt, len(images), preamble), add_generation_prompt=True,
                                         tokenize=False)
    out: dict[str, Any] = {"prompt": prompt, "text": text, "images": [list(i) for i in images]}
    if preamble is not None:
        out["preamble"] = preamble
    if policy != "absent":
        out["vlmprune"] = policy
    return out


def inllm_sampling():
    """Greedy ``IN_LLM_STEPS`` tokens, no EOS stop, top-5 logprobs."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=IN_LLM_STEPS, temperature=0.0, logprobs=5, ignore_eos=True)


def inllm_run(engine: "Engine", specs: list[dict[str, Any]]):
    """(outputs, in-LLM log records in request order, None where a request ran no stage) of one
    ``generate`` call."""
    from vlmprune.vllm_plugin import inllm_plan

    engine.llm.apply_model(lambda _m: inllm_plan.read_log())
    outs = engine.llm.generate([vllm_request(s) for s in specs], inllm_sampling(), use_tqdm=False)
    (log,) = engine.llm.apply_model(lambda _m: inllm_plan.read_log())

    def record(request_id):  # the engine core suffixes the request id ("<id>-<random>")
        found = [rec for rec in log if rec["req_id"] == request_id or rec["req_id"].startswith(request_id + "-")]
        assert len(found) <= 1, f"several in-LLM records for request {request_id}"
        return found[0] if found else None

    return [summarize(o) for o in outs], [record(o.request_id) for o in outs]


def vllm_kept(record) -> list[list[list[int]]]:
    """Per stage, per image: image-local indices (placeholder rows, LLaVA-NeXT's newline rows
    included) still present after the stage."""
    import torch

    out = []
    for kept in record["decisions"]:
        kept = torch.tensor(kept)
        runs = [torch.arange(offset, offset + length) for offset, length in record["runs"]]
        out.append([(kept[torch.isin(kept, run)] - run[0]).tolist() for run in runs])
    return out


def inllm_reference(ref, spec: dict[str, Any], policy: dict[str, Any]):
    """(greedy tokens, per stage per image the image-local kept indices in vLLM's placeholder space,
    each token's logprob) from the transformers reference backend ``ref`` (``IN_LLM_STEPS`` tokens)."""
    import torch

    (pre,) = ref.prefill([hf_request(spec)], policy)
    tokens, logprobs, logits = [], [], pre.logits
    for _ in range(IN_LLM_STEPS):  # greedy, with the chosen token's logprob (the tiny model repeats
        lp = logits.float().log_softmax(-1)  # tokens, so tokens alone would miss a wrong decode step)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(float(lp[token]))
        logits = pre.decoder.extend([token])[-1]
    spans = pre.sequence.image_spans  # rows of the LLM-input sequence
    stages = []
    if policy["method"] in ("transprune", "explain") and any(
            int(k.numel()) < im.n_tokens for k, im in zip(pre.kept_index, pre.images)):
        stages.append([k.tolist() for k in pre.kept_index])  # its LLM-input stage = layer 0 in vLLM
    state = pre.decoder._state
    for decision in (state.decisions if state is not None else []):
        per_image = []
        for i, span in enumerate(spans):
            pos = torch.searchsorted(span, decision[torch.isin(decision, span)])  # rows of the input span
            per_image.append((pre.kept_index[i][pos] if policy["method"] == "transprune" else pos).tolist())
        stages.append(per_image)
    return tokens, stages, logprobs


def ship_explain_cnn(model_dir: Path, model: Any) -> Path:
    """A small seeded RelevanceCNN saved beside the served model (where vLLM's worker looks for it),
    and the in-memory reference model pointed at the same folder (where the reference looks), so
    ``{"method": "explain", ...}`` needs no ``checkpoint`` on either side."""
    import torch

    from vlmprune.core.explain import CHECKPOINT_NAME, RelevanceCNN, RelevanceCNNConfig

    torch.manual_seed(0)
    path = Path(model_dir) / CHECKPOINT_NAME
    RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3)).eval().save(path)
    model.name_or_path = str(model_dir)
    return path


def assert_batch_gives_solo_answers(engine: "Engine", specs: list[dict[str, Any]]) -> None:
    """Each request of one mixed ``generate`` batch gets what it gets alone: output and kept rows."""
    solo = [inllm_run(engine, [s]) for s in specs]
    batch, records = inllm_run(engine, specs)
    for i, ((s_out,), (s_rec,)) in enumerate(solo):
        assert_same_output(batch[i], s_out, atol=1e-4, what=f"request {i}")
        assert (records[i] is None) == (s_rec is None)
        if s_rec is not None:
            assert records[i]["decisions"] == s_rec["decisions"], f"request {i}: kept rows differ in the batch"


PREAMBLE = " ".join(["there is a red box and a blue circle on the left ."] * 50)
"""~550 tokens of an earlier text turn: with the images, longer than the in-LLM engines' 512-token step."""


def assert_chunked_preamble_equals_reference(engine: "Engine", ref, make, policies, atol: float) -> list[dict[str, Any]]:
    """Each policy on ``make(policy, PREAMBLE)`` (a spec whose text before the images makes the
    prompt longer than one engine step): the prompt is prefilled in chunks up to its first image,
    then its span in one step whose stages read the earlier chunks' keys from the KV cache; kept
    rows per stage, greedy tokens and logprobs equal the reference ``ref``. Returns the specs."""
    config = engine.llm.llm_engine.vllm_config.scheduler_config
    assert config.enable_chunked_prefill
    specs = []
    for policy in policies:
        spec = make(policy, PREAMBLE)
        (out,), (record,) = inllm_run(engine, [spec])
        what = str(policy)
        assert len(out["prompt_token_ids"]) > config.max_num_batched_tokens, f"{what}: fits one step, nothing chunked"
        assert record is not None and record["runs"][0][0] > 500, f"{what}: {record and record['runs']}"
        tokens, stages, lps = inllm_reference(ref, spec, policy)
        assert vllm_kept(record) == stages, f"{what}: kept rows per stage differ"
        assert out["token_ids"] == tokens, f"{what}: greedy tokens differ"
        assert_logprobs(out, tokens, lps, what, atol)
        specs.append(spec)
    return specs


CHUNKED_POLICIES = ({"method": "transprune", "ratio": 0.9}, {"method": "aim", "ratio": 0.9}, {"method": "fastv", "ratio": 0.5})


def assert_logprobs(out: dict[str, Any], tokens: list[int], want: list[float], what: str, atol: float) -> None:
    """Each greedy token's logprob equals the reference's within ``atol``."""
    for step, (token, lp) in enumerate(zip(tokens, want)):
        got = out["logprobs"][step][str(token)]
        assert abs(got - lp) <= atol, f"{what}: step {step} logprob {got} vs reference {lp}"

