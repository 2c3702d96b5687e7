"""What the worker does when one image's scoring fails: serve it, never stop the engine.

An exception raised in vLLM's worker stops the engine core for every request. Everything a request
can get wrong is refused earlier, by the processor (a 400); what can still fail in the worker for
one image (a scorer that overflows to NaN, an out-of-memory error in its attention maps, a checkpoint
file that vanished after the processor read it) is caught here, per image. The image is then served
with the **fallback selection**: the rows the processor reserved (the count cannot change at this
point), chosen evenly spaced over the image's prunable tokens in raster order, plus every fixed row
(LLaVA-NeXT's newlines). The failure is logged at ERROR with its traceback, the image's request
trace (when one was asked for) records ``"fallback": "<error>"``, and every request served with that
image's rows gets a fallback report (:func:`vlmprune.trace.write_fallback_report`, in the engine's
trace folder) that the gateway turns into ``fallback=`` in ``X-VLMPrune-Applied``: vLLM's response
itself has no field the worker could fill. To name the request, the runner hooks
(:func:`start_encoding`, :func:`end_encoding`) give each encoded item its encoder-cache hash (the items reach
``embed_multimodal`` in the order vLLM batched them) and map failed hashes to the requests that use
them, also to later ones that read the same encoder output from vLLM's cache.

Tensor parallelism: every rank computes the same scores (:mod:`.tensor_parallel`), so a deterministic
failure (NaN) takes the fallback on every rank alike. A failure on one rank only, before one of the
scoring collectives, would leave the other ranks waiting in it: a limit stated in docs/serving.md.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from typing import Any, Callable

import torch

from vlmprune.core.select import TokenReduction

logger = logging.getLogger(__name__)

_ENCODING: deque[str] = deque()
"""Encoder-cache hashes of the items of the encoder pass under way, in vLLM's order; each item's
policy takes the next one (:func:`next_encoded`)."""
_FALLEN: OrderedDict[str, dict[str, Any]] = OrderedDict()
"""Hash -> failure of the images served with the fallback (the newest ``_FALLEN_KEPT``): a request
that reads such an output from vLLM's encoder cache is reported too."""
_FALLEN_KEPT = 1024

_FAILURES: list[dict[str, Any]] = []
"""This worker's fallbacks since start (tests and debugging read it through ``LLM.apply_model``)."""


def evenly_spaced(prunable: torch.Tensor, count: int) -> TokenReduction:
    """``count`` rows: every non-prunable one, the rest evenly spaced over the prunable ones."""
    prunable = prunable.bool()
    fixed = (~prunable).nonzero().flatten()
    candidates = prunable.nonzero().flatten()
    keep = count - fixed.numel()
    if not 0 <= keep <= candidates.numel():
        raise RuntimeError(f"vlmprune: no fallback of {count} rows for an image of {prunable.numel()} "
                           f"({fixed.numel()} fixed); the processor and the model disagree")
    chosen = candidates[evenly_spaced_choice(candidates, keep)]
    return TokenReduction(index=torch.cat([fixed, chosen]).sort().values)


def guarded(item: Any, family: str, prunable: torch.Tensor, reduce: Callable[[], TokenReduction | None]
            ) -> tuple[TokenReduction | None, str | None]:
    """``(reduce(), None)``, or ``(fallback, error)`` when ``reduce`` raises an ``Exception``.

    ``item``: the image's ``ItemPolicy`` (its reserved ``count``, policy and trace); ``prunable``:
    the image's (n,) mask of rows a pruner may drop, on the features' device.
    """
    try:
        reduction = reduce()
    except Exception as exc:  # one image's failure must not stop the engine for every request
        error = f"{type(exc).__name__}: {exc}"
        logger.exception("vlmprune: %s scoring failed for one image (%s, %s, trace %s); serving it with the "
                         "fallback selection (%d rows evenly spaced)", family,
                         getattr(item.policy, "method", None), error, item.trace, item.count)
        failure = {"family": family, "method": getattr(item.policy, "method", None), "error": error,
                   "trace": item.trace}
        _FAILURES.append(failure)
        if getattr(item, "identifier", None) is not None:
            _FALLEN[item.identifier] = failure
            while len(_FALLEN) > _FALLEN_KEPT:
                _FALLEN.popitem(last=False)
        return evenly_spaced(prunable, item.count), error
    if _FALLEN and getattr(item, "identifier", None) is not None:
        _FALLEN.pop(item.identifier, None)  # encoded again (evicted from the cache), and scored this time
    return reduction, None


