"""Tiny, seeded, real transformers VLMs with real processors (nothing is downloaded).

Used by the tests and by the demo run of ``vlmprune serve`` while no trained model is shipped.

One builder per model family, each returning ``(model, processor)`` in eval mode, fp32:
``build_llava`` (LLaVA-1.5: CLIP ViT + Llama), ``build_llava_next`` (LLaVA-NeXT AnyRes).
All families share the word-level tokenizer and chat template built here. Models are random but
deterministic (``torch.manual_seed``), small enough that a forward pass takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
WORDS = (
    "USER ASSISTANT : , . ? ! what which where how many is are the a an of in on at to and or "
    "colour color shape box circle square triangle red green blue yellow white black left right "
    "top bottom middle one two three four five yes no there image picture describe this big small"
).split()

# One user turn: every image placeholder, then the text; LLaVA-1.5's "USER: ... ASSISTANT:" format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]
PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]


TEMPLATE_WORDS = ("USER", "ASSISTANT")
"""The chat template's role words: matched before normalization, so lower-casing keeps them intact."""
SPELLINGS = {"color": "colour"}
"""Spellings people type -> the vocabulary's word; used where the target is a word and the source is not."""


def question_normalizer(words: Sequence[str]):
    """What people type -> the vocabulary's form: NFKC, lower case, other spellings of its words.

    Runs inside the tokenizer (``tokenizer.json``), so vLLM, transformers and the gateway all see
    ``What color is the circle?`` as ``what colour is the circle ?``; the pre-tokenizer splits the
    attached punctuation. Special tokens and :data:`TEMPLATE_WORDS` are added tokens, matched before it.
    """
    from tokenizers import Regex, normalizers

    vocab = set(words)
    steps = [normalizers.NFKC(), normalizers.Lowercase()]
    for typed, word in SPELLINGS.items():
        if word in vocab and typed not in vocab:
            steps.append(normalizers.Replace(Regex(rf"\b{typed}\b"), word))
    return normalizers.Sequence(steps)


def build_tokenizer(save_dir: Path, words: Sequence[str] = WORDS):
    """Word-level fast tokenizer over ``words`` with BOS, a pad token and a single-token ``<image>``.

    Questions are normalized (:func:`question_normalizer`) and split on whitespace and at every
    punctuation mark, so case and attached punctuation do not make unknown words.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = question_normalizer(words)
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    core.add_tokens([AddedToken(w, normalized=False) for w in TEMPLATE_WORDS if w in vocab])
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def _clip_config(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=32,
    )


def _llama_config(vocab_size: int, head_dim: int | None = None):
    """``head_dim`` None: hidden/heads = 16. vLLM's CPU attention needs >= 32 (``vllm_layout`` asks 32)."""
    from transformers import LlamaConfig

    # GQA on purpose (2 kv heads for 4 query heads), as in every recent LLM.
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
        **({} if head_dim is None else {"head_dim": head_dim}),
    )


def build_llava(tmp_path: Path, seed: int = 0, head_dim: int | None = None):
    """LLaVA-1.5 in miniature: CLIP 84 px / patch 14 (6x6 = 36 visual tokens), Llama 4 layers."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tmp_path = Path(tmp_path)
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    image_size = 84
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=PIXEL_MEAN,
        image_std=PIXEL_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=_clip_config(image_size),
        text_config=_llama_config(len(tokenizer), head_dim),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor


def build_llava_next(tmp_path: Path, seed: int = 0, head_dim: int | None = None, vision_feature_layer: int = -2):
    """LLaVA-NeXT in miniature: CLIP 56 px views (4x4 tokens each), AnyRes pinpoints up to 112x112
    (2x2 crops), stock ``spatial_unpad`` packing with image_newline tokens, Llama 4 layers.

    ``vision_feature_layer=-1``: the last ViT layer is the feature layer, so vLLM loads it and the
    ViT signals of both backends come from the same layer (AIM's merge keys: exact, not the
    documented last-*loaded*-layer deviation)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tmp_path = Path(tmp_path)
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    view = 56
    pinpoints = [[view, 2 * view], [2 * view, view], [2 * view, 2 * view]]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": view},
        crop_size={"height": view, "width": view},
        image_grid_pinpoints=pinpoints,
        image_mean=PIXEL_MEAN,
        image_std=PIXEL_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=_clip_config(view),
        text_config=_llama_config(len(tokenizer), head_dim),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return model, processor


