"""A training run's files: its work folder and recipe, resumable feature caches, the hub-layout save.

Shared by every testbed recipe (:mod:`vlmprune.testbed.train`, :mod:`vlmprune.testbed.train_next`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch


def prepare_run(out: Path, work: Path | None, cfg, threads: int) -> tuple[Path, Path]:
    """(out, work folder) of a training run; the work folder (default ``OUT.work``) is created and
    gets the recipe as ``config.json``."""
    torch.set_num_threads(threads)
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out, work


def resumable_cache(path: Path, seeds: list[int], step: int, encode, log=print, progress: bool = True,
                    save_every: int = 8) -> torch.Tensor:
    """``encode(batches)`` -> one (b, ...) tensor per batch of ``step`` seeds, concatenated and saved
    to ``path``; returned from there when complete. Finished batches go to ``PATH.part.pt`` every
    ``save_every`` batches, so an interrupted run resumes after the last of them."""
    from tqdm import tqdm

    if path.is_file():
        feats = torch.load(path, map_location="cpu")
        if feats.shape[0] == len(seeds):
            return feats
    part = path.with_suffix(".part.pt")
    chunks: list[torch.Tensor] = torch.load(part, weights_only=False) if part.is_file() else []
    done = sum(c.shape[0] for c in chunks)
    batches = [seeds[start : start + step] for start in range(done, len(seeds), step)]
    for feats in tqdm(encode(batches), total=len(batches), desc=f"cache {path.stem}", disable=not progress):
        chunks.append(feats)
        if len(chunks) % save_every == 0:
            torch.save(chunks, part)
    feats = torch.cat(chunks)
    torch.save(feats, path)
    part.unlink(missing_ok=True)
    log(f"cached {tuple(feats.shape)} features to {path}")
    return feats


def save_hub_layout(model, processor, out: Path) -> None:
    """Write ``model`` + ``processor`` so that transformers AND vLLM 0.32 load them.

    Uses :func:`vlmprune.testbed.vllm_layout.save_for_vllm` when present; otherwise transformers' save_pretrained
    followed by :func:`_rename_vision_keys` (transformers 5 writes ``vision_tower.embeddings...``,
    vLLM's LLaVA loader wants the hub's ``vision_tower.vision_model.embeddings...``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from vlmprune.testbed import vllm_layout  # written by another issue; preferred when present
    except ImportError:
        vllm_layout = None
    saver = getattr(vllm_layout, "save_for_vllm", None) if vllm_layout is not None else None
    if saver is not None:
        saver(model, processor, out)
        return
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _rename_vision_keys(out)


def _rename_vision_keys(out: Path) -> None:
    """Rewrite ``vision_tower.X`` keys (X not already ``vision_model.``) as ``vision_tower.vision_model.X``."""
    from safetensors.torch import load_file, save_file

    files = sorted(Path(out).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors files in {out}")
    renamed: dict[str, str] = {}
    for f in files:
        tensors = load_file(f)
        fixed = {}
        for k, v in tensors.items():
            new = k
            head, sep, rest = k.partition("vision_tower.")
            if sep and not rest.startswith("vision_model."):
                new = f"{head}vision_tower.vision_model.{rest}"
            fixed[new] = v.contiguous()
            if new != k:
                renamed[k] = new
        save_file(fixed, f, metadata={"format": "pt"})
    index = Path(out) / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
