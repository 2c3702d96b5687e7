"""Save a transformers VLM in the layout vLLM 0.32 loads (hub key names, config, processor, tokenizer).

transformers 5.x ``save_pretrained`` writes a LLaVA-family CLIP tower as ``vision_tower.embeddings...``;
the real hub checkpoints (and vLLM's ``CLIPVisionModel`` loader) use ``vision_tower.vision_model.*``.
Everything else transformers already writes in the hub layout (``language_model.model.*``,
``multi_modal_projector.*``, ``image_newline``; Qwen's keys are mapped by vLLM itself), so only
the vision-tower keys are renamed. The processor (image processor + tokenizer + chat template) is
saved beside the weights, and the chat template is also put on the tokenizer, so both
``LLM.generate`` and ``LLM.chat`` work offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

_CLIP_PREFIXES = ("vision_tower.", "model.vision_tower.")
VLLM_CPU_HEAD_DIM = 32
"""Decoder head size of the test models built for vLLM: its CPU attention supports 32, 64, 80, ...
(``CPUAttentionBackend.get_supported_head_sizes``), not the tiny models' default 16."""
_HUB_CLIP = "vision_tower.vision_model."


def hub_key(key: str) -> str:
    """The hub-layout name of a saved key (identity for keys already in that layout)."""
    for prefix in _CLIP_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest.startswith("vision_model."):
                return "vision_tower." + rest
            return _HUB_CLIP + rest
    return key


def save_for_vllm(model: Any, processor: Any, out_dir: str | Path) -> Path:
    """Write ``model`` (safetensors, hub key layout, shards kept), its config and ``processor`` to ``out_dir``."""
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        model.save_pretrained(tmp)
        shards = sorted(Path(tmp).glob("*.safetensors"))
        if not shards:
            raise ValueError("save_pretrained wrote no safetensors file")
        n_keys = 0
        for shard in shards:
            tensors = load_file(shard)
            renamed = {hub_key(k): v.contiguous() for k, v in tensors.items()}
            if len(renamed) != len(tensors):
                raise ValueError(f"renaming {shard.name} to the hub layout made two keys collide")
            save_file(renamed, out / shard.name, metadata={"format": "pt"})
            n_keys += len(renamed)
        index = Path(tmp) / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"] = {hub_key(k): v for k, v in data["weight_map"].items()}
            (out / index.name).write_text(json.dumps(data, indent=2))
        for name in ("config.json", "generation_config.json"):
            if (Path(tmp) / name).exists():
                (out / name).write_text((Path(tmp) / name).read_text())
    tokenizer = getattr(processor, "tokenizer", None)
    template = getattr(processor, "chat_template", None)
    if tokenizer is not None and template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    processor.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    # Record what this directory is, for whoever finds it later.
    (out / "vlmprune_layout.json").write_text(json.dumps({"layout": "vllm-hub", "keys": n_keys}))
    return out


def build_for_vllm(family: str, out_dir: str | Path, seed: int = 0, **options: Any) -> tuple[Path, Any, Any]:
    """Build a tiny model of ``family`` (:mod:`vlmprune.testbed.tiny`) and save it for vLLM
    (``options``: the builder's own keyword arguments).

    Returns ``(directory, model, processor)``; the in-memory model is the transformers reference of
    exactly the saved weights. Builders that take ``head_dim`` get :data:`VLLM_CPU_HEAD_DIM`.
    """
    from vlmprune.testbed import tiny

    builders = {
        "llava": tiny.build_llava,
        "llava_next": tiny.build_llava_next,
        "qwen2_vl": tiny.build_qwen2_vl,
        "qwen2_5_vl": tiny.build_qwen2_5_vl,
    }
    if family not in builders:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(builders)}")
    import inspect

    out = Path(out_dir)
    build = builders[family]
    extra = {"head_dim": VLLM_CPU_HEAD_DIM} if "head_dim" in inspect.signature(build).parameters else {}
    model, processor = build(out / "build", seed=seed, **extra, **options)
    return save_for_vllm(model, processor, out / "model"), model, processor
