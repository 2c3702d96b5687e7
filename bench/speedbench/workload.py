"""What is measured: the configurations (stock, the plugin at each method x ratio) and the requests,
the same prompt and image for every configuration at one request index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmprune.methods import names

INSTRUCTION_METHODS = names("probe")
"""Methods whose vLLM probe reads the request's instruction (``MethodSpec.probe``)."""


@dataclass(frozen=True)
class Config:
    """One measured configuration: which engine, and the request's policy (None: no policy key)."""

    name: str
    engine: str  # "stock" | "plugin" (VLMPRUNE_ROUTE=probe) | "inllm" (the plugin on its default route)
    method: str | None = None
    ratio: float = 0.0
    text_only: bool = False
    """The measured engine ideal: stock vLLM on the request's text with the image's placeholder run
    replaced by ``kept_count(n_visual, ratio)`` text tokens (no image: only its LLM time is used)."""

    def policy(self, instruction: str) -> dict[str, Any] | None:
        if self.method is None:
            return None
        out: dict[str, Any] = {"method": self.method, "ratio": self.ratio}
        if self.method in INSTRUCTION_METHODS and self.engine != "inllm":  # in-LLM: the prompt's own rows
            out["instruction"] = instruction
        return out


QUESTIONS = (
    "what colour is the box on the left ?",
    "how many red square are there in the image ?",
    "describe this picture .",
    "is there a blue circle at the top ?",
    "which shape is in the middle of the image ?",
    "what is at the bottom right of the picture ?",
)


def request_spec(index: int, config: Config, attempt: int = 0) -> dict[str, Any]:
    """Request ``index`` (same prompt and image for every configuration) under ``config``'s policy.

    ``attempt`` changes only the image (same size, same token counts): a repeated request must not
    find its image in vLLM's encoder cache, which is shared across requests with the same image.
    """
    question = QUESTIONS[index % len(QUESTIONS)]
    return {"question": question, "seed": index * 16 + attempt, "policy": config.policy(question),
            "text_only_ratio": config.ratio if config.text_only else None}


def plugin_methods(family: str = "llava") -> list[str]:
    """Methods the installed plugin serves for ``family`` (read from its model class, no engine)."""
    from vlmprune.methods import METHODS
    from vlmprune.vllm_plugin.llava import PrunedLlava

    return [m for m in METHODS if m in PrunedLlava.vlmprune_methods and family in METHODS[m].models]


IN_LLM_CHOICES = ("both", "only", "off")
"""``--in-llm``: the in-LLM methods (``MethodSpec.in_llm``) on the in-LLM engine and
their probe variants on the plugin engine (both), the in-LLM rows only, or the probe rows only (off)."""


def make_configs(methods: list[str], ratios: list[float], in_llm: str = "off") -> list[Config]:
    """Stock, the plugin at ratio 0 (the same code path for every method), then method x ratio, then
    one ``engine ideal r=R`` row per ratio (:attr:`Config.text_only`).

    An in-LLM method (transprune, aim, fastv, explain) gets, unless ``in_llm == "off"``, a row ``M r=R`` on the
    in-LLM engine and (``both``, where the probe serves it) a row ``M (probe) r=R`` on the plugin
    engine; with ``off`` it keeps its old name ``M r=R`` on the plugin engine (probe). ``fastv`` has
    no probe variant: it needs in-LLM rows.
    """
    in_llm_methods = names("in_llm")
    if in_llm not in IN_LLM_CHOICES:
        raise ValueError(f"in_llm must be one of {IN_LLM_CHOICES}, got {in_llm!r}")
    probe_served = set(plugin_methods())
    rows: list[Config] = []
    for method in methods:
        for ratio in ratios:
            if ratio <= 0:
                continue
            r = f"r={ratio:g}"
            if method in in_llm_methods and in_llm != "off":
                rows.append(Config(f"{method} {r}", "inllm", method, ratio))
                if in_llm == "both" and method in probe_served:
                    rows.append(Config(f"{method} (probe) {r}", "plugin", method, ratio))
            elif method in in_llm_methods and method not in probe_served:
                raise ValueError(f"{method!r} runs only inside the LLM: use --in-llm both or only")
            else:
                rows.append(Config(f"{method} {r}", "plugin", method, ratio))
    # ratio 0 (no stage, the plugin's pass-through) on the plugin engine, or the in-LLM one if it is alone
    r0_engine = "plugin" if not rows or any(c.engine == "plugin" for c in rows) else "inllm"
    first = next((m for m in methods if r0_engine == "inllm" or m in probe_served), "fastervlm")
    ideals = [Config(f"engine ideal r={r:g}", "stock", None, r, text_only=True) for r in ratios if r > 0]
    return [Config("stock", "stock"), Config("plugin r=0", r0_engine, first, 0.0), *rows, *ideals]
