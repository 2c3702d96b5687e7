"""Worker side of kept-token traces (:mod:`vlmprune.trace`): one record per traced image.

Called by the models right after an image's rows are chosen (and checked against the processor's
count), with the reduction's ``index``: the record is the serving path's own selection. Untraced
items cost one attribute test.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from vlmprune.trace import trace_dir, write_trace

logger = logging.getLogger(__name__)


def _ints(value: torch.Tensor | None) -> list | None:
    return None if value is None else value.detach().cpu().tolist()


def _writes_traces() -> bool:
    """Only the first tensor-parallel rank writes: every rank keeps the same rows
    (:mod:`.tensor_parallel`), and two ranks must not write one file."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, RuntimeError):  # no parallel state (a single-process use)
        return True


def record_kept(item: Any, family: str, index: torch.Tensor, n_tokens: int, image: Any = None,
                grid: tuple[int, int] | None = None, fallback: str | None = None) -> None:
    """Write the trace record of one image if ``item`` (an ``ItemPolicy``) asked for it.

    ``index`` (k,): image-local indices of the rows the model returned (fixed tokens included);
    ``image``: the ``ImageTokens`` the reduction saw (its prunable mask and geometry), None on the
    stock path (every token kept, ``grid`` the token grid when the family has a single one);
    ``fallback``: the scoring error when the rows are :mod:`.fallback`'s selection.
    Never raises: a trace that cannot be written is logged, the request is still served.
    """
    if item is None or item.trace is None or not _writes_traces():
        return
    folder = trace_dir()
    if folder is None:
        return
    trace_id, position = item.trace
    prunable = None if image is None else image.prunable.bool().cpu()
    kept = index.detach().cpu().long()
    if prunable is not None:
        kept = kept[prunable[kept]]
    record = {
        "method": None if item.policy is None else item.policy.method,
        "ratio": 0.0 if item.policy is None else float(item.policy.ratio),
        "family": family,
        "n_tokens": int(n_tokens),
        "prunable": None if prunable is None or bool(prunable.all()) else _ints(prunable.nonzero().flatten()),
        "kept": sorted(kept.tolist()),
        "grid": list(image.grid) if image is not None else (list(grid) if grid is not None else None),
        "view": _ints(getattr(image, "view", None)),
        "coords": _ints(getattr(image, "coords", None)),
        "view_shape": None if getattr(image, "view_shape", None) is None else [list(v) for v in image.view_shape],
    }
    if fallback is not None:
        record["fallback"] = fallback
    try:
        write_trace(folder, trace_id, position, record)
    except OSError as exc:
        logger.warning("vlmprune: cannot write trace %s.%s to %s: %s", trace_id, position, folder, exc)


def record_stages(trace: tuple[str, int], stages: list[tuple[int, list[int]]]) -> None:
    """Add an in-LLM request's stages to an image's record (written at the LLM input by
    :func:`record_kept` in the same engine step, before the LLM forward).

    ``stages``: per stage, (after_layer, positions kept among the image's prunable LLM-input rows,
    ascending); those rows are the record's ``kept`` tokens in order. The record then holds
    ``input_kept`` (the LLM input's tokens), ``stages`` (``{"after_layer", "kept"}`` in tokens) and
    ``kept`` = the last stage's tokens, which the deepest layers see. Never raises."""
    folder = trace_dir()
    if folder is None or not _writes_traces():
        return
    trace_id, position = trace
    try:
        record = json.loads((folder / f"{trace_id}.{position}.json").read_text())
        tokens = record["kept"]
        if any(p >= len(tokens) for _, kept in stages for p in kept):
            raise ValueError(f"a stage keeps a row beyond the image's {len(tokens)} LLM-input tokens")
        record["input_kept"] = tokens
        record["stages"] = [{"after_layer": int(layer), "kept": [tokens[p] for p in kept]} for layer, kept in stages]
        if stages:
            record["kept"] = record["stages"][-1]["kept"]
        record.pop("image", None)
        write_trace(folder, trace_id, position, record)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("vlmprune: cannot add the in-LLM stages to trace %s.%s in %s: %s", trace_id, position, folder, exc)
