"""The plugin's per-image tensor fields: what the processor attaches to each image and the worker pops.

Every field is ``MultiModalFieldConfig.batched("image")`` (one row per image, kept on the CPU); the
policy travels as its :func:`vlmprune.wire.policy_bytes`, read back once per process with
:func:`vlmprune.wire.policy_from_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig

from vlmprune.policy import PolicyT
from vlmprune.vllm_plugin.fallback import next_encoded
from vlmprune.wire import RequestPolicy, policy_bytes, policy_from_bytes

FIELD_POLICY = "vlmprune_policy"
"""(num_images, L) uint8: the validated policy as UTF-8 JSON (``model_dump``); L = 0 = no policy."""
FIELD_COUNT = "vlmprune_count"
"""(num_images,) int64: tokens the processor reserved for the image (kept prunable + fixed)."""
FIELD_INSTRUCTION = "vlmprune_instruction_ids"
"""(num_images, T) int64: the instruction's token ids (no special tokens); T = 0 = none given."""
FIELD_TRACE = "vlmprune_trace"
"""(num_images, L) uint8: ``<trace id>.<image index>`` as ASCII, L = 0 = not traced
(:mod:`vlmprune.trace`)."""
FIELD_ENCODED = "vlmprune_encoded"
"""(num_images,) int64: tokens the vision encoder produces for the image before any pruning (its
stock placeholder count): the work the scheduler charges to its encoder budget (:mod:`.encoder_budget`)."""
FIELDS = (FIELD_POLICY, FIELD_COUNT, FIELD_INSTRUCTION, FIELD_TRACE, FIELD_ENCODED)


def _ascii_rows(values: list[bytes]) -> torch.Tensor:
    """(n, L) uint8 of equal-length byte strings (L = 0 when they are empty)."""
    width = max((len(v) for v in values), default=0)
    rows = [torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else torch.zeros(0, dtype=torch.uint8) for v in values]
    return torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.uint8)


def encode_fields(request: RequestPolicy, counts: list[int], instruction: list[int],
                  encoded: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Per-image tensor fields for one processed request: every image gets the same policy.
    ``encoded``: each image's unpruned token count (default: ``counts``)."""
    n = len(counts)
    # Trace rows ``<id>.<j>`` are padded to one width with leading zeros in j (a batched field).
    digits = len(str(max(n - 1, 0)))
    traces = [f"{request.trace}.{j:0{digits}d}".encode() if request.trace else b"" for j in range(n)]
    payload = policy_bytes(request.policy)
    policy_row = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    ids = torch.tensor(instruction, dtype=torch.int64)  # (T,)
    return {
        FIELD_POLICY: policy_row[None].expand(n, -1).clone(),  # (n, L)
        FIELD_COUNT: torch.tensor(counts, dtype=torch.int64),  # (n,)
        FIELD_INSTRUCTION: ids[None].expand(n, -1).clone(),  # (n, T)
        FIELD_TRACE: _ascii_rows(traces),  # (n, L)
        FIELD_ENCODED: torch.tensor(counts if encoded is None else encoded, dtype=torch.int64),  # (n,)
    }


def fields_config() -> dict[str, MultiModalFieldConfig]:
    """``MultiModalFieldConfig`` of the plugin's fields: one row per image, kept on the CPU."""
    return {name: MultiModalFieldConfig.batched("image", keep_on_cpu=True) for name in FIELDS}


_ENCODER_CALLS: list[int] = []
"""Images per ``embed_multimodal`` call in this worker (diagnostics: :func:`encoder_calls`)."""


def encoder_calls(_model: Any = None, clear: bool = True) -> list[int]:
    """Images per vision-encoder call since the last read (``LLM.apply_model(encoder_calls)``)."""
    out = list(_ENCODER_CALLS)
    if clear:
        _ENCODER_CALLS.clear()
    return out


def encoded_counts(out_mm_kwargs: Any, modality: str = "image") -> list[int]:
    """The unpruned token count the processor attached to each item (items without fields skipped)."""
    items = out_mm_kwargs.get(modality, []) if hasattr(out_mm_kwargs, "get") else []
    return [int(item[FIELD_ENCODED].data) for item in items if item is not None and FIELD_ENCODED in item]


def item_count(out_mm_kwargs: Any, item_idx: int, modality: str = "image") -> int | None:
    """The count the processor attached to item ``item_idx`` (None when the item has no fields)."""
    items = out_mm_kwargs.get(modality, []) if hasattr(out_mm_kwargs, "get") else []
    if item_idx >= len(items) or items[item_idx] is None or FIELD_COUNT not in items[item_idx]:
        return None
    return int(items[item_idx][FIELD_COUNT].data)


@dataclass(frozen=True)
class ItemPolicy:
    """What the model needs to reduce one image: the policy, the reserved count, the instruction."""

    policy: PolicyT | None
    count: int
    instruction_ids: torch.Tensor
    """(T,) int64, empty when no instruction was given."""
    trace: tuple[str, int] | None = None
    """(trace id, image index in its request) when the request asked for a trace."""
    identifier: str | None = None
    """vLLM's encoder-cache hash of the image (None outside a runner): names the requests its
    fallback is reported to (:mod:`.fallback`)."""

    @property
    def active(self) -> bool:
        return self.policy is not None and self.policy.ratio > 0.0


def field_bytes(row: torch.Tensor) -> bytes:
    """The bytes of one image's uint8 field row (the policy's or the trace's)."""
    return bytes(row.to(torch.uint8).cpu().numpy().tobytes())


def _trace_of(row: torch.Tensor) -> tuple[str, int] | None:
    text = field_bytes(row).decode("ascii")
    if not text:
        return None
    trace_id, _, image = text.rpartition(".")
    return trace_id, int(image)


def _rows(value: Any) -> list[torch.Tensor]:
    """A batched field as one tensor per image (vLLM stacks equal shapes, else passes a list)."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return [torch.as_tensor(v) for v in value]


def pop_item_policies(kwargs: dict[str, Any]) -> list[ItemPolicy] | None:
    """Remove the plugin's fields from ``embed_multimodal``'s kwargs; one entry per image, in order.

    None when the batch carries no plugin fields (e.g. ``image_embeds`` inputs): the stock path.
    """
    present = [kwargs.get(name) is not None for name in FIELDS]
    values = [kwargs.pop(name, None) for name in FIELDS]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"incomplete vlmprune fields in the model inputs: {dict(zip(FIELDS, present))}")
    policies, counts, instructions, traces, _encoded = (_rows(v) for v in values)  # _encoded: the scheduler's
    if not len(policies) == len(counts) == len(instructions) == len(traces):
        raise ValueError("vlmprune fields disagree in the number of images")
    out = []
    for p, c, ids, t in zip(policies, counts, instructions, traces):
        out.append(ItemPolicy(policy=policy_from_bytes(field_bytes(p)), count=int(c), instruction_ids=ids.to(torch.int64).reshape(-1),
                              trace=_trace_of(t), identifier=next_encoded()))
    _ENCODER_CALLS.append(len(out))
    return out