def make_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Deterministic RGB image: a grey background with a few coloured rectangles placed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    palette = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (250, 250, 250)]
    for i in range(4):
        x0 = int(torch.randint(0, max(1, width - 8), (1,), generator=gen))
        y0 = int(torch.randint(0, max(1, height - 8), (1,), generator=gen))
        w = int(torch.randint(6, max(7, width // 2), (1,), generator=gen))
        h = int(torch.randint(6, max(7, height // 2), (1,), generator=gen))
        draw.rectangle([x0, y0, min(width - 1, x0 + w), min(height - 1, y0 + h)], fill=palette[(seed + i) % len(palette)])
    return image


# --- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_WORDS = ["user", "assistant", "system"] + WORDS

# Qwen's ChatML: every image becomes <|vision_start|><|image_pad|><|vision_end|>, in content order.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Resize bounds wide enough that the test images (multiples of 28 px, 56x84 to 112x112) keep their size.
QWEN_MIN_PIXELS = 28 * 28 * 4
QWEN_MAX_PIXELS = 28 * 28 * 64
# A wider ViT init than the 0.02 default, so the random ViT's attention is far from uniform and the
# attention-based scores (and the tests comparing them) actually discriminate between tokens.
QWEN_VIT_INIT_STD = 0.3


def build_qwen_tokenizer(save_dir: Path):
    """Word-level fast tokenizer holding Qwen's ChatML and vision special tokens (no BOS, like Qwen)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>"] + QWEN_SPECIAL_TOKENS + QWEN_WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    tokenizer.save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def _qwen_text_config(tokenizer, head_dim: int | None = None) -> dict:
    # GQA (4 query / 2 kv heads), head_dim 16, M-RoPE sections (t, h, w) summing to head_dim / 2.
    # ``head_dim`` (vLLM's CPU attention needs >= 32): hidden 64 / head_dim query heads, half as many
    # kv heads (Qwen2 derives head_dim from hidden/heads in vLLM), sections scaled to head_dim / 2.
    heads = 4 if head_dim is None else 64 // head_dim
    section = [2, 3, 3] if head_dim is None else [s * head_dim // 16 for s in (2, 3, 3)]
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def _qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _qwen_save_load(tmp_path: Path, model, processor, model_cls, processor_cls):
    """Round-trip through the hub layout (what vLLM and ``from_pretrained`` read)."""
    out = tmp_path / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model_cls.from_pretrained(out).eval(), processor_cls.from_pretrained(out)


def _qwen_processor(processor_cls, tokenizer):
    """A Qwen-VL processor with the tiny models' pixel budget, patch 14 and 2x2 merging."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_qwen2_vl(tmp_path: Path, seed: int = 0, head_dim: int | None = None):
    """Qwen2-VL in miniature: ViT 2 blocks x 32 (2 heads), patch 14, 2x2 merger; Qwen2 LM 4 layers x 64.

    An 84x112 px image is 6x8 patches -> 3x4 = 12 LLM tokens; 56x84 px -> 2x3 = 6."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    tmp_path = Path(tmp_path)
    tokenizer = build_qwen_tokenizer(tmp_path / "tokenizer")
    processor = _qwen_processor(Qwen2VLProcessor, tokenizer)
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=QWEN_VIT_INIT_STD,
        ),
        text_config=_qwen_text_config(tokenizer, head_dim),
        **_qwen_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return _qwen_save_load(tmp_path, model, processor, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)


def build_qwen2_5_vl(tmp_path: Path, seed: int = 0, head_dim: int | None = None):
    """Qwen2.5-VL in miniature: ViT 3 blocks x 32 (2 heads), window attention except block 1
    (``fullatt_block_indexes=[1]``), windows of 2x2 merged tokens (56 px), so an 84x112 px image
    (3x4 merged tokens) spans 4 windows; Qwen2 LM 4 layers x 64."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    tmp_path = Path(tmp_path)
    tokenizer = build_qwen_tokenizer(tmp_path / "tokenizer")
    processor = _qwen_processor(Qwen2_5_VLProcessor, tokenizer)
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            initializer_range=QWEN_VIT_INIT_STD,
        ),
        text_config=_qwen_text_config(tokenizer, head_dim),
        **_qwen_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return _qwen_save_load(tmp_path, model, processor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