def evenly_spaced_choice(rows: torch.Tensor, count: int) -> torch.Tensor:
    """An in-LLM stage's fallback: ``count`` local indices into ``rows`` (an image's visual rows),
    evenly spaced, ascending (:func:`vlmprune.reduction.stages.select_rows`'s ``choose``)."""
    n = int(rows.numel())
    return torch.linspace(0, max(n - 1, 0), count, device=rows.device).round().long() if count else rows[:0].long()


def guarded_stage(request_id: str, method: str, stage: int, scored: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
    """``scored()``, or ``fallback()`` when it raises: one in-LLM stage of one request."""
    try:
        return scored()
    except Exception as exc:  # as in guarded(): the engine keeps serving every other request
        error = f"{type(exc).__name__}: {exc}"
        logger.exception("vlmprune: in-LLM stage %d of request %s (%s) failed (%s); keeping evenly spaced rows",
                         stage, request_id, method, error)
        failure = {"request": request_id, "method": method, "stage": stage, "error": error}
        _FAILURES.append(failure)
        _report(request_id, f"stage{stage}", failure)
        return fallback()


def read_failures(_model: Any = None, clear: bool = True) -> list[dict[str, Any]]:
    """This worker's fallbacks (``LLM.apply_model(read_failures)``); ``clear`` empties the list."""
    out = list(_FAILURES)
    if clear:
        _FAILURES.clear()
    return out


# --- Reports: which request was served with a fallback -------------------------------------------


def next_encoded() -> str | None:
    """The encoder-cache hash of the next item ``embed_multimodal`` reads (None outside a runner)."""
    return _ENCODING.popleft() if _ENCODING else None


def _report(request_id: str, key: str, failure: dict[str, Any]) -> None:
    """Write ``failure`` into the request's fallback report; never raises (the request is served)."""
    from vlmprune.trace import trace_dir, write_fallback_report
    from vlmprune.vllm_plugin.tracing import _writes_traces

    folder = trace_dir()
    if folder is None or not _writes_traces():
        return
    try:
        write_fallback_report(folder, request_id, key, {k: v for k, v in failure.items() if k != "trace"})
    except OSError:
        logger.exception("vlmprune: cannot write the fallback report of request %s", request_id)


def start_encoding(hashes: list[str]) -> None:
    """Worker, as vLLM batches a step's encoder items (``_batch_mm_inputs_from_scheduler``,
    :mod:`.patches`): their encoder-cache hashes, in the order ``embed_multimodal`` reads them."""
    _ENCODING.clear()
    _ENCODING.extend(hashes)


def end_encoding(runner: Any, scheduler_output: Any) -> None:
    """Worker, after a step's encoder pass (``_execute_mm_encoder``): report the requests whose
    images fell back, those that encoded them now and new ones that read them from the encoder
    cache. Until some image has fallen back, one test per step."""
    _ENCODING.clear()
    if not _FALLEN:
        return
    new = [r.req_id for r in scheduler_output.scheduled_new_reqs]
    for req_id in dict.fromkeys([*scheduler_output.scheduled_encoder_inputs, *new]):
        state = runner.requests.get(req_id)
        for feature in getattr(state, "mm_features", None) or []:
            if feature.identifier in _FALLEN:
                _report(req_id, feature.identifier, _FALLEN[feature.identifier])
