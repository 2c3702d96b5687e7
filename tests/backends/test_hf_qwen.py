"""Qwen2-VL / Qwen2.5-VL adapters against the stock transformers models they wrap.

Every check compares with what the stock model itself computes (its vision features, the
``inputs_embeds`` / ``position_ids`` its LLM receives, the attention probabilities its ViT block
actually uses), on a batch of two rows holding three images of two different sizes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward
from transformers.vision_utils import get_vision_window_index

from vlmprune.testbed.tiny import make_image
from vlmprune.reduction.image_tokens import CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC
from vlmprune.backends.hf.pipeline import ReferenceBackend, Request, adapter_for
from vlmprune.backends.hf.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from vlmprune.core import schedule
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig
from vlmprune.methods import METHODS
from vlmprune.policy import kept_count, parse_policy

FAMILIES = {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen25VLAdapter}
BOTH_SIGNALS = frozenset({CLS_ATTENTION, MERGE_METRIC})


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def qwen(request):
    """(family, model, processor, adapter) for one tiny seeded Qwen VLM (session fixtures in conftest)."""
    model, processor = request.getfixturevalue(request.param)
    return request.param, model, processor, FAMILIES[request.param](model, processor)


def _batch(processor):
    """Row 0: one 84x112 image (3x4 tokens); row 1: a 56x84 (2x3) and an 84x112 image; right-padded."""
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the box ?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "describe it"}]}],
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    images = [[make_image(112, 84, seed=0)], [make_image(84, 56, seed=1), make_image(112, 84, seed=2)]]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def _stock_llm_inputs(model, inputs):
    """The (inputs_embeds, position_ids) the stock model hands its language model."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs["position_ids"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["positions"]  # (B, S, d), (3, B, S)


def test_features_and_grids_equal_stock(qwen):
    """Features are the stock get_image_features output (hooks change nothing); grids are h/2 x w/2."""
    _, model, processor, adapter = qwen
    inputs = _batch(processor)
    with torch.no_grad():
        images = adapter.encode_images(inputs, BOTH_SIGNALS)
        stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert [im.grid for im in images] == [(3, 4), (2, 3), (3, 4)]
    assert adapter.images_per_row(inputs) == [1, 2]
    for im, ref in zip(images, stock, strict=True):
        assert torch.equal(im.features, ref)
        assert im.n_tokens == im.grid[0] * im.grid[1] and im.n_prunable == im.n_tokens
        assert im.signals[MERGE_METRIC] is im.features
        assert im.signals[CLS_ATTENTION].shape == (im.n_tokens,)


def test_sequence_equals_stock_llm_input(qwen):
    """Each row's embeddings and 3-D positions equal what the stock model feeds its LLM (bitwise)."""
    _, model, processor, adapter = qwen
    inputs = _batch(processor)
    stock_embeds, stock_positions = _stock_llm_inputs(model, inputs)
    with torch.no_grad():
        images = adapter.encode_images(inputs, frozenset())
        rows = [images[:1], images[1:]]
        for row, row_images in enumerate(rows):
            seq = adapter.build_sequence(inputs, row, row_images)
            keep = inputs["attention_mask"][row].bool()
            assert torch.equal(seq.embeds, stock_embeds[row][keep])
            assert torch.equal(seq.positions, stock_positions[:, row][:, keep])
            assert torch.equal(seq.input_ids, inputs["input_ids"][row][keep])
            slots = (seq.input_ids == model.config.image_token_id).nonzero().squeeze(1)
            assert torch.equal(torch.cat(seq.image_spans), slots)
            assert [s.numel() for s in seq.image_spans] == [im.n_tokens for im in row_images]
            # The instruction starts after the last image's <|vision_end|> and runs to the end.
            assert int(seq.input_ids[seq.instruction_index[0] - 1]) == model.config.vision_end_token_id
            assert int(seq.instruction_index[-1]) == seq.length - 1
            assert int(seq.positions[:, seq.image_spans[-1]].max()) < int(seq.positions[0, seq.instruction_index[0]])


_CAPTURE = "vlmprune_test_capture_eager"
_captured: list[tuple[torch.nn.Module, torch.Tensor]] = []


