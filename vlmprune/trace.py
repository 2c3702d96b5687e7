"""Kept-token traces: which visual tokens the vLLM plugin kept for one request, read back later.

Why a trace and not a recomputation: the playground (``server.playground``) must show the tokens
the *serving path* used, not what another backend would pick for the same image. Those indices
exist only inside the engine's worker process, in ``embed_multimodal``; vLLM's OpenAI responses have
no field for them. So a request may carry a trace id in its policy mapping
(``mm_processor_kwargs={"vlmprune": {..., "trace": "<id>"}}``; the gateway fills it from the
``X-VLMPrune-Trace`` header) and the worker writes one small JSON file per image into the folder
named by ``VLMPRUNE_TRACE_DIR``, which the gateway (same host, or a shared volume) reads.

Two properties make this exact rather than approximate:

- the trace id is part of ``mm_processor_kwargs``, hence of vLLM's multimodal hash: a traced
  request never hits the processor or encoder cache of another request, so ``embed_multimodal``
  runs for it and the file records this request's own selection;
- the record is written from the reduction the model applied (the rows it returned), after the
  count check against the processor's placeholders.

Off unless asked: without ``VLMPRUNE_TRACE_DIR`` the engine's processor rejects a trace id (a
clear 400), and without a trace id nothing is written. Files are removed when the gateway reads
them (:func:`pop_trace`).

File ``<dir>/<id>.<image>.json``::

    {"image": 0, "method": "fastervlm", "ratio": 0.9, "family": "llava", "n_tokens": 256,
     "prunable": null | [indices], "kept": [ascending prunable indices kept],
     "grid": [rows, cols] | null, "view": null | [per token], "coords": null | [[r, c], ...],
     "view_shape": null | [[r, c], [r, c]]}

In-LLM requests (the in-LLM route: transprune, aim, fastv, explain) add ``"input_kept"`` (the tokens
entering the LLM) and ``"stages": [{"after_layer": k, "kept": [...]}, ...]``; their ``kept`` is the
last stage's (:func:`vlmprune.vllm_plugin.tracing.record_stages`).

``kept`` are image-local token indices (the order of the model's rows before reduction; for
LLaVA-1.5 and Qwen the raster index of the patch, for LLaVA-NeXT the packed thumbnail + crops
order); merged tokens (``aim``, ``pool``) are listed at the token they stand in for.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

TRACE_KEY = "trace"
"""Optional entry of the policy mapping: the trace id (not a policy option)."""
TRACE_DIR_ENV = "VLMPRUNE_TRACE_DIR"
"""Folder the engine writes traces to; unset = tracing refused."""
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def check_trace_id(value: Any, where: str = f"field {TRACE_KEY!r}") -> str:
    """The id itself, or ValueError naming ``where``: 8-64 characters of ``[A-Za-z0-9_-]`` (a file
    name on every platform, never a path)."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{where}: a trace id is 8-64 characters of A-Z, a-z, 0-9, '_' or '-', got {value!r}")
    return value


def trace_dir() -> Path | None:
    """The engine's trace folder (``VLMPRUNE_TRACE_DIR``), None when tracing is off."""
    value = os.environ.get(TRACE_DIR_ENV)
    return Path(value) if value else None


def _write_json(target: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` atomically (a reader never sees half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".trace-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, target)
    return target


def write_trace(folder: Path, trace_id: str, image: int, record: dict[str, Any]) -> Path:
    """Write one image's record."""
    return _write_json(folder / f"{check_trace_id(trace_id)}.{int(image)}.json", {"image": int(image), **record})


FALLBACK_PREFIX = "fallback-"
"""Fallback reports: ``<dir>/fallback-<engine request id>.json``, written by the worker for every
request served with :mod:`vlmprune.vllm_plugin.fallback`'s selection (traced or not), read and
removed by the gateway, which adds ``fallback=`` to ``X-VLMPrune-Applied``."""


def write_fallback_report(folder: Path, request_id: str, key: str, failure: dict[str, Any]) -> Path:
    """Add one failure (``key``: the image's encoder-cache hash or ``stage<k>``) to the request's
    report; idempotent per key. ``request_id``: the engine's id, which starts with the id the client
    sent as ``X-Request-Id`` (vLLM: ``chatcmpl-<X-Request-Id>-<8 random characters>``)."""
    target = folder / f"{FALLBACK_PREFIX}{request_id.replace('/', '_')}.json"
    record = json.loads(target.read_text()) if target.is_file() else {"request": request_id, "failures": {}}
    record["failures"][key] = failure
    return _write_json(target, record)


def pop_fallback_reports(folder: Path, request_prefix: str) -> list[dict[str, Any]]:
    """The failures reported for the request whose engine id starts with ``request_prefix``
    (``chatcmpl-<X-Request-Id>``), removing the report; [] when it was served without a fallback."""
    out = []
    for path in folder.glob(f"{FALLBACK_PREFIX}{glob_escape(request_prefix)}*.json"):
        try:
            out.extend(json.loads(path.read_text())["failures"].values())
        except (OSError, ValueError, KeyError):
            continue
        path.unlink(missing_ok=True)
    return out


def pop_trace(folder: Path, trace_id: str, n_images: int) -> list[dict[str, Any]] | None:
    """The records of images ``0..n_images-1`` of a trace, removing the files; None while any is
    missing (the engine has not written it yet, or never will)."""
    paths = [folder / f"{check_trace_id(trace_id)}.{i}.json" for i in range(n_images)]
    if not all(p.is_file() for p in paths):
        return None
    records = [json.loads(p.read_text()) for p in paths]
    for p in paths:
        p.unlink(missing_ok=True)
    return records
