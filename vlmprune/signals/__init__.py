"""Signals the pruners score with, gathered from q/k projections (never from attention weights)."""

from vlmprune.signals.attention import (
    attention_logits,
    attention_rows,
    cls_attention_from_qk,
    decoder_layer_qk,
    instruction_attention,
    mean_attention_received,
)

__all__ = [
    "attention_logits",
    "attention_rows",
    "cls_attention_from_qk",
    "decoder_layer_qk",
    "instruction_attention",
    "mean_attention_received",
]
