"""The bench model: LLaVA-1.5 geometry with random weights (speed only), built once and cached."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("VLMPRUNE_BENCH_CACHE", Path.home() / ".cache" / "vlmprune" / "bench-llava"))


@dataclass(frozen=True)
class BenchModel:
    """LLaVA-1.5 geometry (CLIP 336 px / patch 14 = 576 visual tokens, feature layer -2) at CPU size.

    The LLM is large enough that its prefill dominates (as in LLaVA-1.5-7B, where the 7B LLM costs
    ~25x the CLIP tower); the tower is narrow so that it stays a small, un-prunable share.
    """

    name: str
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_intermediate: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_intermediate: int
    image_size: int = 336
    patch_size: int = 14

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


FULL_MODEL = BenchModel(
    "llava336-l12-h1024", vit_hidden=256, vit_layers=6, vit_heads=4, vit_intermediate=1024,
    lm_hidden=1024, lm_layers=12, lm_heads=16, lm_kv_heads=8, lm_intermediate=2816,
)
QUICK_MODEL = BenchModel(
    "llava336-l2-h256", vit_hidden=64, vit_layers=2, vit_heads=2, vit_intermediate=128,
    lm_hidden=256, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=512,
)


def build_bench_model(spec: BenchModel, cache: Path = CACHE, seed: int = 0) -> Path:
    """Build ``spec`` with random weights and save it in vLLM's layout; cached by name."""
    out = cache / spec.name
    marker = out / "bench_model.json"
    if marker.exists() and json.loads(marker.read_text()) == dataclasses.asdict(spec):
        _ensure_explain_cnn(out, seed)
        return out
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vlmprune.testbed.tiny import CHAT_TEMPLATE, IMAGE_TOKEN, PIXEL_MEAN, PIXEL_STD, build_tokenizer
    from vlmprune.testbed.vllm_layout import save_for_vllm

    tokenizer = build_tokenizer(out / "build" / "tokenizer")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=PIXEL_MEAN,
        image_std=PIXEL_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.vit_hidden,
        intermediate_size=spec.vit_intermediate, num_hidden_layers=spec.vit_layers,
        num_attention_heads=spec.vit_heads, projection_dim=spec.vit_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.lm_hidden, intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers, num_attention_heads=spec.lm_heads, num_key_value_heads=spec.lm_kv_heads,
        head_dim=spec.lm_hidden // spec.lm_heads, max_position_embeddings=2048, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    save_for_vllm(model, processor, out)
    _ensure_explain_cnn(out, seed)
    marker.write_text(json.dumps(dataclasses.asdict(spec)))
    return out


EXPLAIN_CNN = "vlmprune_explain_cnn.pt"
"""Where the plugin looks for the explain method's CNN beside a served model (``vllm_plugin/probe.py``)."""


def _ensure_explain_cnn(model_dir: Path, seed: int) -> None:
    """A randomly initialised relevance CNN of the default size (its cost, not its quality, is measured)."""
    path = model_dir / EXPLAIN_CNN
    if path.exists():
        return
    import torch

    from vlmprune.core.explain import RelevanceCNN

    torch.manual_seed(seed)
    RelevanceCNN().eval().save(path)