def _capture_eager(module, query, key, value, attention_mask, **kwargs):
    """Eager attention that also records the probabilities it used (the reference materialises them)."""
    out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _captured.append((module, weights.detach()))
    return out, weights


AttentionInterface.register(_CAPTURE, _capture_eager)


def _reference_scores(model, inputs, block_index: int) -> torch.Tensor:
    """Brute force: the scoring block's materialised softmax attention (eager), mean received per
    patch, moved from the blocks' (window) order back to patch order, then mean per 2x2 group."""
    visual = model.model.visual
    original = visual.config._attn_implementation
    _captured.clear()
    visual.set_attn_implementation(_CAPTURE)
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        visual.set_attn_implementation(original)
    assert visual.config._attn_implementation == original
    probs = [w for module, w in _captured if module is visual.blocks[block_index].attn]  # per image (1, H, n, n)
    received = torch.cat([w[0].float().mean(dim=0).mean(dim=0) for w in probs])  # (T,) blocks' order
    unit = visual.spatial_merge_size**2
    if hasattr(visual, "window_size"):
        window_index, _ = get_vision_window_index(
            inputs["image_grid_thw"], visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        assert not torch.equal(window_index, torch.arange(window_index.numel())), "window order must be non-trivial"
        patch_at_slot = (window_index[:, None] * unit + torch.arange(unit)).flatten()  # (T,)
        in_patch_order = torch.empty_like(received)
        in_patch_order[patch_at_slot] = received
        received = in_patch_order
    return received.view(-1, unit).mean(dim=1)  # (N,) LLM order


def test_cls_attention_equals_materialised_reference(qwen):
    """Pooled mean-attention-received equals a brute-force eager reference, window order undone."""
    family, model, processor, adapter = qwen
    inputs = _batch(processor)
    with torch.no_grad():
        images = adapter.encode_images(inputs, frozenset({CLS_ATTENTION}))
    expected_block = 1 if family == "qwen2_5_vl" else len(model.model.visual.blocks) - 1
    assert adapter.score_block() == expected_block
    reference = _reference_scores(model, inputs, expected_block)
    scores = torch.cat([im.signals[CLS_ATTENTION] for im in images])
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-7)
    assert MERGE_METRIC not in images[0].signals
    # Each query row sums to 1, so a patch's mean received attention sums to 1 per image;
    # pooling means over merge**2 patches, so each image's token scores sum to 1 / merge**2.
    unit = model.model.visual.spatial_merge_size ** 2
    for im in images:
        torch.testing.assert_close(im.signals[CLS_ATTENTION].sum(), torch.tensor(1.0 / unit))
    # Random weights still give distinct scores, so the comparison above tests the ordering.
    assert scores.unique().numel() == scores.numel()


def test_unavailable_signal_and_text_only(qwen):
    """A signal Qwen cannot give is a ValueError naming it; a text-only batch has no images."""
    family, _, processor, adapter = qwen
    inputs = _batch(processor)
    with pytest.raises(ValueError, match=f"{CLS_LOGITS}.*{family}"):
        adapter.encode_images(inputs, frozenset({CLS_LOGITS}))
    text = processor(text=["what is this ?"], return_tensors="pt")
    assert adapter.encode_images(text, BOTH_SIGNALS) == []
    assert adapter.images_per_row(text) == [0]


# --- through the reference pipeline ----------------------------------------------------------------

QWEN_METHODS = [name for name, spec in METHODS.items() if "qwen2_vl" in spec.models]
SELECTING = {"fastervlm", "random", "explain", "transprune", "fastv"}  # keep original tokens (no merging)
REQUESTS = [
    Request("what colour is the box ?", [make_image(112, 84, seed=0)]),
    Request("how many box are there ?", [make_image(84, 56, seed=1), make_image(112, 84, seed=2)]),
]


@pytest.fixture(scope="module")
def backend(qwen, tmp_path_factory):
    """(family, ReferenceBackend, explain checkpoint path) for the module's model."""
    family, model, processor, adapter = qwen
    torch.manual_seed(0)
    cnn = RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3))
    path = tmp_path_factory.mktemp(f"{family}_explain") / "cnn.pt"
    cnn.save(path)
    return family, ReferenceBackend(model, processor), str(path)


