"""Training plumbing (vlmprune/testbed/train.py, vit.py): inputs match the stock processor, the loss
sits on answer tokens only, and a micro run trains, resumes and saves a loadable hub-layout model."""

from __future__ import annotations

import dataclasses
import json

import torch

from vlmprune.testbed import scenes
from vlmprune.testbed import grounding as G
from vlmprune.testbed import lm_stage as LM
from vlmprune.testbed import run_folder as RF
from vlmprune.testbed import train as T
from vlmprune.testbed.vit import VitConfig, image_processor, pixels


def test_pixels_equal_clip_preprocessing():
    """The fast pixel path used in training equals CLIPImageProcessor on the same image."""
    cfg = VitConfig()
    images = [scenes.render(scenes.make_scene(s), cfg.image_size) for s in (1, 2)]
    ref = image_processor(cfg)(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels(images, cfg), ref, atol=1e-5)


def test_prompt_and_labels_match_processor(tmp_path):
    """prompt_text is what the chat template renders; labels cover exactly answer + eos; the
    spliced sequence has the processor's length."""
    processor = T.build_processor(tmp_path, VitConfig())
    tok = processor.tokenizer
    s = scenes.sample("test", 3)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert text == LM.prompt_text(s.question)
    full = processor(text=text, images=scenes.render(s.scene), return_tensors="pt")["input_ids"][0]
    assert tok.unk_token_id not in full.tolist()
    ids, labels, pos = LM.QuestionBatcher(tok).batch([(s.question, s.answer)])
    # One placeholder here, 256 after the processor's expansion; answer + eos appended.
    assert ids.shape[1] - 1 + 256 == full.shape[0] + 2
    targets = labels[labels != -100].tolist()
    assert targets == [tok.convert_tokens_to_ids(s.answer), tok.eos_token_id]
    assert ids[0, pos] == tok.convert_tokens_to_ids(T.IMAGE_TOKEN)


def test_micro_training_run_resumes_and_loads(tmp_path):
    """A micro recipe trains end to end, resumes from its checkpoint, and the saved model loads in
    transformers with every key (vision tower in the hub layout)."""
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    cfg = T.DemoConfig(vit_steps=1, vit_batch=2, cache_scenes=4, steps=2, batch=2, val_samples=2)
    out = tmp_path / "model"
    T.train_demo(out, cfg, threads=1, progress=False, log=lambda m: None)
    first = json.loads((out / "training.json").read_text())["history"]
    assert [h["step"] for h in first] == [2]
    logs = []
    T.train_demo(out, dataclasses.replace(cfg, steps=3), threads=1, progress=False, log=logs.append)
    assert any("resumed at step 2" in m for m in logs) and any("loaded finished pretraining" in m for m in logs)
    assert [h["step"] for h in json.loads((out / "training.json").read_text())["history"]] == [2, 3]
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    keys = list(safe_open(str(out / "model.safetensors"), "pt").keys())
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if "vision_tower" in k)


def test_multi_turn_labels(tmp_path):
    """Training conversations: every answer and its eos are labelled at the position before them,
    nothing else is; the first turn is exactly the single-question prompt."""
    tok = T.build_processor(tmp_path, VitConfig()).tokenizer
    batcher = LM.QuestionBatcher(tok)
    turns = [("is there a red circle ?", "yes"), ("what digit is in the red box ?", "7")]
    ids, labels, _ = batcher.conversations([turns, turns[:1]])
    names = tok.convert_ids_to_tokens(ids[0].tolist())
    labelled = {names[j]: tok.convert_ids_to_tokens(int(labels[0, j])) for j in (labels[0] != -100).nonzero().squeeze(1).tolist()}
    assert (labels[0] != -100).sum() == 4 and (labels[1] != -100).sum() == 2
    assert [tok.convert_ids_to_tokens(int(x)) for x in labels[0][labels[0] != -100]] == ["yes", "</s>", "7", "</s>"]
    assert set(labelled) == {":", "yes", "7"}
    single, _, _ = batcher.batch(turns[:1])
    assert ids[1, : single.shape[1]].tolist() == single[0].tolist()


def test_grounding_targets_and_token_dropout(tmp_path):
    """The two supervised hops point at the right keys (naming words, then the named object's
    patches), and a micro run with token dropout on every batch trains (shorter visual blocks)."""
    from vlmprune.testbed import scenes

    processor = T.build_processor(tmp_path / "w", T.DemoConfig().vit)
    tok = processor.tokenizer
    batcher = LM.QuestionBatcher(tok)
    scene = scenes.make_scene(11)
    a, b = scene.shapes[0], scene.shapes[1]
    question = f"is the {a.colour} {a.kind} left or right of the {b.colour} {b.kind} ?"
    ids, labels, pos = batcher.conversations([[(question, "left")]])
    n_vis = 256
    rows = G.answer_rows(labels, pos, n_vis)
    length = ids.shape[1] - 1 + n_vis
    naming = {tok.convert_tokens_to_ids(w) for w in (*scenes.COLOURS, *scenes.SHAPES, "box")}
    words = G.naming_word_keys(ids[0].tolist(), rows[0], ["position"], naming, pos, n_vis, length, 2)[0]
    tokens = tok.convert_ids_to_tokens(ids[0].tolist())
    to_text = [j - n_vis + 1 if j > pos else j for j in range(length)]
    assert [tokens[to_text[j]] for j in words[0].nonzero()[0]] == [a.colour, a.kind]
    assert [tokens[to_text[j]] for j in words[1].nonzero()[0]] == [b.colour, b.kind]
    owner = scenes.patch_owner(scene, 224, 14)
    patches = G.head_targets(scene, owner, "position", [a, b], 2)
    assert (patches[0] == (owner == scene.items.index(a) + 1)).all() and patches[0].any()
    keys = G.visual_keys(patches, pos, length)
    assert keys[1][pos : pos + n_vis].tolist() == patches[1].tolist() and not keys[1][:pos].any()

    cfg = T.DemoConfig(vit_steps=1, vit_batch=2, cache_scenes=4, steps=2, batch=2, val_samples=2, token_dropout=1.0)
    T.train_demo(tmp_path / "model", cfg, threads=1, progress=False, log=lambda m: None)
    history = json.loads((tmp_path / "model" / "training.json").read_text())["history"]
    assert history[-1]["step"] == 2 and history[-1]["grounding_loss"] > 0


def test_resumable_cache_resumes_after_the_saved_part(tmp_path):
    """An interrupted cache resumes after its saved batches, encodes only the rest, and cleans up."""
    calls = []

    def encode(batches):
        for batch in batches:
            calls.append(tuple(batch))
            yield torch.tensor(batch, dtype=torch.float16)[:, None]

    torch.save([torch.tensor([0.0, 1.0], dtype=torch.float16)[:, None]], tmp_path / "f.part.pt")
    out = RF.resumable_cache(tmp_path / "f.pt", list(range(5)), 2, encode, log=lambda _m: None, progress=False)
    assert out.flatten().tolist() == [0, 1, 2, 3, 4] and calls == [(2, 3), (4,)]
    assert (tmp_path / "f.pt").is_file() and not (tmp_path / "f.part.pt").exists()
    assert RF.resumable_cache(tmp_path / "f.pt", list(range(5)), 2, encode, progress=False).shape == (5, 1)
    assert len(calls) == 2  # complete: loaded, nothing encoded again
