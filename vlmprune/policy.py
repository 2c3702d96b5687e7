"""Compression policies: which method, how much (``ratio``), and the method's own options.

One budget notion everywhere: ``ratio`` is the fraction of visual tokens removed, ``0 <= ratio < 1``.
For pre-LLM methods it is the fraction removed at the LLM input; for progressive in-LLM methods
(``transprune``, ``aim``, ``fastv``) it is the *layer-averaged* fraction removed, so that equal ratios cost
roughly equal LLM FLOPs across methods (see :mod:`vlmprune.core.schedule`).

``kept_count`` is the only place a kept-token count is computed: the vLLM processor (which must
know the count before the vision encoder runs) and every pruner call it. An image with several
views (LLaVA-NeXT: the thumbnail and each AnyRes crop) keeps ``kept_count`` of every view
separately, as FasterVLM's official code budgets each view (:func:`view_kept_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

MethodName = Literal["fastervlm", "globalcom2", "aim", "transprune", "fastv", "explain", "random", "pool"]
METHOD_NAMES: tuple[str, ...] = ("fastervlm", "globalcom2", "aim", "transprune", "fastv", "explain", "random", "pool")

# Ratios are rounded to this step before use, so that the processor and the model compute identical
# counts from the same float and caches are not fragmented by near-identical ratios.
RATIO_STEP = 0.005


class PolicyError(ValueError):
    """A compression policy that cannot be used; the message names the field and the value."""


def kept_count(n_visual: int, ratio: float) -> int:
    """Visual tokens kept out of ``n_visual`` when a fraction ``ratio`` is removed.

    Round half up of ``n * (1 - ratio)``, at least 1 (0 for an empty grid), at most ``n``.
    A tiny epsilon makes values that are a half in exact arithmetic but land just below it in
    binary floating point (e.g. ``10 * (1 - 0.35)``) round up consistently.
    """
    if n_visual < 0:
        raise ValueError(f"n_visual must be >= 0, got {n_visual}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if n_visual == 0:
        return 0
    kept = math.floor(n_visual * (1.0 - ratio) + 0.5 + 1e-9)
    return min(n_visual, max(1, kept))


def view_kept_counts(view_sizes: Sequence[int], ratio: float) -> list[int]:
    """Prunable tokens kept per view of one image: ``kept_count`` of each view by itself.

    ``view_sizes``: an image's prunable tokens per view (one entry for single-view models;
    LLaVA-NeXT: the thumbnail, then each crop's tokens left after unpadding, row-major). FasterVLM's
    official LLaVA-NeXT code takes the top ``T`` of every view; the sum is the image's count
    (:func:`image_kept_count`), a pure function of geometry and ratio. An all-padding crop keeps 0.
    """
    return [kept_count(int(n), ratio) for n in view_sizes]


def image_kept_count(view_sizes: Sequence[int], ratio: float) -> int:
    """Prunable tokens one image keeps at ``ratio``: the sum of :func:`view_kept_counts`."""
    return sum(view_kept_counts(view_sizes, ratio))


def bucket_ratio(ratio: float) -> float:
    """Round a ratio to the policy grid (``RATIO_STEP``), staying inside ``[0, 1)``."""
    steps = round(ratio / RATIO_STEP)
    bucketed = round(steps * RATIO_STEP, 6)
    return min(bucketed, 1.0 - RATIO_STEP)


class _PolicyBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of visual tokens removed (layer-averaged for progressive methods)."""

    @field_validator("ratio", mode="before")
    @classmethod
    def _finite_number(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be finite, got {value}")
        return value

    @field_validator("ratio", mode="after")
    @classmethod
    def _bucket(cls, value: float) -> float:
        return bucket_ratio(value)


class FasterVLMPolicy(_PolicyBase):
    """[CLS]->patch attention of the penultimate ViT layer; mean attention received on Qwen."""

    method: Literal["fastervlm"] = "fastervlm"


class GlobalCom2Policy(_PolicyBase):
    """Thumbnail-guided per-crop budgets for AnyRes models (LLaVA-NeXT)."""

    method: Literal["globalcom2"] = "globalcom2"
    temperature: float = Field(10.0, gt=0.0)
    """Softmax temperature over per-crop thumbnail scores (tau in the paper)."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the crop's own (local) scores; ``1 - alpha`` goes to the thumbnail (global) map."""


class AIMPolicy(_PolicyBase):
    """ToMe-style merging before the LLM, then PageRank importance pruning inside it."""

    method: Literal["aim"] = "aim"
    merge_keep: float = Field(0.4375, gt=0.0, le=1.0)
    """Fraction of visual tokens left by the merge stage at the paper's ratio (576 -> 252)."""
    pagerank_temperature: float = Field(0.1, gt=0.0)
    pagerank_iterations: int = Field(5, ge=1, le=50)
    probe_layers: int = Field(2, ge=1, le=8)
    """vLLM shallow probe only: decoder layers run to score tokens before the LLM input."""


class TransPrunePolicy(_PolicyBase):
    """Token transition variation + instruction-guided attention, progressive in the LLM."""

    method: Literal["transprune"] = "transprune"
    direction: Literal["one_minus_cos", "one_minus_abs_cos"] = "one_minus_cos"
    """Direction term of TTV: the released code's ``1 - cos`` or the paper's ``1 - |cos|``."""
    positions: Literal["reindex", "original"] = "reindex"
    """LLaVA: re-index positions after each stage (paper) or keep the original ids. Qwen always
    keeps the original M-RoPE ids."""
    probe_layers: int = Field(2, ge=1, le=8)
    """vLLM shallow probe only: decoder layers run to score tokens before the LLM input."""


class FastVPolicy(_PolicyBase):
    """Attention from the prompt's last token in layer K-1 ranks the image; pruned after layer K."""

    method: Literal["fastv"] = "fastv"
    layer: int | None = Field(None, ge=1, le=256)
    """K: layers before it see every token, the stage runs after it. None: the paper's K = 2 on a
    32-layer LLM, depth-scaled to the served LLM (4 layers: 1); an int is that layer exactly and
    must be below the served LLM's depth."""
    query: Literal["last", "instruction"] = "last"
    """Whose attention ranks the image: the prompt's last token (paper, official code) or the mean
    over the instruction rows (all text after the last image; an option, not the paper)."""


class ExplainPolicy(_PolicyBase):
    """Learned relevance from layer-0 instruction->visual attention (a small 1-D CNN)."""

    method: Literal["explain"] = "explain"
    checkpoint: str | None = None
    """Path of the CNN weights; default: the weights shipped beside the served model."""


class RandomPolicy(_PolicyBase):
    """Uniformly random subset, seeded (a baseline)."""

    method: Literal["random"] = "random"
    seed: int = Field(0, ge=0)


class PoolPolicy(_PolicyBase):
    """Spatial average pooling to the same count (a baseline)."""

    method: Literal["pool"] = "pool"


Policy = Annotated[
    Union[
        FasterVLMPolicy,
        GlobalCom2Policy,
        AIMPolicy,
        TransPrunePolicy,
        FastVPolicy,
        ExplainPolicy,
        RandomPolicy,
        PoolPolicy,
    ],
    Field(discriminator="method"),
]
PolicyT = Union[
    FasterVLMPolicy, GlobalCom2Policy, AIMPolicy, TransPrunePolicy, FastVPolicy, ExplainPolicy, RandomPolicy,
    PoolPolicy,
]
_POLICY_ADAPTER: TypeAdapter[PolicyT] = TypeAdapter(Policy)



def parse_policy(value: Mapping[str, Any] | PolicyT | None = None, **overrides: Any) -> PolicyT:
    """Validate a policy given as a mapping (or an existing policy plus overrides).

    Raises :class:`PolicyError` whose message names the offending field, the value received and
    what is allowed; an unknown method lists the known ones.
    """
    if isinstance(value, _PolicyBase):
        data: dict[str, Any] = value.model_dump()
    elif value is None:
        data = {}
    elif isinstance(value, Mapping):
        data = dict(value)
    else:
        raise PolicyError(f"policy must be a mapping, got {type(value).__name__}")
    data.update(overrides)
    data.setdefault("method", "fastervlm")
    method = data["method"]
    if not isinstance(method, str) or method not in METHOD_NAMES:
        raise PolicyError(f"unknown method {method!r}; known methods: {', '.join(METHOD_NAMES)}")
    try:
        return _POLICY_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise PolicyError(_describe(exc, data)) from None


def _describe(exc: ValidationError, data: Mapping[str, Any]) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if str(p) != data.get("method")]
        field = ".".join(loc) or "policy"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown option {field!r} for method {data.get('method')!r}")
            continue
        received = data.get(loc[0]) if loc else None
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"field {field!r}: {msg} (got {received!r})")
    return "invalid vlmprune policy: " + "; ".join(parts)
