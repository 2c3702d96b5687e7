"""LLaVA-1.5 / LLaVA-NeXT adapters: stock layout, [CLS] signals, AnyRes geometry."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmprune.testbed.tiny import make_image
from vlmprune.reduction.image_tokens import CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC
from vlmprune.backends.hf.llava import LlavaAdapter
from vlmprune.backends.hf.llava_next import LlavaNextAdapter
from vlmprune.backends.hf.vision_hooks import vit_layers
from vlmprune.geometry import ModelVisionSpec

ALL_SIGNALS = frozenset({CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC})
PROMPT = "what colour is the box ?"
# Landscape (unpadding cuts rows), portrait (cuts columns), square-ish.
IMAGES = [make_image(96, 64, 0), make_image(50, 90, 1), make_image(70, 70, 2)]


def _inputs(processor, images, prompts=None):
    prompts = prompts or [PROMPT] * len(images)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for p in prompts
    ]
    return processor(text=texts, images=images, return_tensors="pt", padding=len(texts) > 1)


@pytest.fixture(params=["llava", "llava_next"])
def adapter(request):
    model, processor = request.getfixturevalue(request.param)
    cls = LlavaAdapter if request.param == "llava" else LlavaNextAdapter
    return cls(model, processor)


def _stock_llm_input(model, inputs):
    """What the stock forward feeds its language model: (inputs_embeds, position_ids)."""
    seen = {}

    def hook(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("image_index", [0, 1], ids=["landscape", "portrait"])
def test_build_sequence_is_the_stock_llm_input(adapter, image_index):
    """Embeddings equal the stock model's LLM input bitwise; positions 0..L-1; spans and instruction."""
    model = adapter.model
    inputs = _inputs(adapter.processor, [IMAGES[image_index]])
    with torch.no_grad():
        images = adapter.encode_images(inputs, frozenset())
        seq = adapter.build_sequence(inputs, 0, images)
    expected = _stock_llm_input(model, inputs)[0]
    assert torch.equal(seq.embeds, expected)
    assert torch.equal(seq.positions, torch.arange(seq.length))
    ids = inputs["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
    assert len(seq.image_spans) == 1 and torch.equal(seq.image_spans[0], image_pos)
    assert torch.equal(seq.instruction_index, torch.arange(int(image_pos[-1]) + 1, ids.numel()))
    assert adapter.images_per_row(inputs) == [1]
    assert adapter.tokens_per_image(inputs) == [images[0].n_tokens]


def test_padded_batch_rows_match_single_requests(adapter):
    """Each row of a padded two-request batch lays out like that request processed alone."""
    inputs = _inputs(adapter.processor, IMAGES[:2], [PROMPT, "where is the big red square ?"])
    with torch.no_grad():
        images = adapter.encode_images(inputs, ALL_SIGNALS)
        assert adapter.images_per_row(inputs) == [1, 1]
        for row in range(2):
            single = _inputs(adapter.processor, [IMAGES[row]], [[PROMPT, "where is the big red square ?"][row]])
            alone = adapter.encode_images(single, ALL_SIGNALS)[0]
            seq = adapter.build_sequence(inputs, row, [images[row]])
            seq_alone = adapter.build_sequence(single, 0, [alone])
            assert torch.equal(seq.input_ids, seq_alone.input_ids)
            torch.testing.assert_close(seq.embeds, seq_alone.embeds, atol=1e-6, rtol=0)
            for name in ALL_SIGNALS:
                torch.testing.assert_close(images[row].signals[name], alone.signals[name], atol=1e-6, rtol=0)


def _eager_tower(model):
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    return tower


def test_llava_cls_signals_match_eager_attention(llava):
    """CLS_ATTENTION = eager attentions[-2][:, :, 0, 1:] head mean (FasterVLM); CLS_LOGITS and
    MERGE_METRIC recomputed by hand from the last layer's input."""
    model, processor = llava
    adapter = LlavaAdapter(model, processor)
    inputs = _inputs(processor, IMAGES[:2], [PROMPT, PROMPT])
    with torch.no_grad():
        images = adapter.encode_images(inputs, ALL_SIGNALS)
        out = _eager_tower(model)(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        expected_attn = out.attentions[-2][:, :, 0, 1:].mean(dim=1)  # (B, P)
        last = vit_layers(model.model.vision_tower)[-1]
        x = last.layer_norm1(out.hidden_states[-2])  # input of the last layer
        heads = last.self_attn.num_heads
        q = last.self_attn.q_proj(x).unflatten(-1, (heads, -1))  # (B, T, H, D)
        k = last.self_attn.k_proj(x)
        kh = k.unflatten(-1, (heads, -1))
        logits = torch.einsum("bhd,bthd->bht", q[:, 0], kh) / q.shape[-1] ** 0.5
        expected_logits = logits[:, :, 1:].mean(dim=1)
    for i, im in enumerate(images):
        assert im.n_tokens == 36 and im.grid == (6, 6) and bool(im.prunable.all())
        torch.testing.assert_close(im.signals[CLS_ATTENTION], expected_attn[i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(im.signals[CLS_LOGITS], expected_logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(im.signals[MERGE_METRIC], k[i, 1:], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(images[0].signals[CLS_ATTENTION], images[1].signals[CLS_ATTENTION])


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_llava_aim_merges_clip_features_then_projects(llava, ratio):
    """AIM on LLaVA, as its official code: ToMe merges the selected CLIP layer's patch features
    (metric: the last ViT layer's keys) and the projector runs on the merged tokens. Merging the
    projected features instead (the same groups) gives other values."""
    from vlmprune.reduction.plan import plan_image
    from vlmprune.reduction.reduce import reduce_image, signals_needed
    from vlmprune.core import aim
    from vlmprune.policy import parse_policy

    model, processor = llava
    adapter = LlavaAdapter(model, processor)
    policy = parse_policy({"method": "aim", "ratio": ratio})
    layers = len(adapter.text_model.layers)
    inputs = _inputs(processor, IMAGES[:1])
    with torch.no_grad():
        (im,) = adapter.encode_images(inputs, signals_needed("aim", "llava"))
        red = reduce_image(policy, "llava", im, num_layers=layers)
        # Independently: eager tower, CLIP features of the feature layer, keys of the last layer.
        out = _eager_tower(model)(inputs["pixel_values"], output_hidden_states=True)
        clip = out.hidden_states[model.config.vision_feature_layer][0, 1:]  # (P, C)
        last = vit_layers(model.model.vision_tower)[-1]
        keys = last.self_attn.k_proj(last.layer_norm1(out.hidden_states[-2]))[0, 1:]  # (P, C)
        keep = plan_image(policy, "llava", im.view_sizes, layers, route="reference").entering
        official = aim.merge_to_count(clip, keys, keep)
        expected = model.model.multi_modal_projector(official.features)  # merge, then project
        after = aim.merge_to_count(im.features, keys, keep)  # project, then merge
    assert keep < im.n_prunable and red.count == keep
    assert torch.equal(red.index, official.index)
    torch.testing.assert_close(red.features, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(after.index, official.index)  # same groups ...
    assert not torch.allclose(after.features, expected, atol=1e-6, rtol=1e-3)  # ... other merged values


def test_llava_no_hooks_left_and_only_needed_signals(llava):
    """Signals are gathered only when asked for, and every hook is removed afterwards."""
    model, processor = llava
    adapter = LlavaAdapter(model, processor)
    inputs = _inputs(processor, IMAGES[:1])
    with torch.no_grad():
        assert adapter.encode_images(inputs, frozenset())[0].signals == {}
        assert set(adapter.encode_images(inputs, frozenset({CLS_LOGITS}))[0].signals) == {CLS_LOGITS}
    for layer in vit_layers(model.model.vision_tower):
        assert not layer.self_attn.q_proj._forward_hooks and not layer.self_attn.k_proj._forward_hooks


@pytest.mark.parametrize("image_index", [0, 1, 2], ids=["landscape", "portrait", "square"])
def test_llava_next_geometry_and_signals_follow_the_features(llava_next, image_index):
    """Every packed token is traced back to its ViT pass and patch through its feature vector; its
    view/crop/coords and its signals must say the same (crop tokens: their own crop's [CLS] row)."""
    model, processor = llava_next
    adapter = LlavaNextAdapter(model, processor)
    inputs = _inputs(processor, [IMAGES[image_index]])
    with torch.no_grad():
        im = adapter.encode_images(inputs, ALL_SIGNALS)[0]
        # Per-pass projected features and signals, computed independently with an eager tower.
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        views = image_size_to_num_patches(inputs["image_sizes"][0], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        pixels = inputs["pixel_values"][0, :views]
        out = _eager_tower(model)(pixels, output_attentions=True, output_hidden_states=True)
        pass_feats = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])  # (V, P, d)
        pass_attn = out.attentions[-2][:, :, 0, 1:].mean(dim=1)  # (V, P)
    h, w = im.grid
    gh, gw = im.crop_grid
    assert views == 1 + gh * gw
    newline = im.view == -1
    assert torch.equal(im.prunable, ~newline)
    assert bool((im.features[newline] == model.model.image_newline).all())
    assert bool((im.signals[CLS_ATTENTION][newline] == 0).all())
    rows1, cols1 = im.view_shape[1]
    assert im.view_shape[0] == (h, w)
    assert int(newline.sum()) == rows1 and int((im.view == 1).sum()) == rows1 * cols1
    # Newlines end every row of the stitched grid.
    ends = newline.nonzero().squeeze(1)
    assert torch.equal(ends, h * w + torch.arange(1, rows1 + 1) * (cols1 + 1) - 1)

    offsets = set()
    per_view = [0] * views  # prunable tokens traced to each ViT pass
    flat = pass_feats.reshape(-1, pass_feats.shape[-1])
    for t in (~newline).nonzero().squeeze(1).tolist():
        dist = (flat - im.features[t]).abs().amax(dim=1)  # eager vs sdpa tower: equal up to rounding
        best = torch.topk(dist, 2, largest=False)
        assert best.values[0] < 1e-5 < best.values[1], f"token {t} does not come from exactly one patch"
        v, p = divmod(int(best.indices[0]), h * w)
        per_view[v] += 1
        r, c = divmod(p, w)
        assert int(im.view[t]) == (0 if v == 0 else 1)
        assert int(im.crop[t]) == v - 1
        torch.testing.assert_close(im.signals[CLS_ATTENTION][t], pass_attn[v, p], atol=1e-6, rtol=1e-5)
        if v == 0:
            assert im.coords[t].tolist() == [r, c]
        else:
            stitched = ((v - 1) // gw * h + r, (v - 1) % gw * w + c)
            offsets.add((stitched[0] - int(im.coords[t, 0]), stitched[1] - int(im.coords[t, 1])))
    assert len(offsets) == 1, "crop tokens must share one unpadding offset"
    (dr, dc), = offsets
    assert dr == 0 or dc == 0  # unpadding cuts rows or columns, never both
    crop_coords = im.coords[im.view == 1]
    assert crop_coords.min().item() == 0
    assert tuple((crop_coords.max(dim=0).values + 1).tolist()) == (rows1, cols1)
    # The per-view budget unit (thumbnail, each crop after unpadding) = the traced passes = what the
    # config-only geometry (gateway, vLLM processor) computes for this image size.
    assert list(im.view_sizes) == per_view
    height, width = (int(x) for x in inputs["image_sizes"][0])
    spec = ModelVisionSpec.from_dicts(model.config.to_dict())
    assert spec.image_tokens(width, height).view_sizes == im.view_sizes


def test_llava_next_images_per_row_with_two_images_in_one_prompt(llava_next):
    """Two images in one user turn: token counts per image come from their sizes alone."""
    model, processor = llava_next
    adapter = LlavaNextAdapter(model, processor)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(text=[text], images=IMAGES[:2], return_tensors="pt")
    with torch.no_grad():
        images = adapter.encode_images(inputs, frozenset({CLS_ATTENTION}))
        seq = adapter.build_sequence(inputs, 0, images)
    assert adapter.images_per_row(inputs) == [2]
    assert [im.n_tokens for im in images] == adapter.tokens_per_image(inputs)
    assert [s.numel() for s in seq.image_spans] == [im.n_tokens for im in images]
    assert torch.equal(seq.embeds, _stock_llm_input(model, inputs)[0])
