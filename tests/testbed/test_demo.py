"""The shipped `demo` model: real weights in the repo, loadable by transformers, answering correctly."""

from __future__ import annotations

import json

import pytest
import torch

from vlmprune.testbed import scenes
from vlmprune.testbed.registry import MODELS_DIR, resolve_model

SHIPPED = (MODELS_DIR / "demo" / "config.json").is_file()
needs_shipped = pytest.mark.skipif(
    not SHIPPED,
    reason="NOT SHIPPED: vlmprune/testbed/models/demo has no weights yet (training did not reach the "
    "accuracy target; see vlmprune/testbed/models/demo/MODEL_CARD.md)",
)


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = resolve_model("demo")
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    return path, model.eval(), AutoProcessor.from_pretrained(path), info


def test_resolve_model_errors(tmp_path):
    """Junk is a ValueError naming the problem; a shipped name without weights says "not shipped"."""
    with pytest.raises(ValueError, match="neither"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(tmp_path)
    for name in ("demo", "demo-next"):
        if not (MODELS_DIR / name / "config.json").is_file():
            with pytest.raises(ValueError, match="not shipped"):
                resolve_model(name)


@needs_shipped
def test_resolve_model_shipped():
    """The shipped name resolves inside the package; its folder path resolves to itself."""
    for name in ("demo", "demo-next"):
        if (MODELS_DIR / name / "config.json").is_file():
            assert resolve_model(name) == MODELS_DIR / name
            assert resolve_model(str(MODELS_DIR / name)) == MODELS_DIR / name


@needs_shipped
def test_checkpoint_layout_and_size(demo):
    """Hub key layout (what vLLM 0.32 loads), fp32 on load, no missing/unexpected keys, <= 30 MB."""
    from safetensors import safe_open

    path, model, _, info = demo
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == torch.float32
    files = list(path.glob("*.safetensors"))
    keys = [k for f in files for k in safe_open(str(f), "pt").keys()]
    vision = [k for k in keys if "vision_tower" in k]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, total
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert json.loads((path / "training.json").read_text())["timings"]["total_s"] > 0


@needs_shipped
def test_answers_test_questions(demo):
    """Real check of the shipped weights: greedy answers to 15 test questions are mostly right."""
    _, model, processor, _ = demo
    size = model.config.vision_config.image_size
    correct = 0
    for i in range(15):
        s = scenes.sample("test", i)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
            add_generation_prompt=True, tokenize=False,
        )
        inputs = processor(text=text, images=scenes.render(s.scene, size), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += answer.strip() == s.answer
    assert correct >= 12, correct


# --- questions as people type them (the tokenizer's normalizer) -----------------------------------


def typed_variants(question: str) -> list[str]:
    """The canonical question as people type it: capitals, US spelling, punctuation attached."""
    attached = question.replace(" ?", "?").replace("colour", "color")
    return [attached[0].upper() + attached[1:], attached.upper(), "  " + question.title() + " "]


@pytest.mark.parametrize("name", ["demo", "demo-next"])
def test_shipped_tokenizer_is_the_builders(tmp_path, name):
    """tokenizer.json is exactly what `vlmprune train` builds, so a retrained model gets the normalizer."""
    from vlmprune.testbed.train import build_tokenizer

    if not (MODELS_DIR / name / "tokenizer.json").is_file():
        pytest.skip(f"NOT SHIPPED: {name}")
    build_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (MODELS_DIR / name / "tokenizer.json").read_text()


@needs_shipped
def test_canonical_prompts_tokenize_as_in_training(demo):
    """Task prompts are still one id per space-separated word (the ids the model was trained on);
    the chat-template words and <image> stay single tokens."""
    _, _, processor, _ = demo
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    for i in range(40):
        s = scenes.sample("test", i)
        ids = tok("USER: <image> " + s.question + " ASSISTANT:").input_ids
        words = ["<s>", "USER", ":", "<image>", *s.question.split(), "ASSISTANT", ":"]
        assert ids == [vocab[w] for w in words], s.question


@needs_shipped
def test_typed_questions_get_the_same_ids_and_answers(demo):
    """`What color is the circle?` and its kind give the canonical question's prompt ids (no <unk>)
    and its greedy answer through the reference backend, on a sample of every family."""
    from vlmprune.backends.hf.pipeline import ReferenceBackend, Request

    _, model, processor, _ = demo
    backend = ReferenceBackend(model, processor)
    size = model.config.vision_config.image_size
    families = set()
    for i in range(5):
        s = scenes.sample("test", i)
        image = scenes.render(s.scene, size)
        requests = [Request(q, [image]) for q in (s.question, *typed_variants(s.question))]
        ids = [backend.process([r])["input_ids"][0].tolist() for r in requests]
        assert all(x == ids[0] for x in ids) and processor.tokenizer.unk_token_id not in ids[0], s.question
        answers = [g.text.strip() for g in backend.generate(requests, max_new_tokens=3)]
        assert answers == [answers[0]] * len(requests), (s.question, answers)
        families.add(s.family)
    assert families == set(scenes.FAMILIES)


@needs_shipped
def test_scene_command_writes_the_readme_scene(tmp_path, capsys):
    """`vlmprune scene` writes the first test scene asking the README's question at demo's canvas
    and prints that question and its answer; `--index N` gives sample N; a bad index exits 2."""
    from PIL import Image

    from vlmprune.cli import main
    from vlmprune.testbed.example import EXAMPLE_QUESTION

    assert main(["scene", "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    index = int(out.split("test scene ")[1].split()[0])
    s = scenes.sample("test", index)
    assert s.question == EXAMPLE_QUESTION and f"question: {s.question}\nanswer:   {s.answer}\n" in out
    assert all(scenes.sample("test", i).question != EXAMPLE_QUESTION for i in range(index))
    assert Image.open(tmp_path / "a.png").size == (224, 224)
    assert main(["scene", "--out", str(tmp_path / "b.png"), "--index", "3"]) == 0
    assert f"question: {scenes.sample('test', 3).question}\n" in capsys.readouterr().out
    assert main(["scene", "--out", str(tmp_path / "c.png"), "--index", "-1"]) == 2
    assert "index must be >= 0" in capsys.readouterr().err
