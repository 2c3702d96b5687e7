"""Qwen2-VL and Qwen2.5-VL in vLLM with per-request visual-token pruning.

Registered (lazily, by :func:`vlmprune.vllm_plugin.register`) as ``PrunedQwen2VL`` under
``Qwen2VLForConditionalGeneration`` and ``PrunedQwen2_5_VL`` under
``Qwen2_5_VLForConditionalGeneration``. Methods: ``fastervlm``, ``random``, ``pool`` decided by
:func:`vlmprune.reduction.reduce.reduce_image`, the routing into :mod:`vlmprune.core` that the
transformers reference backend uses too; ``transprune``, ``aim`` (merge, then PageRank) and
``explain`` by the shallow probe of :mod:`vlmprune.vllm_plugin.probe`, over M-RoPE positions (the
image's (t, h, w) ids, the instruction after them), on the probe route (``VLMPRUNE_ROUTE=probe``). On
the in-LLM route (the default on CPU engines), ``transprune``, ``aim`` and ``fastv`` run between the decoder layers instead
(:mod:`vlmprune.vllm_plugin.inllm`, installed by :class:`QwenPruningMixin`): every visual row enters
the LLM (AIM: its merged rows), each keeping its (t, h, w) id.

Processor (front end): the stock one plus the policy fields of :mod:`.fields`; each image's
``<|image_pad|>`` run shrinks to the count the processor computed from the merged-token grid
(``t*h*w / merge**2``) and the ratio. Videos are never pruned (stock counts).

Model (worker): ``embed_multimodal`` runs the stock vision tower once. When a batch needs the
FasterVLM score, a forward pre-hook on the attention kernel of one full-attention block (Qwen2-VL:
the last block; Qwen2.5-VL: the last of ``fullatt_block_indexes``) reads the ``query``/``key``
tensors that kernel receives, i.e. *after* the vision RoPE, and
:func:`~vlmprune.signals.attention.mean_attention_received` scores each patch per image
(block-diagonal, per-image bounds), then :func:`~vlmprune.reduction.qwen_pooling.pool_merge_groups`
averages every merge group exactly as the PatchMerger groups patches. Qwen2.5-VL permutes merge
groups into window order inside its blocks; the scores are put back with the inverse of vLLM's
own per-image ``get_window_index_thw``. AIM's merge metric is the merger output (as in the
reference backend).

M-RoPE positions: every kept (or merged) token keeps the (t, h, w) id it has in the unpruned
sequence, through vLLM's own pruning hooks (:mod:`vlmprune.vllm_plugin.mrope`).

Runner switches (vLLM 0.32). The V1 GPU runner and the V2 runner enable the recompute path when
``supports_multimodal_pruning(model) and mm_config.is_multimodal_pruning_enabled()``; the latter
is EVS's ``video_pruning_rate > 0``. Without touching ``video_pruning_rate``, the model marks *its
own* ``MultiModalConfig`` instance (attribute ``_vlmprune_mrope_pruning``) before the stock
``__init__`` runs, and :func:`vlmprune.vllm_plugin.patches.patch_multimodal_config` makes
``is_multimodal_pruning_enabled`` also return True for a marked instance (other models and engines are unaffected). The CPU runner never
sets its flag at all; :func:`vlmprune.vllm_plugin.patches.patch_cpu_runner` (called from
``register()``) sets it after loading, for vlmprune models only.

Limits: an engine with ``video_pruning_rate > 0`` (EVS) is refused (the two position protocols
differ); ``image_embeds`` inputs cannot be pruned (their policy is refused in the processor); the
scheduler's encoder budget counts pruned tokens while the full ViT runs (as with EVS).

Shapes: ``T`` ViT patches of a batch, ``N_i`` merged tokens of image i, ``H`` ViT heads, ``D`` head
dim, ``n`` rows one image contributes, ``L`` prompt length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vlmprune.policy import PolicyError
from vlmprune.reduction.image_tokens import CLS_ATTENTION, MERGE_METRIC, ImageTokens
from vlmprune.core.select import TokenReduction
from vlmprune.reduction.qwen_pooling import pool_merge_groups
from vlmprune.reduction.reduce import reduce_image
from vlmprune.signals.attention import mean_attention_received
from vlmprune.vllm_plugin.engine_checks import check_engine
from vlmprune.vllm_plugin.fields import item_count, ItemPolicy, pop_item_policies
from vlmprune.vllm_plugin.processor import policy_free_context, PolicyProcessorMixin
from vlmprune.vllm_plugin.request_policy import PROBE_METHODS
from vlmprune.wire import POLICY_KEY
from vlmprune.methods import IN_LLM_FAMILIES, names, policy_in_llm, route
from vlmprune.vllm_plugin.engine_checks import check_engine_in_llm
from vlmprune.vllm_plugin.inllm import InLLMForward
from vlmprune.vllm_plugin.llava import needed_signals
from vlmprune.vllm_plugin.probe import ModelProbe
from vlmprune.vllm_plugin.fallback import guarded
from vlmprune.vllm_plugin.patches import patch_multimodal_config
from vlmprune.vllm_plugin.tensor_parallel import data_parallel_images, gather_image_scores, mean_over_shards
from vlmprune.vllm_plugin.mrope import (
    POSITION_CHANNELS,
    decode_position_channels,
    encode_position_channels,
    grid_positions,
    mrope_input_positions,
    recompute_positions,
)
from vlmprune.vllm_plugin.tracing import record_kept

logger = logging.getLogger(__name__)

CONFIG_MARK = "_vlmprune_mrope_pruning"
"""Attribute set on the served model's ``MultiModalConfig`` instance (see the module docstring)."""


