"""[CLS]-based signals of a CLIP-style ViT, captured with forward hooks during the stock forward.

The vision tower runs once, with whatever attention kernel it was loaded with; hooks on the
``q_proj`` / ``k_proj`` linears of the one or two layers the signals need record their outputs,
and the [CLS] row is recomputed from them (:func:`vlmprune.signals.cls_attention_from_qk`), so the
model is never switched to eager attention and no attention matrix is materialised.

Shapes: ``B`` ViT passes (images, or AnyRes views), ``T`` tokens per pass ([CLS] first), ``P = T-1``
patches, ``H`` heads, ``C`` the projection width (H * head_dim).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vlmprune.reduction.image_tokens import CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC
from vlmprune.signals.attention import cls_attention_from_qk

CLS_SIGNALS = frozenset({CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC})


def vit_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP-style tower (``CLIPVisionModel`` or a bare ``CLIPVisionTransformer``)."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    encoder = getattr(inner, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"cannot find the encoder layers of vision tower {type(vision_tower).__name__}")
    return layers


def feature_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """Index of the ViT layer whose *output* is ``hidden_states[vision_feature_layer]``.

    ``hidden_states`` has ``num_layers + 1`` entries (entry 0 = embeddings), so -2 -> layer
    ``num_layers - 2``, the penultimate layer (FasterVLM's ``attentions[-2]``). A list of feature
    layers (concatenated features) uses the deepest one.
    """
    if isinstance(vision_feature_layer, (list, tuple)):
        if not vision_feature_layer:
            raise ValueError("vision_feature_layer must not be an empty list")
        return max(feature_layer_index(v, num_layers) for v in vision_feature_layer)
    hs = vision_feature_layer + num_layers + 1 if vision_feature_layer < 0 else vision_feature_layer
    if not 1 <= hs <= num_layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} does not select the output of a ViT layer "
            f"(the tower has {num_layers} layers)"
        )
    return hs - 1


@contextmanager
def capture_qk(layers: nn.ModuleList, wanted: dict[int, set[str]]) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Record the outputs of ``layers[i].self_attn.{q,k}_proj`` for each ``i -> {"q", "k"}`` wanted.

    Yields a dict filled during the forward: ``(i, "q") -> (B, T, C)``. Hooks only read; they are
    removed on exit even if the forward raises.
    """
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def make_hook(key: tuple[int, str]):
        def hook(_module: nn.Module, _args, output: torch.Tensor) -> None:
            captured[key] = output.detach()

        return hook

    try:
        for index, which in wanted.items():
            for name in sorted(which):
                proj = getattr(layers[index].self_attn, f"{name}_proj")
                handles.append(proj.register_forward_hook(make_hook((index, name))))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def wanted_projections(needs: frozenset[str], feature_layer: int, last_layer: int) -> dict[int, set[str]]:
    """Which q/k outputs the requested signals read: CLS_ATTENTION the feature layer's q and k,
    CLS_LOGITS the last layer's q and k, MERGE_METRIC the last layer's k."""
    wanted: dict[int, set[str]] = {}
    if CLS_ATTENTION in needs:
        wanted.setdefault(feature_layer, set()).update({"q", "k"})
    if CLS_LOGITS in needs:
        wanted.setdefault(last_layer, set()).update({"q", "k"})
    if MERGE_METRIC in needs:
        wanted.setdefault(last_layer, set()).add("k")
    return wanted


def patch_signals(
    captured: dict[tuple[int, str], torch.Tensor],
    needs: frozenset[str],
    feature_layer: int,
    last_layer: int,
    num_heads: int,
) -> dict[str, torch.Tensor]:
    """Per-patch signals of every ViT pass from the captured projections.

    CLS_ATTENTION / CLS_LOGITS -> (B, P) fp32; MERGE_METRIC -> (B, P, C) fp32 (keys, heads
    concatenated, [CLS] dropped).
    """
    out: dict[str, torch.Tensor] = {}
    if CLS_ATTENTION in needs:
        q, k = captured[(feature_layer, "q")], captured[(feature_layer, "k")]
        out[CLS_ATTENTION] = cls_attention_from_qk(q, k, num_heads)  # (B, P)
    if CLS_LOGITS in needs:
        q, k = captured[(last_layer, "q")], captured[(last_layer, "k")]
        out[CLS_LOGITS] = cls_attention_from_qk(q, k, num_heads, logits=True)  # (B, P)
    if MERGE_METRIC in needs:
        out[MERGE_METRIC] = captured[(last_layer, "k")][:, 1:].float()  # (B, P, C)
    return out


@contextmanager
def cls_signal_capture(vision_tower: nn.Module, vision_feature_layer, needs: frozenset[str]):
    """Hooks for the [CLS] signals in ``needs`` around one run of ``vision_tower``.

    Yields a callable returning :func:`patch_signals` once the forward has run (an empty dict when
    no [CLS] signal is needed: then no hook is installed at all).
    """
    needs = frozenset(needs) & CLS_SIGNALS
    layers = vit_layers(vision_tower)
    num_layers = len(layers)
    feature_layer = feature_layer_index(vision_feature_layer, num_layers)
    last_layer = num_layers - 1
    num_heads = layers[0].self_attn.num_heads
    with capture_qk(layers, wanted_projections(needs, feature_layer, last_layer)) as captured:
        yield lambda: patch_signals(captured, needs, feature_layer, last_layer, num_heads)
