"""Accuracy of a testbed model under a pruning policy: ``vlmprune eval``.

Each sample is one test-split scene + question of :mod:`vlmprune.testbed.scenes`; the model answers
greedily and a sample is correct when the answer text (stripped) equals the expected word. The test
samples are always indices ``0..N-1`` of the split, so every method and ratio sees the same data;
``seed`` seeds the seeded methods (``random`` gets ``seed * 1_000_003 + index`` per sample, so each
sample draws its own subset, reproducibly).

Per family the result carries the chance level: the accuracy of always giving that family's most
frequent answer on the same samples.

``explain_scores`` (explain, hf backend) says what ranks the tokens: ``cnn``, the method itself;
``input``, the CNN's own raw input (layer-0 instruction attention: the ablation that shows what the
CNN adds); ``oracle``, the teacher's relevance of the model's own ratio-0 answer
(:func:`vlmprune.testbed.train_explain.teacher_relevance`, one backward pass per sample: a ceiling
for any student, evaluation only, never served).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BACKENDS = ("hf", "vllm")
EXPLAIN_SCORES = ("cnn", "input", "oracle")


class InputRelevance:
    """Stands in for the explain CNN: ranks tokens by the CNN's raw input (``explain-input``)."""

    def relevance(self, attn: Any) -> Any:
        return attn


class FixedRelevance:
    """Stands in for the explain CNN with one sample's precomputed relevance (``oracle``)."""

    def __init__(self, scores: Any) -> None:
        self.scores = scores

    def relevance(self, attn: Any) -> Any:
        if attn.shape != self.scores.shape:
            raise ValueError(f"relevance of shape {tuple(self.scores.shape)} for {tuple(attn.shape)} tokens")
        return self.scores.to(attn.device)


