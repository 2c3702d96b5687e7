"""Names of the shipped testbed models -> their folders (hub layout, loadable by transformers and vLLM).

``resolve_model("demo")`` is the LLaVA-1.5-style model shipped in ``vlmprune/testbed/models/demo``;
``"demo-next"`` the LLaVA-NeXT-style (AnyRes) one in ``models/demo-next``; anything else is taken
as a path to a model folder. :func:`scene_layout` says how a model sees the testbed's scenes.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
SHIPPED: dict[str, str] = {
    "demo": "LLaVA-1.5 style: CLIP ViT 224 px / patch 14 (256 visual tokens) + MLP projector + Llama",
    "demo-next": "LLaVA-NeXT style: demo's ViT on a 224 px thumbnail + 2x2 crops of a 448 px canvas (1312 tokens)",
}


def resolve_model(name: str | Path) -> Path:
    """The model folder for a shipped name (``demo``, ``demo-next``) or a path; ValueError if absent."""
    text = str(name)
    if text in SHIPPED:
        path = MODELS_DIR / text
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model {text!r} is not shipped in this installation (no {path / 'config.json'}); "
                f"train it with `vlmprune train {text} --out DIR` and pass --model DIR"
            )
        return path
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ValueError(f"model must be one of {', '.join(SHIPPED)} or a model folder; {text!r} is neither")
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {str(path)!r} has no config.json")
    return path


def scene_layout(config) -> tuple[int, float]:
    """(canvas px, object scale) of the testbed scenes for a model with this transformers config
    (see :func:`vlmprune.testbed.scenes.render_layout`): ``demo`` -> (224, 1.0), ``demo-next`` ->
    (448, 0.5)."""
    from vlmprune.testbed.scenes import render_layout

    return render_layout(int(config.vision_config.image_size), getattr(config, "image_grid_pinpoints", None))
