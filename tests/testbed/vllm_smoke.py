"""Manual check (not collected by pytest: an engine start takes about a minute here): the shipped
``demo`` model loads in stock vLLM 0.32 and answers a few test questions.

    VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 .venv/bin/python tests/testbed/vllm_smoke.py [MODEL_DIR]
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from vllm import LLM, SamplingParams

    from vlmprune.testbed import scenes
    from vlmprune.testbed.registry import resolve_model
    from vlmprune.testbed.lm_stage import prompt_text

    path = resolve_model(sys.argv[1] if len(sys.argv) > 1 else "demo")
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=1024,
              limit_mm_per_prompt={"image": 1})
    size = json.loads((path / "config.json").read_text())["vision_config"]["image_size"]
    samples = [scenes.sample("test", i) for i in range(10)]
    prompts = [
        {"prompt": prompt_text(s.question), "multi_modal_data": {"image": scenes.render(s.scene, size)}}
        for s in samples
    ]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3))
    correct = 0
    for s, o in zip(samples, outs):
        answer = o.outputs[0].text.strip()
        correct += answer == s.answer
        print(f"{s.family:<10} {s.question!r:<60} expected {s.answer!r:<10} got {answer!r} "
              f"(prompt tokens {len(o.prompt_token_ids)})")
    print(json.dumps({"vllm_correct": correct, "samples": len(samples)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