def evaluate(
    model: str | Path,
    method: str = "fastervlm",
    ratio: float = 0.0,
    samples: int = 300,
    seed: int = 0,
    split: str = "test",
    backend: str = "hf",
    options: dict[str, Any] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    device: str | None = None,
    explain_scores: str = "cnn",
    teacher_cache: dict[int, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (a shipped name or a folder) and return the result dict (see module doc).
    ``device`` (hf backend): torch device of the model, default the GPU when there is one.
    ``explain_scores``: see the module doc (``cnn`` unless the method is explain on the hf backend).
    ``teacher_cache``: sample index -> teacher relevance, filled and reused by ``oracle`` runs (pass
    the same dict to every ratio of one model: the teacher does not depend on the ratio)."""
    from vlmprune.policy import parse_policy
    from vlmprune.testbed import scenes
    from vlmprune.testbed.registry import resolve_model, scene_layout

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if split not in scenes.SPLITS:
        raise ValueError(f"split must be one of {', '.join(scenes.SPLITS)}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if explain_scores not in EXPLAIN_SCORES:
        raise ValueError(f"explain_scores must be one of {', '.join(EXPLAIN_SCORES)}, got {explain_scores!r}")
    if explain_scores != "cnn" and (method != "explain" or backend != "hf"):
        raise ValueError(f"explain_scores={explain_scores!r} applies to method 'explain' on the hf backend only")
    base = {"method": method, "ratio": ratio, **(options or {})}
    policy = parse_policy(base)  # validates once, names the offending field
    path = resolve_model(model)
    if backend == "vllm":
        if device is not None:
            raise ValueError("--device applies to the hf backend (vLLM picks its own platform)")
        return _evaluate_vllm(path, str(model), base, policy, samples, seed, split, batch_size, progress)

    import torch
    from tqdm import tqdm

    from vlmprune.backends.hf import ReferenceBackend, Request

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = ReferenceBackend.from_pretrained(path, device=device)
    size, scale = scene_layout(engine.model.config)  # the canvas the scenes are drawn on
    data = [scenes.sample(split, i, scale) for i in range(samples)]
    records = []
    t0 = time.time()
    with torch.no_grad(), tqdm(total=samples, desc=f"eval {method}@{policy.ratio}", file=sys.stderr,
                               disable=not progress) as bar:
        for start in range(0, samples, batch_size):
            chunk = data[start : start + batch_size]
            if policy.method == "random":
                # One policy per sample (its own seed): prefill each request separately.
                gens = []
                for s in chunk:
                    pol = parse_policy({**base, "seed": seed * 1_000_003 + s.index})
                    req = Request(s.question, [scenes.render(s.scene, size)])
                    gens += engine.generate([req], pol, max_new_tokens=3)
            elif explain_scores == "oracle" and policy.ratio > 0:
                # Per sample: the teacher's relevance of the model's own unpruned answer ranks its tokens.
                from vlmprune.testbed.train_explain import teacher_relevance

                gens = []
                cache = {} if teacher_cache is None else teacher_cache
                for s in chunk:
                    req = Request(s.question, [scenes.render(s.scene, size)])
                    if s.index not in cache:
                        answer = engine.generate([req], None, max_new_tokens=3)[0]
                        ((seq, images),) = engine.sequences([req])
                        cache[s.index] = teacher_relevance(engine, seq, images[0], answer.token_ids, engine.eos_ids())
                    gens += engine.generate([req], policy, max_new_tokens=3, explain_model=FixedRelevance(cache[s.index]))
            else:
                reqs = [Request(s.question, [scenes.render(s.scene, size)]) for s in chunk]
                stand_in = InputRelevance() if explain_scores == "input" else None
                gens = engine.generate(reqs, policy, max_new_tokens=3, explain_model=stand_in)
            for s, g in zip(chunk, gens):
                answer = g.text.strip()
                records.append(
                    {"family": s.family, "answer": s.answer, "output": answer, "correct": answer == s.answer,
                     "visual_tokens": g.visual_tokens, "kept_tokens": g.kept_tokens}
                )
            bar.update(len(chunk))
    return summarize(records, model=str(model), path=str(path), backend=backend, split=split, seed=seed,
                     policy=policy.model_dump(mode="json"), wall_s=time.time() - t0, device=device,
                     explain_scores=explain_scores)


def _evaluate_vllm(
    path: Path, model: str, base: dict[str, Any], policy: Any, samples: int, seed: int, split: str,
    batch_size: int, progress: bool,
) -> dict[str, Any]:
    """The same samples through one vLLM engine with the vlmprune plugin, the policy per request.

    Prompts are the reference backend's (the processor's chat template, one user turn: image, then
    the question); answers are greedy, at most 3 tokens, decoded by the model's tokenizer exactly as
    the reference backend decodes. Instruction-aware methods get the question as their instruction
    (as the gateway does). Token counts are of prunable patch tokens, as the reference backend
    counts them: ``visual_tokens`` from the stock processor's placeholders (checked against
    :mod:`vlmprune.geometry`), ``kept_tokens`` from the prompt vLLM actually served, both less
    LLaVA-NeXT's never-pruned newline tokens.
    """
    import os

    from tqdm import tqdm
    from transformers import AutoConfig, AutoProcessor

    from vlmprune.testbed import scenes

    try:
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        from vlmprune.vllm_plugin.request_policy import PROBE_METHODS
        from vlmprune.wire import INSTRUCTION_KEY, POLICY_KEY
    except ImportError as exc:
        raise ValueError(f"backend 'vllm' needs vLLM installed (pip install -e .[cpu] or .[gpu]): {exc}") from None

    from vlmprune.geometry import ModelVisionSpec
    from vlmprune.testbed.registry import scene_layout

    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    hf_config = AutoConfig.from_pretrained(path)
    size, scale = scene_layout(hf_config)  # the reference backend's canvas
    max_len = min(2048, int(getattr(hf_config.get_text_config(), "max_position_embeddings", 2048)))
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)

    cpu = current_platform.is_cpu()
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves far more
    # vLLM's own defaults (chunked prefill, prefix caching) on every route; the step budget holds any
    # prompt of max_len, so every in-LLM request fits one step (vlmprune.vllm_plugin.inllm).
    llm = LLM(
        model=str(path),
        dtype="float32" if cpu else "auto",  # CPU: bf16 is emulated (7x slower); GPU: the checkpoint's dtype
        enforce_eager=cpu,
        max_model_len=max_len,
        max_num_batched_tokens=max(max_len, 2048),
        limit_mm_per_prompt={"image": 1},
        max_num_seqs=batch_size,
        seed=0,
    )
    params = SamplingParams(max_tokens=3, temperature=0.0)
    data = [scenes.sample(split, i, scale) for i in range(samples)]
    spec = ModelVisionSpec.from_pretrained(path)
    stock_counts: dict[tuple[int, int], Any] = {}  # image size -> geometry.ImageTokenCounts
    records = []
    t0 = time.time()
    try:
        with tqdm(total=samples, desc=f"eval[vllm] {policy.method}@{policy.ratio}", file=sys.stderr,
                  disable=not progress) as bar:
            for start in range(0, samples, batch_size):
                chunk = data[start : start + batch_size]
                prompts, images = [], []
                for s in chunk:
                    image = scenes.render(s.scene, size)
                    content = [{"type": "image"}, {"type": "text", "text": s.question}]
                    text = processor.apply_chat_template(
                        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                    )
                    request_policy = dict(base)
                    if policy.method == "random":
                        request_policy["seed"] = seed * 1_000_003 + s.index  # the reference backend's rule
                    if policy.method in PROBE_METHODS:
                        request_policy[INSTRUCTION_KEY] = s.question
                    prompts.append({
                        "prompt": text,
                        "multi_modal_data": {"image": image},
                        "mm_processor_kwargs": {POLICY_KEY: request_policy},
                    })
                    images.append((text, image))
                outputs = llm.generate(prompts, params, use_tqdm=False)
                for s, out, (text, image) in zip(chunk, outputs, images):
                    if image.size not in stock_counts:  # the unpruned count of this image size
                        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
                        geo = spec.image_tokens(*image.size)
                        if int((ids == image_token_id).sum()) != geo.total:
                            raise ValueError(f"{path}: the processor gives {int((ids == image_token_id).sum())} image "
                                             f"tokens for a {image.size} image, vlmprune's geometry {geo.total}")
                        stock_counts[image.size] = geo
                    geo = stock_counts[image.size]
                    tokens = list(out.outputs[0].token_ids)
                    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    served = sum(1 for t in out.prompt_token_ids if t == image_token_id)
                    records.append(
                        {"family": s.family, "answer": s.answer, "output": answer, "correct": answer == s.answer,
                         "visual_tokens": geo.prunable, "kept_tokens": served - geo.newline}
                    )
                bar.update(len(chunk))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return summarize(records, model=model, path=str(path), backend="vllm", split=split, seed=seed,
                     policy=policy.model_dump(mode="json"), wall_s=time.time() - t0, device="cpu" if cpu else "cuda",
                     explain_scores="cnn")  # the served explain method always ranks with its CNN


def summarize(records: list[dict[str, Any]], **header: Any) -> dict[str, Any]:
    """Accuracy overall and per family, chance per family, mean visual/kept tokens per sample."""
    from vlmprune.testbed.scenes import FAMILIES, majority_chance

    n = len(records)
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    families = [f for f in FAMILIES if f in by_family] + sorted(set(by_family) - set(FAMILIES))
    policy = header.get("policy", {})
    return {
        **header,
        "method": policy.get("method"),
        "ratio": policy.get("ratio"),
        "samples": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "visual_tokens": sum(r["visual_tokens"] for r in records) / n if n else 0.0,
        "kept_tokens": sum(r["kept_tokens"] for r in records) / n if n else 0.0,
        "per_family": {f: sum(r["correct"] for r in by_family[f]) / len(by_family[f]) for f in families},
        "per_family_samples": {f: len(by_family[f]) for f in families},
        "chance": {f: majority_chance([r["answer"] for r in by_family[f]]) for f in families},
        "outputs": [r["output"] for r in records],
    }


def render_text(result: dict[str, Any]) -> str:
    """A short human-readable table of one result (printed before the JSON line without --json)."""
    lines = [
        f"model {result['model']}  backend {result['backend']}  method {result['method']}  ratio {result['ratio']}",
        f"accuracy {result['accuracy']:.3f} on {result['samples']} {result['split']} samples; visual tokens "
        f"{result['visual_tokens']:.1f}, kept {result['kept_tokens']:.1f} per sample; {result['wall_s']:.1f} s",
        f"{'family':<10} {'n':>4} {'accuracy':>9} {'chance':>7}",
    ]
    for f, acc in result["per_family"].items():
        lines.append(f"{f:<10} {result['per_family_samples'][f]:>4} {acc:>9.3f} {result['chance'][f]:>7.3f}")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``vlmprune eval``: the result's JSON object is always the LAST line of stdout; without
    ``--json`` a readable table comes first. Progress goes to stderr."""
    import json

    from vlmprune.cli_options import ratio_value, set_options

    options = set_options(args.set)
    ratio = ratio_value(args.ratio)
    result = evaluate(
        args.model, method=args.method, ratio=ratio, samples=args.samples, seed=args.seed, split=args.split,
        backend=args.backend, options=options, batch_size=args.batch_size, progress=not args.no_progress,
        device=args.device,
    )
    if not args.json:
        print(render_text(result))
    print(json.dumps(result))
    return 0