# --- Vision-side score ----------------------------------------------------------------------------


class _KernelQKCapture:
    """The ``query``/``key`` one ViT attention kernel receives during a forward (read, never written)."""

    def __init__(self, kernel: nn.Module) -> None:
        self.kernel = kernel
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle: Any = None

    def _pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        query = kwargs["query"] if "query" in kwargs else args[0]
        key = kwargs["key"] if "key" in kwargs else args[1]
        self.calls.append((query.detach(), key.detach()))  # (1, T, H, D) each

    def __enter__(self) -> _KernelQKCapture:
        self._handle = self.kernel.register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


# --- Processor ------------------------------------------------------------------------------------


class PrunedQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    """Stock info whose Hugging Face processor never receives the plugin's key."""

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(POLICY_KEY, None)
        return super().get_hf_processor(**kwargs)


class PrunedQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Stock info whose Hugging Face processor never receives the plugin's key."""

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(POLICY_KEY, None)
        return super().get_hf_processor(**kwargs)


class QwenPromptMixin:
    """Image placeholder runs of the counts the processor attached; videos keep the stock update."""

    def _vlmprune_token_parts(self, hf_inputs: Any) -> list[tuple[int, int]]:
        grid_thw = hf_inputs.get("image_grid_thw")
        if grid_thw is None or hf_inputs.get("pixel_values") is None:
            return []
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)  # type: ignore[attr-defined]
        return [(int(torch.as_tensor(g).prod()) // (merge * merge), 0) for g in grid_thw]

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        stock = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items=mm_items, hf_processor_mm_kwargs=hf_processor_mm_kwargs, out_mm_kwargs=out_mm_kwargs
        )
        image_token_id = int(self.info.get_hf_config().image_token_id)  # type: ignore[attr-defined]
        out = []
        for update in stock:
            if update.modality != "image":
                out.append(update)
                continue

            def replacement(item_idx: int, _stock=update):
                count = item_count(out_mm_kwargs, item_idx)
                if count is not None:
                    return [image_token_id] * count
                # No fields: pixel inputs always get them, so these are image_embeds inputs.
                if self.vlmprune_request(hf_processor_mm_kwargs).active:  # type: ignore[attr-defined]
                    raise PolicyError("vlmprune needs images (pixel inputs); it cannot prune image_embeds inputs")
                return _stock.replacement(item_idx)

            out.append(PromptReplacement(modality="image", target=update.target, replacement=replacement))
        return out


QWEN_METHODS = names("at_input", family="qwen2_vl")
"""Methods the plugin runs at Qwen's LLM input (``MethodSpec.models``: not GlobalCom2, which needs
LLaVA-NeXT's AnyRes views)."""


class PrunedQwen2VLMultiModalProcessor(QwenPromptMixin, PolicyProcessorMixin, Qwen2VLMultiModalProcessor):
    vlmprune_family = "qwen2_vl"
    vlmprune_methods = QWEN_METHODS


class PrunedQwen2_5_VLMultiModalProcessor(QwenPromptMixin, PolicyProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    vlmprune_family = "qwen2_5_vl"
    vlmprune_methods = QWEN_METHODS


def _info_factory(info_cls: type) -> Any:
    return lambda ctx: info_cls(policy_free_context(ctx))


# --- Model ----------------------------------------------------------------------------------------


class QwenPruningMixin:
    """What both pruned Qwen models add to the stock classes (put first in the bases)."""

    supports_multimodal_pruning: ClassVar[bool] = True
    vlmprune_mrope_pruning: ClassVar[bool] = True
    """Read by the CPU-runner hook: this model appends position channels and must be recomputed."""
    vlmprune_family: ClassVar[str] = ""
    vlmprune_methods: ClassVar[frozenset[str]] = QWEN_METHODS

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        model_name = str(vllm_config.model_config.model)
        check_engine(vllm_config, model_name, self.vlmprune_family, self.vlmprune_methods)
        if self.vlmprune_family in IN_LLM_FAMILIES:
            check_engine_in_llm(vllm_config, model_name)
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config.video_pruning_rate:
            raise RuntimeError(
                f"vlmprune cannot serve {model_name} with video_pruning_rate={mm_config.video_pruning_rate} "
                "(EVS): its position channels differ from vlmprune's; unset --video-pruning-rate"
            )
        patch_multimodal_config(CONFIG_MARK)
        setattr(mm_config, CONFIG_MARK, True)  # before the stock __init__ reads the flag
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self._vlmprune_layers = int(self.config.text_config.num_hidden_layers)  # type: ignore[attr-defined]
        self._vlmprune_probe = ModelProbe(self.language_model.model, model_name)  # type: ignore[attr-defined]
        if route() == "in_llm" and self.vlmprune_family in IN_LLM_FAMILIES:
            InLLMForward(
                self.language_model.model,  # type: ignore[attr-defined]
                self.vlmprune_family,
                0,  # per image: the layout's count
                self._vlmprune_image_layout,
                vision_end=int(self.config.vision_end_token_id),  # type: ignore[attr-defined]
                explain_model=self._vlmprune_probe.explain_model,
            ).install()

    def _vlmprune_image_layout(self, feature: Any, _runner: Any) -> tuple[int, torch.Tensor]:
        """(merged tokens of one image before any reduction, its run's prunable rows: all) for the
        in-LLM stages (:func:`vlmprune.vllm_plugin.inllm_plan.request_plan`): AIM's placeholders are
        already merged, so the run length does not say the count."""
        merge = int(self.config.vision_config.spatial_merge_size)  # type: ignore[attr-defined]
        count = int(torch.as_tensor(feature.data["image_grid_thw"].data).prod()) // (merge * merge)
        return count, torch.ones(int(feature.mm_position.length), dtype=torch.bool)

    # -- family hooks ------------------------------------------------------------------------------
    def vlmprune_score_block(self) -> int:
        """Index of the full-attention ViT block whose attention scores the patches."""
        raise NotImplementedError

    def _vlmprune_llm_order(self, merged: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """(N_i,) merged-token values of one image in the blocks' order -> LLM (merger output) order."""
        return merged

    # -- encoder -----------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        items = pop_item_policies(kwargs)  # type: ignore[arg-type]
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)  # type: ignore[attr-defined]
        out: list[torch.Tensor] = []
        for key, media_input in modalities.items():
            if media_input is None:
                continue
            if key.startswith("image"):
                out.extend(self._vlmprune_images(media_input, items))
            else:
                out.extend(self._vlmprune_videos(media_input))
        return tuple(out)

    def _vlmprune_images(self, image_input: Any, items: list[ItemPolicy] | None) -> list[torch.Tensor]:
        visual = self.visual  # type: ignore[attr-defined]
        merge = int(visual.spatial_merge_size)
        grid_thw = [[int(x) for x in g] for g in image_input["image_grid_thw"].tolist()]
        active = items is not None and any(item.active for item in items)
        if active and image_input["type"] != "pixel_values":
            raise RuntimeError("vlmprune: image_embeds inputs cannot be pruned (the processor should refuse them)")
        needs = needed_signals(items, self.vlmprune_family) if active else frozenset()

        # 1. One stock vision forward; the scoring block's kernel inputs are captured if needed.
        scores: list[torch.Tensor] | None = None
        if CLS_ATTENTION in needs:
            block = visual.blocks[self.vlmprune_score_block()]
            with _KernelQKCapture(block.attn.attn) as capture:
                features = self._process_image_input(image_input)  # type: ignore[attr-defined]
            scores = self._vlmprune_scores(capture, grid_thw, merge)
        else:
            features = self._process_image_input(image_input)  # type: ignore[attr-defined]
        if items is not None and len(items) != len(features):
            raise RuntimeError(f"vlmprune: {len(features)} images encoded for {len(items)} policies")

        # 2. Per image: the reduction, then the kept rows with their position channels.
        out = []
        for i, (feats, (t, h, w)) in enumerate(zip(features, grid_thw)):
            llm_h, llm_w = h // merge, w // merge
            thw = torch.from_numpy(grid_positions(t, llm_h, llm_w).T.copy()).to(feats.device)  # (N_i, 3)
            item = None if items is None else items[i]
            if item is not None and item.active:
                signals = {MERGE_METRIC: feats}
                if scores is not None:
                    signals[CLS_ATTENTION] = scores[i]
                image = ImageTokens(
                    features=feats,
                    prunable=torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device),
                    grid=(llm_h, llm_w),
                    signals=signals,
                )
                reduction, failure = guarded(item, self.vlmprune_family, image.prunable,
                                             lambda: self._vlmprune_reduce(item, image, thw))
                if reduction is None:
                    rows, index = feats, torch.arange(feats.shape[0], device=feats.device)
                else:
                    rows, index = reduction.apply(feats).to(feats.dtype), reduction.index.to(feats.device)
            else:
                rows, index, failure = feats, torch.arange(feats.shape[0], device=feats.device), None
            if item is not None and rows.shape[0] != item.count:
                raise RuntimeError(
                    f"vlmprune: image {i} gives {rows.shape[0]} rows but the processor reserved {item.count} "
                    f"placeholders (policy {item.policy}); the processor and the model disagree"
                )
            record_kept(item, self.vlmprune_family, index, feats.shape[0], grid=(t * llm_h, llm_w), fallback=failure)
            row_ids = torch.arange(rows.shape[0], device=rows.device)
            out.append(torch.cat([rows, encode_position_channels(thw[index], row_ids, rows.dtype)], dim=1))
        return out

    def _vlmprune_reduce(self, item: ItemPolicy, image: ImageTokens, thw: torch.Tensor) -> TokenReduction | None:
        """One image's reduction at the LLM input (None: every row enters the LLM)."""
        if policy_in_llm(item.policy, self.vlmprune_family):
            # In-LLM stages (vlmprune.vllm_plugin.inllm): TransPrune, FastV and explain keep every row here,
            # AIM merges to its schedule's LLM-input count.
            if item.policy.method == "aim":
                return reduce_image(item.policy, self.vlmprune_family, image, num_layers=self._vlmprune_layers)
            return None
        if item.policy.method in PROBE_METHODS:  # instruction-aware: the LM probe decides
            return self._vlmprune_probe.reduce(item, image, self.vlmprune_family, self._vlmprune_layers,
                                               grid_positions=thw.T)
        return reduce_image(item.policy, self.vlmprune_family, image, num_layers=self._vlmprune_layers)

    def _vlmprune_scores(self, capture: _KernelQKCapture, grid_thw: list[list[int]], merge: int) -> list[torch.Tensor]:
        """FasterVLM's Qwen score per image, (N_i,) in LLM order, from the captured q/k.

        Tensor parallel (:mod:`.tensor_parallel`): with a head-sharded ViT each rank scores with its
        heads and the means are summed across ranks; with the data-parallel encoder each rank
        encoded (and scored) some of the images and the scores are gathered."""
        attn = self.visual.blocks[self.vlmprune_score_block()].attn  # type: ignore[attr-defined]
        shards = int(getattr(attn, "tp_size", 1) or 1)
        data_parallel = bool(getattr(self, "use_data_parallel", False))
        if data_parallel:
            from vllm.distributed import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            assignment = data_parallel_images([t * h * w for t, h, w in grid_thw])
            grids = [grid_thw[i] for i in assignment[rank]]
        else:
            grids = grid_thw
        local = self._vlmprune_local_scores(capture, grids, merge, shards) if grids else []
        if not data_parallel:
            return local
        lengths = [t * h * w // (merge * merge) for t, h, w in grid_thw]
        device = next(self.visual.parameters()).device  # type: ignore[attr-defined]
        return gather_image_scores(local, lengths, assignment, rank, device)

    def _vlmprune_local_scores(self, capture: _KernelQKCapture, grid_thw: list[list[int]], merge: int,
                               shards: int) -> list[torch.Tensor]:
        """The scores of the images this rank's ViT ran (``grid_thw``, in its order)."""
        if len(capture.calls) != 1:
            raise RuntimeError(
                f"vlmprune: ViT block {self.vlmprune_score_block()} ran {len(capture.calls)} times for one "
                "image batch (a graph-captured encoder?); cannot score"
            )
        query, key = capture.calls[0]
        num_heads = int(query.shape[-2])  # this rank's
        q = query.reshape(-1, query.shape[-2] * query.shape[-1])  # (T, H*D)
        k = key.reshape(-1, key.shape[-2] * key.shape[-1])
        sizes = [t * h * w for t, h, w in grid_thw]
        if q.shape[0] != sum(sizes):
            raise RuntimeError(f"vlmprune: captured {q.shape[0]} ViT tokens for grids totalling {sum(sizes)}")
        bounds = torch.tensor([0, *np.cumsum(sizes).tolist()], device=q.device)
        with torch.no_grad():
            received = mean_over_shards(mean_attention_received(q, k, num_heads, cu_seqlens=bounds), shards)  # (T,)
            merged = pool_merge_groups(received, merge * merge)  # (sum N_i,) blocks' order
        per_image = merged.split([s // (merge * merge) for s in sizes])
        return [self._vlmprune_llm_order(m, t, h, w) for m, (t, h, w) in zip(per_image, grid_thw)]

    def _vlmprune_videos(self, video_input: Any) -> list[torch.Tensor]:
        """Unpruned video rows with their position channels (stock ids, stock temporal scaling)."""
        merge = int(self.visual.spatial_merge_size)  # type: ignore[attr-defined]
        features = self._process_video_input(video_input)  # type: ignore[attr-defined]
        grid_thw = [[int(x) for x in g] for g in video_input["video_grid_thw"].tolist()]
        seconds = video_input.get("second_per_grid_ts") if hasattr(video_input, "get") else None
        per_token = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))  # type: ignore[attr-defined]
        out = []
        for i, (feats, (t, h, w)) in enumerate(zip(features, grid_thw)):
            factor = (float(seconds[i].item()) if seconds is not None else 1.0) * per_token
            thw = torch.from_numpy(grid_positions(t, h // merge, w // merge, factor).T.copy()).to(feats.device)
            rows = torch.arange(feats.shape[0], device=feats.device)
            out.append(torch.cat([feats, encode_position_channels(thw, rows, feats.dtype)], dim=1))
        return out

    # -- positions ---------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = [
            (offset, int(feature.mm_position.length), t, h, w, t_factor)
            for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features))  # type: ignore[attr-defined]
        ]
        return mrope_input_positions(len(input_tokens), media)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """``SupportsMultiModalPruning``: strip the position channels, write the chunk's media ids."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=mrope_positions.device)
        stripped = [mm[:, :-POSITION_CHANNELS] for mm in multimodal_embeddings]
        channels = [mm[:, -POSITION_CHANNELS:] for mm in multimodal_embeddings]
        media_ids = (int(self.config.image_token_id), int(self.config.video_token_id))  # type: ignore[attr-defined]
        positions, delta = recompute_positions(ids, channels, mrope_positions, num_computed_tokens, media_ids)
        log = getattr(self, "_vlmprune_position_log", None)
        if log is not None:
            log[tuple(int(x) for x in ids.tolist())] = positions.cpu().clone()
        return stripped, positions, delta


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLMultiModalProcessor,
    info=_info_factory(PrunedQwen2VLProcessingInfo),
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class PrunedQwen2VL(QwenPruningMixin, Qwen2VLForConditionalGeneration, SupportsMultiModalPruning):
    """Qwen2-VL with pruning; adds ``SupportsMultiModalPruning``, which stock Qwen2-VL lacks."""

    vlmprune_family = "qwen2_vl"

    def vlmprune_score_block(self) -> int:
        return len(self.visual.blocks) - 1


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor,
    info=_info_factory(PrunedQwen2_5_VLProcessingInfo),
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PrunedQwen2_5_VL(QwenPruningMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with pruning; scores at the last full-attention block, out of window order."""

    vlmprune_family = "qwen2_5_vl"

    def vlmprune_score_block(self) -> int:
        full = [int(i) for i in self.visual.fullatt_block_indexes]
        if not full:
            raise RuntimeError("vlmprune: vision_config.fullatt_block_indexes is empty; no full-attention block to score")
        return max(full)

    def _vlmprune_llm_order(self, merged: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        window_index, _ = self.visual.get_window_index_thw(t, h, w)  # (N_i,) group at each window slot
        return merged[torch.argsort(window_index.to(merged.device))]


# --- Diagnostics ----------------------------------------------------------------------------------


def start_position_log(model: nn.Module) -> bool:
    """Record the final M-RoPE positions of every prompt the model recomputes (tests, debugging).

    Use in the worker: ``llm.apply_model(start_position_log)``, then ``llm.apply_model(position_log)``.
    """
    if not getattr(model, "vlmprune_mrope_pruning", False):
        return False
    model._vlmprune_position_log = {}  # type: ignore[attr-defined]
    return True


def position_log(model: nn.Module) -> dict[tuple[int, ...], list[list[int]]]:
    """Prompt ids -> (3, L) final positions recorded since :func:`start_position_log`."""
    log = getattr(model, "_vlmprune_position_log", None) or {}
    return {ids: positions.tolist() for ids, positions in log.items()}


__all__ = [
    "POSITION_CHANNELS",
    "PrunedQwen2VL",
    "PrunedQwen2_5_VL",
    "decode_position_channels",
    "encode_position_channels",
    "grid_positions",
    "mrope_input_positions",
    "position_log",
    "recompute_positions",
    "start_position_log",
]
