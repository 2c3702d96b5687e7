"""The plugin's shared machinery without an engine: policies, fields, guards, registration, layouts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmprune.policy import PolicyError, parse_policy
from vlmprune.vllm_plugin import engine_checks, fields, processor, request_policy
from vlmprune import wire


def test_importing_the_plugin_package_pulls_in_no_vllm():
    """``import vlmprune.vllm_plugin`` (what vLLM's entry point loads) imports no vLLM and cannot fail."""
    code = "import sys, vlmprune.vllm_plugin as p; print(callable(p.register), 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_register_is_idempotent_and_registers_lazy_strings():
    """register() twice registers each architecture once, as a lazy ``module:Class`` string."""
    code = (
        "import vlmprune.vllm_plugin as p\n"
        "from vllm import ModelRegistry\n"
        "p.register(); p.register()\n"
        "m = ModelRegistry.models['LlavaForConditionalGeneration']\n"
        "print(type(m).__name__, m.module_name, m.class_name)\n"
        "n = ModelRegistry.models['LlavaNextForConditionalGeneration']\n"
        "print(n.module_name, n.class_name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "_LazyRegisteredModel vlmprune.vllm_plugin.llava PrunedLlava"
    assert lines[1] == "vlmprune.vllm_plugin.llava_next PrunedLlavaNext"


def test_every_registered_target_subclasses_the_stock_model():
    """Each lazy ``module:Class`` of ``MODELS`` imports and subclasses vLLM's own class for that
    architecture (registration is plain, so a wrong target would only fail inside an engine)."""
    import importlib

    from vllm.model_executor.models.registry import _MULTIMODAL_MODELS

    from vlmprune.vllm_plugin import MODELS

    for arch, target in MODELS.items():
        module, _, cls = target.partition(":")
        ours = getattr(importlib.import_module(module), cls)
        stock_module, stock_cls = _MULTIMODAL_MODELS[arch]
        stock = getattr(importlib.import_module(f"vllm.model_executor.models.{stock_module}"), stock_cls)
        assert issubclass(ours, stock) and ours is not stock, (arch, target)


@pytest.mark.parametrize(
    "raw,expected",
    [
        (None, None),
        ({"method": "fastervlm", "ratio": 0.9}, ("fastervlm", 0.9)),
        ('{"method": "pool", "ratio": 0.5}', ("pool", 0.5)),
        ({"ratio": 0.5}, ("fastervlm", 0.5)),
    ],
    ids=["none", "mapping", "json-string", "default-method"],
)
def test_parse_request(raw, expected):
    """None = no pruning; a mapping or a JSON string is validated by parse_policy."""
    request = wire.parse_request(raw)
    if expected is None:
        assert request.policy is None and not request.active
    else:
        assert (request.policy.method, request.policy.ratio) == expected and request.active


def test_instruction_is_split_from_the_policy_and_tokenized(llava):
    """``instruction`` is not a policy option: it is kept apart and tokenized without special tokens."""
    _, processor = llava
    request = wire.parse_request({"method": "fastervlm", "ratio": 0.5, "instruction": "what colour is the box"})
    assert request.instruction == "what colour is the box"
    ids = request_policy.instruction_ids(processor.tokenizer, request)
    assert ids == processor.tokenizer("what colour is the box", add_special_tokens=False)["input_ids"]
    with pytest.raises(PolicyError, match="field 'instruction'"):
        wire.parse_request({"method": "fastervlm", "instruction": 3})


def test_check_method_names_method_and_model(monkeypatch):
    """Unsupported pairings and not-yet-available methods fail with the method and model named
    (explain: on the probe route; the in-LLM route serves it whatever the input methods are)."""
    req = wire.parse_request({"method": "globalcom2", "ratio": 0.0})
    with pytest.raises(PolicyError, match=r"'globalcom2' does not apply to model family 'llava'.*served model: m"):
        request_policy.check_method(req, "llava", request_policy.PRE_LLM_METHODS, "m")
    request_policy.check_method(req, "llava_next", request_policy.PRE_LLM_METHODS, "m")
    req = wire.parse_request({"method": "explain", "ratio": 0.5})
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)
    request_policy.check_method(req, "llava", request_policy.PRE_LLM_METHODS, "m")
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    with pytest.raises(PolicyError, match=r"'explain' needs the instruction probe.*available here: fastervlm, pool, random"):
        request_policy.check_method(req, "llava", request_policy.PRE_LLM_METHODS, "m")


def test_fields_roundtrip_through_vllm_batching():
    """encode_fields -> vLLM's own batched-field reduction -> pop_item_policies gives every image's
    policy (and trace id with the image's place in its request)."""
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem

    a = wire.RequestPolicy(parse_policy({"method": "random", "ratio": 0.5, "seed": 7}), "what is this", "run-0001")
    b = wire.RequestPolicy(None)
    fa = fields.encode_fields(a, [18, 18], [5, 6, 7])
    fb = fields.encode_fields(b, [36], [])
    items = []
    for encoded in (fa, fb):
        n = encoded[fields.FIELD_COUNT].shape[0]
        for i in range(n):
            items.append({k: v[i] for k, v in encoded.items()})
    field = MultiModalBatchedField(keep_on_cpu=True)
    kwargs = {
        name: field.reduce_data([MultiModalFieldElem(data=item[name], field=field) for item in items], pin_memory=False)
        for name in fields.FIELDS
    }
    kwargs["pixel_values"] = torch.zeros(3)
    got = fields.pop_item_policies(kwargs)
    assert set(kwargs) == {"pixel_values"}
    assert [g.count for g in got] == [18, 18, 36]
    assert [g.active for g in got] == [True, True, False]
    assert got[0].policy == a.policy and got[2].policy is None
    assert got[1].instruction_ids.tolist() == [5, 6, 7] and got[2].instruction_ids.numel() == 0
    assert [g.trace for g in got] == [("run-0001", 0), ("run-0001", 1), None]
    assert fields.pop_item_policies({"pixel_values": 1}) is None


def test_policy_free_context_drops_the_key_from_every_merge():
    """The processing context never hands ``vlmprune`` to the Hugging Face processor (engine default included)."""
    from vllm.config.multimodal import MultiModalConfig
    from vllm.multimodal.processing import InputProcessingContext

    mm_config = MultiModalConfig(mm_processor_kwargs={"vlmprune": {"method": "pool", "ratio": 0.5}, "do_resize": True})
    model_config = SimpleNamespace(get_multimodal_config=lambda: mm_config, multimodal_config=mm_config)
    ctx = processor.policy_free_context(InputProcessingContext(model_config, None))
    merged = ctx.get_merged_mm_kwargs({"vlmprune": {"ratio": 0.9}, "size": 3})
    assert "vlmprune" not in merged and merged["do_resize"] is True and merged["size"] == 3
    # ... while the plugin itself sees the request merged recursively over the engine default.
    request = request_policy.merged_request(mm_config, {"vlmprune": {"ratio": 0.9}})
    assert (request.policy.method, request.policy.ratio) == ("pool", 0.9)
    assert request_policy.merged_request(mm_config, {"vlmprune": None}).policy is None


def _vllm_config(**overrides):
    mm = SimpleNamespace(mm_processor_kwargs=overrides.pop("defaults", None), mm_encoder_tp_mode=overrides.pop("tp_mode", "weights"))
    return SimpleNamespace(
        compilation_config=SimpleNamespace(
            compile_mm_encoder=overrides.pop("compile_mm_encoder", False),
            cudagraph_mm_encoder=overrides.pop("cudagraph_mm_encoder", False),
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=overrides.pop("tp", 1)),
        model_config=SimpleNamespace(multimodal_config=mm),
    )


def test_check_engine_refuses_unsafe_configurations(monkeypatch):
    """Compiled / graph-captured encoders, bad defaults and untested versions refuse to start."""
    import vllm

    assert engine_checks.check_engine(_vllm_config(), "m", "llava").policy is None
    for flag in ("compile_mm_encoder", "cudagraph_mm_encoder"):
        with pytest.raises(RuntimeError, match=flag):
            engine_checks.check_engine(_vllm_config(**{flag: True}), "m")
    # A tensor-parallel tower is served in either encoder mode (the scores are reduced across ranks;
    # the TP=2 engines of tests/vllm/test_plugin_tp.py check the answers).
    engine_checks.check_engine(_vllm_config(tp=2), "m")
    engine_checks.check_engine(_vllm_config(tp=2, tp_mode="data"), "m")
    with pytest.raises(RuntimeError, match="engine default.*'globalcom2' does not apply"):
        engine_checks.check_engine(_vllm_config(defaults={"vlmprune": {"method": "globalcom2"}}), "m", "llava")
    default = engine_checks.check_engine(_vllm_config(defaults={"vlmprune": {"method": "pool", "ratio": 0.5}}), "m", "llava")
    assert default.policy.method == "pool"
    monkeypatch.delenv(engine_checks.ALLOW_UNTESTED_ENV, raising=False)
    for version in ("0.34.0", "0.31.2", "1.0.0", "0.320.0"):
        monkeypatch.setattr(vllm, "__version__", version)
        with pytest.raises(RuntimeError, match=rf"supports vLLM 0.32.x \(engine-tested\) and 0.33.x "
                                               rf"\(source-checked\) only, found {re.escape(version)}"):
            engine_checks.check_engine(_vllm_config(), "m")
    monkeypatch.setenv(engine_checks.ALLOW_UNTESTED_ENV, "1")
    engine_checks.check_engine(_vllm_config(), "m")


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.33.0", "0.33.2rc1"])
def test_check_engine_accepts_engine_tested_and_source_checked_versions(monkeypatch, version):
    """0.32.x (engine-tested) and 0.33.x (source-checked) start without the override."""
    import vllm

    monkeypatch.delenv(engine_checks.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(vllm, "__version__", version)
    assert engine_checks.check_engine(_vllm_config(), "m", "llava").policy is None


def test_gpu_extra_installs_only_versions_the_plugin_accepts():
    """pyproject's ``gpu`` extra and the plugin's version check admit the same vLLM releases."""
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    (gpu,) = [Requirement(r) for r in extras["optional-dependencies"]["gpu"] if r.startswith("vllm")]
    for version in ("0.31.9", "0.32.0", "0.32.4", "0.33.0", "0.33.5", "0.34.0", "1.0.0"):
        assert gpu.specifier.contains(version) == version.startswith(engine_checks.SUPPORTED_VLLM), version


def test_hub_layout_keys():
    """transformers 5 CLIP-tower keys are renamed to the hub layout vLLM loads; others unchanged."""
    from vlmprune.testbed.vllm_layout import hub_key

    assert hub_key("vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert hub_key("model.vision_tower.embeddings.class_embedding") == "vision_tower.vision_model.embeddings.class_embedding"
    assert hub_key("vision_tower.vision_model.post_layernorm.bias") == "vision_tower.vision_model.post_layernorm.bias"
    assert hub_key("language_model.model.norm.weight") == "language_model.model.norm.weight"
    assert hub_key("image_newline") == "image_newline"


# --- LLaVA-NeXT geometry, checked against vLLM's packing and the transformers backend -----------


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from vlmprune.testbed.vllm_layout import VLLM_CPU_HEAD_DIM
    from vlmprune.testbed.tiny import build_llava_next

    return build_llava_next(tmp_path_factory.mktemp("next_geometry"), head_dim=VLLM_CPU_HEAD_DIM)


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (90, 90), (30, 112)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_next_layout_reproduces_vllm_packing_and_reference_geometry(next_model, size):
    """packed_sources gathers exactly vLLM's packed rows; the geometry read from them (view, crop,
    coords, shapes) equals the transformers backend's, whose source indices its own packing laid
    out, and each crop holds what ``crop_view_sizes`` (the gateway's and processor's count) says."""
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration

    from vlmprune.backends.hf.llava_next import LlavaNextAdapter
    from vlmprune.testbed.tiny import make_image
    from vlmprune.reduction.anyres import crop_view_sizes, packed_image_tokens
    from vlmprune.vllm_plugin.llava_next import packed_sources

    model, processor = next_model
    width, height = size
    inputs = processor(images=[make_image(width, height, seed=4)], text="<image> what", return_tensors="pt")
    views = inputs["pixel_values"].shape[1]
    image_size = inputs["image_sizes"][0]
    shim = SimpleNamespace(config=model.config, image_newline=torch.randn(8, dtype=torch.float64))
    feats = torch.randn(views, 16, 8, dtype=torch.float64)
    packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(shim, image_size, feats, strategy="spatial_unpad")
    sources = packed_sources(shim, image_size, views)
    rebuilt = torch.where((sources >= 0)[:, None], feats.reshape(-1, 8)[sources.clamp_min(0)], shim.image_newline)
    assert torch.equal(rebuilt, packed)

    ref = LlavaNextAdapter(model, processor).encode_images(inputs, frozenset())[0]
    gh, gw = LlavaNextAdapter(model, processor)._crop_grid(image_size)
    mine = packed_image_tokens(ref.features, sources, {}, (4, 4), (gh, gw))
    assert ref.n_tokens == sources.shape[0]
    for name in ("prunable", "view", "crop", "coords"):
        assert torch.equal(getattr(mine, name).cpu(), getattr(ref, name).cpu()), name
    assert mine.view_shape == ref.view_shape and mine.crop_grid == ref.crop_grid
    per_crop = tuple(int((mine.crop == c).sum()) for c in range(gh * gw))
    assert int((mine.view == 0).sum()) == 16 and per_crop == crop_view_sizes(4, (gh, gw), mine.view_shape[1])


def test_trace_id_is_split_from_the_policy_and_checked():
    """``trace`` is not a policy option: it is split off the mapping, and only a plain file name passes."""
    request = wire.parse_request({"method": "pool", "ratio": 0.5, "trace": "run-0001"})
    assert request.trace == "run-0001" and request.policy.method == "pool"
    with pytest.raises(PolicyError, match="'trace'"):
        wire.parse_request({"method": "pool", "ratio": 0.5, "trace": "../../x"})


def test_fastv_is_served_in_llm_and_refused_on_the_probe_route(monkeypatch):
    """FastV exists only in-LLM: served on the in-LLM route (the default), refused by name on the
    probe route (for every family, any ratio)."""
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)
    for ratio in (0.0, 0.5):
        req = wire.parse_request({"method": "fastv", "ratio": ratio})
        request_policy.check_method(req, "qwen2_vl", request_policy.PLUGIN_METHODS, "m")
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    for ratio in (0.0, 0.5):
        req = wire.parse_request({"method": "fastv", "ratio": ratio})
        with pytest.raises(PolicyError, match=r"'fastv' runs only between the served LLM's decoder layers.*"
                                              r"VLMPRUNE_ROUTE=probe.*served model: m"):
            request_policy.check_method(req, "qwen2_vl", request_policy.PLUGIN_METHODS, "m")


def test_in_llm_prompt_check_refuses_what_the_stages_cannot_serve(monkeypatch):
    """``request_policy.check_in_llm_prompt`` (run by the processor, so a bad prompt is a 400 for that request, not an
    engine stop in the forward): a video after the last image (its rows would count as instruction),
    TransPrune without instruction rows (Qwen's ``<|vision_end|>`` is not one); fine prompts pass,
    and nothing is checked off in-LLM mode or for other methods."""
    check = request_policy.check_in_llm_prompt

    def ranges(*pairs):
        return [SimpleNamespace(offset=o, length=n) for o, n in pairs]

    tp, fv = parse_policy({"method": "transprune", "ratio": 0.5}), parse_policy({"method": "fastv", "ratio": 0.5})
    image_then_video = {"image": ranges((2, 4)), "video": ranges((8, 4))}
    ids = list(range(14))
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    check(tp, "qwen2_vl", ids, image_then_video)  # probe mode: not this check's business
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)  # the default route: in-LLM
    with pytest.raises(PolicyError, match="video after it"):
        check(fv, "qwen2_vl", ids, image_then_video)
    check(tp, "qwen2_vl", ids, {"video": ranges((0, 2)), "image": ranges((2, 4))})  # video first
    check(parse_policy({"method": "fastervlm", "ratio": 0.5}), "qwen2_vl", ids, image_then_video)
    with pytest.raises(PolicyError, match="needs instruction text"):
        check(tp, "llava", list(range(6)), {"image": ranges((2, 4))})
    with pytest.raises(PolicyError, match="needs instruction text"):  # only <|vision_end|> after the image
        check(tp, "qwen2_vl", [0, 1, 9, 9, 9, 9, 77], {"image": ranges((2, 4))}, vision_end=77)
    check(tp, "qwen2_vl", [0, 1, 9, 9, 9, 9, 77, 5], {"image": ranges((2, 4))}, vision_end=77)
    check(fv, "llava", list(range(6)), {"image": ranges((2, 4))})  # fastv needs no instruction


def test_in_llm_span_must_fit_the_step_budget(monkeypatch):
    """The rows from the first image to the prompt's end are prefilled in one step: a span longer than
    the engine's step budget is refused (naming the limit); the text before the image does not count;
    an unknown budget, pre-LLM methods and the probe route are not checked."""
    check = request_policy.check_in_llm_prompt
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)
    tp = parse_policy({"method": "transprune", "ratio": 0.5})
    images = {"image": [SimpleNamespace(offset=100, length=36), SimpleNamespace(offset=140, length=36)]}
    ids = list(range(200))  # span: 200 - 100 = 100 rows
    check(tp, "llava", ids, images, step_budget=100)
    check(tp, "llava", ids, images)  # budget unknown
    with pytest.raises(PolicyError, match=r"needs 100 tokens there.*--max-num-batched-tokens 99"):
        check(tp, "llava", ids, images, step_budget=99)
    check(parse_policy({"method": "fastervlm", "ratio": 0.5}), "llava", ids, images, step_budget=99)
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    check(tp, "llava", ids, images, step_budget=99)


@pytest.mark.parametrize("span_start,prompt_len,computed,new,want", [
    (10, 100, 0, 100, 100),  # the whole prompt in one step
    (10, 100, 0, 50, 10),  # would end inside the span: only the rows before the image
    (10, 100, 0, 8, 8),  # a chunk of the prefix
    (10, 100, 8, 50, 2),  # the rest of the prefix
    (10, 100, 10, 50, 0),  # at the span, too small a step: wait
    (10, 100, 10, 90, 90),  # the span whole
    (10, 100, 100, 1, 1),  # decode
    (0, 40, 0, 39, 0),  # image first: all or nothing
    (10, 100, 0, 120, 120),  # resumed after preemption: prompt + outputs
])
def test_scheduler_step_keeps_the_span_whole(span_start, prompt_len, computed, new, want):
    from vlmprune.vllm_plugin.inllm_plan import in_llm_step

    assert in_llm_step(span_start, prompt_len, computed, new) == want