def _policy(method: str, ratio: float, checkpoint: str):
    extra = {"checkpoint": checkpoint} if method == "explain" else {}
    return parse_policy({"method": method, "ratio": ratio, **extra})


def test_registry_finds_the_adapters(qwen):
    """The pipeline's registry maps the model's config.model_type to this family's adapter."""
    family, model, processor, _ = qwen
    adapter = adapter_for(model, processor)
    assert type(adapter) is FAMILIES[family] and adapter.family == family == model.config.model_type
    assert adapter.reindex_after_pruning is False


def test_ratio_zero_reproduces_stock_logits(backend):
    """Ratio 0 gives the stock model's next-token logits, for every method Qwen supports."""
    family, be, ckpt = backend
    with torch.no_grad():
        stock = torch.stack(
            [be.model(**be.process([req]), logits_to_keep=1).logits[0, -1] for req in REQUESTS]
        )  # (B, V)
    assert "globalcom2" not in QWEN_METHODS and len(QWEN_METHODS) == 7
    for method in QWEN_METHODS:
        assert torch.equal(be.logits(REQUESTS, _policy(method, 0.0, ckpt)), stock), method


def _expected_input_keep(method: str, policy, n: int, num_layers: int) -> int:
    """Visual tokens of one n-token image at the LLM input: kept_count, or the scaled schedule's stage 0."""
    if method == "transprune":
        stages = schedule.transprune_stages(num_layers)
    elif method == "aim":
        stages = schedule.aim_stages(num_layers, policy.merge_keep)
    elif method == "fastv":
        return n  # FastV never prunes before layer K
    else:
        return kept_count(n, policy.ratio)
    layer, count = schedule.stage_counts(schedule.scale_to_ratio(stages, num_layers, policy.ratio), n)[0]
    return count if layer == 0 else n


def _match_columns(full, pruned) -> torch.Tensor:
    """Index in ``full`` of each row of ``pruned``, matching (token id, 3-D position) in order."""
    cols = []
    j = 0
    for i in range(pruned.length):
        key = (int(pruned.input_ids[i]), pruned.positions[:, i].tolist())
        while j < full.length and (int(full.input_ids[j]), full.positions[:, j].tolist()) != key:
            j += 1
        assert j < full.length, f"pruned row {i} {key} has no original token with that id and position"
        cols.append(j)
        j += 1
    return torch.tensor(cols)


@pytest.mark.parametrize("ratio", [0.5, 0.9], ids=["r0.5", "r0.9"])
@pytest.mark.parametrize("method", QWEN_METHODS)
def test_kept_count_and_original_positions(backend, method, ratio):
    """Exactly the promised count reaches the LLM input; kept tokens keep their original 3-D ids."""
    family, be, ckpt = backend
    policy = _policy(method, ratio, ckpt)
    num_layers = len(be.adapter.text_model.layers)
    inputs = be.process(REQUESTS)
    images = be.adapter.encode_images(inputs, frozenset())
    prefills = be.prefill(REQUESTS, policy)
    cursor = 0
    for row, pre in enumerate(prefills):
        row_images = images[cursor : cursor + len(REQUESTS[row].images)]
        cursor += len(row_images)
        expected = sum(_expected_input_keep(method, policy, im.n_tokens, num_layers) for im in row_images)
        if (method, ratio) != ("transprune", 0.5) and method != "fastv":  # these first prune inside the LLM
            assert expected < sum(im.n_tokens for im in row_images)  # the check is not vacuous
        at_input = sum(int(s.numel()) for s in pre.sequence.image_spans)
        assert pre.kept_tokens == at_input == expected
        assert pre.visual_tokens == sum(im.n_tokens for im in row_images)

        full = be.adapter.build_sequence(inputs, row, row_images)
        matched = _match_columns(full, pre.sequence)  # raises if any id/position is new
        text = torch.ones(full.length, dtype=torch.bool)
        text[torch.cat(full.image_spans)] = False
        assert text[matched].sum() == text.sum()  # every text token survives with its position
        if method in SELECTING:
            assert torch.equal(pre.sequence.embeds, full.embeds[matched])
