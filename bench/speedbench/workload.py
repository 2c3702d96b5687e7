"""What is measured: the configurations (stock, the plugin at each method x ratio) and the requests,
the same prompt and image for every configuration at one request index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


INSTRUCTION_METHODS = frozenset({"transprune", "explain", "aim"})
"""Methods whose vLLM probe reads the request's instruction (``vllm_plugin.common.PROBE_METHODS``;
checked against it at start-up)."""


@dataclass(frozen=True)
class Config:
    """One measured configuration: which engine, and the request's policy (None: no policy key)."""

    name: str
    engine: str  # "stock" | "plugin"
    method: str | None = None
    ratio: float = 0.0

    def policy(self, instruction: str) -> dict[str, Any] | None:
        if self.method is None:
            return None
        out: dict[str, Any] = {"method": self.method, "ratio": self.ratio}
        if self.method in INSTRUCTION_METHODS:
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
    return {"question": question, "seed": index * 16 + attempt, "policy": config.policy(question)}


def plugin_methods(family: str = "llava") -> list[str]:
    """Methods the installed plugin serves for ``family`` (read from its model class, no engine)."""
    from vlmprune.methods import METHODS
    from vlmprune.vllm_plugin.llava import PrunedLlava

    return [m for m in METHODS if m in PrunedLlava.vlmprune_methods and family in METHODS[m].models]


def make_configs(methods: list[str], ratios: list[float]) -> list[Config]:
    """Stock, the plugin at ratio 0 (the same code path for every method), then method x ratio."""
    first = methods[0] if methods else "fastervlm"
    configs = [Config("stock", "stock"), Config("plugin r=0", "plugin", first, 0.0)]
    for method in methods:
        for ratio in ratios:
            if ratio > 0:
                configs.append(Config(f"{method} r={ratio:g}", "plugin", method, ratio))
    return configs
