"""The ``vlmprune`` command line: methods, FLOPs tables, policies, the gateway (serve), the demo,
training (testbed models, explain relevance CNNs), evaluation, visualisation of kept tokens and a
test scene to send (``scene``).

Imports are lazy (inside each subcommand), so ``vlmprune methods`` starts fast and never imports
vLLM, transformers or torch. User errors print ``vlmprune: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence

MODEL_CHOICES = ("llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b", "qwen2.5-vl-7b")
FAMILY_CHOICES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
DEFAULT_QUESTION = "what colour is the circle ?"  # vlmprune.visualize.DEFAULT_QUESTION (imported lazily)


class UserError(Exception):
    """Bad input from the user: reported on one line, exit status 2."""


def _cmd_methods(args: argparse.Namespace) -> int:
    from vlmprune.methods import describe_methods

    methods = describe_methods()
    if args.json:
        print(json.dumps(methods, indent=2, default=str))
        return 0
    rows = [("method", "stage", "models", "summary")]
    rows += [(m["name"], m["stage"], ",".join(m["models"]), m["summary"]) for m in methods]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    return 0


def _parse_ratios(text: str) -> list[float]:
    ratios = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--ratios: {part!r} is not a number (expected e.g. 0,0.75,0.9)") from None
        if not 0.0 <= value < 1.0:
            raise UserError(f"--ratios: ratio must be in [0, 1), got {value}")
        ratios.append(value)
    if not ratios:
        raise UserError("--ratios: give at least one ratio")
    return ratios


def _cmd_flops(args: argparse.Namespace) -> int:
    from vlmprune import flops

    ratios = _parse_ratios(args.ratios)
    if args.text_tokens < 0:
        raise UserError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    models = [args.model] if args.model else ["llava-1.5-7b", "llava-next-7b"]
    rows = flops.flops_rows(models, ratios, args.text_tokens)
    papers = [p for p in flops.paper_rows() if p["model"] in models]
    if args.json:
        print(json.dumps({"rows": rows, "papers": papers}, indent=2))
        return 0
    grid = flops.convention_grid() if args.conventions else None
    print(flops.render_markdown(rows, papers, grid))
    return 0


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _cmd_policy(args: argparse.Namespace) -> int:
    from vlmprune.policy import PolicyError, parse_policy

    data: dict = {}
    if args.json_policy:
        try:
            loaded = json.loads(args.json_policy)
        except json.JSONDecodeError as exc:
            raise UserError(f"--json: not valid JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(loaded, dict):
            raise UserError("--json: the policy must be a JSON object")
        data.update(loaded)
    if args.method is not None:
        data["method"] = args.method
    if args.ratio is not None:
        data["ratio"] = args.ratio  # a string: the policy model validates and names the field
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
        data[key.strip()] = _parse_value(value)
    try:
        policy = parse_policy(data)
        if args.model:
            from vlmprune.methods import require_support

            require_support(policy.method, args.model)
    except PolicyError as exc:
        raise UserError(str(exc)) from None
    print(policy.model_dump_json(indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """The real thing: vLLM with the plugin (or ``--upstream`` servers) behind the gateway."""
    missing = [m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"the gateway needs {', '.join(missing)}; install the extras: pip install 'vlmprune[server]'"
        )
    from server.launcher import main as launch

    return int(launch(list(args.rest)) or 0)


def _cmd_demo(args: argparse.Namespace) -> int:
    """The reference-backend demo that ``serve`` ran before the gateway existed."""
    if importlib.util.find_spec("vlmprune.serve_demo") is None:
        raise UserError("the demo is not available in this installation (no module vlmprune.serve_demo)")
    module = importlib.import_module("vlmprune.serve_demo")
    sys.argv = ["vlmprune demo", *args.rest]
    result = module.main()
    return int(result or 0)


_EXPLAIN_ONLY_FLAGS = (("--model", "explain_model"), ("--samples", "samples"), ("--epochs", "epochs"),
                       ("--batch-size", "batch_size"), ("--keep-wrong", "keep_wrong"),
                       ("--no-progress", "no_progress"), ("--cnn", "cnn"), ("--cnn-channels", "cnn_channels"),
                       ("--loss", "loss"))


def _cmd_train(args: argparse.Namespace) -> int:
    """Train a testbed model (vlmprune.testbed.train_cli) or a model's explain relevance CNN
    (vlmprune.testbed.train_explain), chosen by the positional argument; argument checks live there."""
    try:
        if args.model != "demo-next":  # demo runs on the CPU; explain picks the GPU itself
            for flag, given in (("--base", args.base is not None), ("--workers", args.workers is not None),
                                ("--device", args.device != "cpu")):
                if given:
                    raise ValueError(f"{flag} applies to `vlmprune train demo-next` only")
        if args.model == "explain":
            from vlmprune.testbed.train_explain import run_cli
        else:
            # `train demo[-next]` rejects the explain-only flags instead of silently ignoring them.
            for flag, dest in _EXPLAIN_ONLY_FLAGS:
                if getattr(args, dest) not in (None, False):
                    raise ValueError(f"{flag} applies to `vlmprune train explain` only")
            from vlmprune.testbed.train_cli import run_cli
        return run_cli(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy of a testbed model under a policy (vlmprune.evaluate); argument checks live there."""
    from vlmprune.evaluate import run_cli

    try:
        return run_cli(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _cmd_scene(args: argparse.Namespace) -> int:
    """A test scene of a testbed model as a PNG, with its question and answer (vlmprune.testbed.example)."""
    from pathlib import Path

    from vlmprune.testbed.example import write_scene
    from vlmprune.testbed.registry import resolve_model

    try:
        sample = write_scene(resolve_model(args.model), Path(args.out), args.index)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {args.out}: test scene {sample.index} of {args.model}")
    print(f"question: {sample.question}")
    print(f"answer:   {sample.answer}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    """The kept visual tokens of one image drawn on it (vlmprune.visualize); argument checks live there."""
    from vlmprune.visualize import run_cli

    try:
        return run_cli(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmprune", description="Per-request visual-token pruning and merging for VLMs served by vLLM."
    )
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("methods", help="list the compression methods")
    p.add_argument("--json", action="store_true", help="print a JSON list (name, stage, models, options, ...)")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("flops", help="analytic prefill TFLOPs table, beside the papers' figures")
    p.add_argument("--model", choices=MODEL_CHOICES, help="one model (default: LLaVA-1.5-7B and LLaVA-NeXT-7B)")
    p.add_argument("--ratios", default="0,0.75,0.9,0.95", help="comma-separated ratios (default: %(default)s)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens in the prompt (default: %(default)s)")
    p.add_argument("--conventions", action="store_true", help="also print the baseline under every convention")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("policy", help="validate a policy and print it resolved (defaults filled in)")
    p.add_argument("--method", help="method name (see `vlmprune methods`)")
    p.add_argument("--ratio", help="fraction of visual tokens removed, in [0, 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--json", dest="json_policy", metavar="JSON", help="a whole policy as a JSON object")
    p.add_argument("--model", choices=FAMILY_CHOICES, help="also check that the method applies to this family")
    p.set_defaults(func=_cmd_policy)

    p = sub.add_parser("serve", help="start vLLM with the plugin and the OpenAI gateway (server.launcher)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of `vlmprune serve --help`")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="one request through the transformers reference backend (no vLLM)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the demo")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "train",
        help="train a testbed model (`vlmprune train demo`) or a model's explain relevance CNN "
        "(`vlmprune train explain --model MODEL`); seeded, resumable",
    )
    p.add_argument("model", choices=("demo", "demo-next", "explain"),
                   help="demo / demo-next: the testbed models (demo-next starts from a trained demo, --base); "
                   "explain: the relevance CNN of the model given by --model")
    p.add_argument("--out", help="demo: output model folder (default: runs/demo; work files go to OUT.work); "
                   "explain: checkpoint file (default: MODEL/vlmprune_explain_cnn.pt, where the explain method "
                   "finds it)")
    p.add_argument("--work", help="demo: folder for checkpoints and feature caches (default: OUT.work)")
    p.add_argument("--steps", type=int, help="demo: LM training steps (default: the recipe's)")
    p.add_argument("--vit-steps", type=int, help="demo: ViT pretraining steps (default: the recipe's)")
    p.add_argument("--base", help="demo-next: the trained demo model it starts from (default: demo, the shipped one)")
    p.add_argument("--device", default="cpu", help="demo-next: torch device of the training, cpu or cuda "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, help="demo-next: processes rendering scenes for the feature cache "
                   "(default: 1)")
    p.add_argument("--model", dest="explain_model", metavar="MODEL",
                   help="explain: the VLM, a shipped name (demo) or a model folder")
    p.add_argument("--samples", type=int, help="explain: train samples to label (default: 2000)")
    p.add_argument("--epochs", type=int, help="explain: CNN training epochs (default: 50)")
    p.add_argument("--batch-size", type=int, help="explain: CNN batch size (default: 128)")
    p.add_argument("--keep-wrong", action="store_true",
                   help="explain: also train on wrongly answered samples (tests and smoke runs only)")
    p.add_argument("--no-progress", action="store_true", help="explain: no progress bars on stderr")
    p.add_argument("--cnn", choices=("sequence", "grid"),
                   help="explain: 1-D convolutions over the token sequence (the paper's, any model; default) or "
                   "2-D over the image's patch grid (LLaVA-1.5-style models)")
    p.add_argument("--cnn-channels", help="explain: comma-separated channels of the CNN's blocks "
                   "(default: 32,64,128,256,512, the paper's)")
    p.add_argument("--loss", choices=("kl", "ranks", "pairwise"),
                   help="explain: training loss: kl (the paper's KL to the top-50 %% teacher mass; default), ranks "
                   "(KL to a rank staircase over keep fractions 50/25/10/5 %%) or pairwise (logistic ranking loss)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="accuracy of a testbed model under a policy (last stdout line: JSON)")
    p.add_argument("--model", default="demo", help="demo, demo-next or a model folder (default: %(default)s)")
    p.add_argument("--backend", default="hf", help="hf (transformers reference backend) or vllm (default: %(default)s)")
    p.add_argument("--method", default="fastervlm", help="method name (see `vlmprune methods`; default: %(default)s)")
    p.add_argument("--ratio", default="0", help="fraction of visual tokens removed, in [0, 1) (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--samples", type=int, default=300, help="test samples, indices 0..N-1 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of seeded methods (default: %(default)s)")
    p.add_argument("--split", default="test", help="test, val or heldout (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per prefill batch (default: %(default)s)")
    p.add_argument("--device", help="hf backend: torch device (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("visualize", help="draw which visual tokens a policy keeps on an image (PNG; stdout: JSON)")
    p.add_argument("image", metavar="IMAGE", help="the image file (any format Pillow reads)")
    p.add_argument("--method", default="fastervlm", help="method name (see `vlmprune methods`; default: %(default)s)")
    p.add_argument("--ratio", default="0.75",
                   help="fraction of visual tokens removed, in [0, 1) (default: %(default)s)")
    p.add_argument("--question", default=DEFAULT_QUESTION,
                   help="the question asked with the image (instruction-aware methods score by it; "
                   "default: %(default)r)")
    p.add_argument("--model", default="demo", help="demo, demo-next or a model folder (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("-o", "--out", required=True, help="output PNG file")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("scene", help="write a test scene of a testbed model (PNG) and print its question and answer")
    p.add_argument("--out", default="scene.png", help="output image file (default: %(default)s)")
    p.add_argument("--model", default="demo", help="demo, demo-next or a model folder (default: %(default)s)")
    p.add_argument("--index", type=int, help="test sample N with its own question (default: the first test scene "
                   "asking 'what colour is the circle ?')")
    p.set_defaults(func=_cmd_scene)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # argparse itself exits 2 on bad usage
    if args.command in ("serve", "demo"):
        args.rest = [*unknown, *args.rest]  # everything after the subcommand belongs to it
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"vlmprune: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `vlmprune flops | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
