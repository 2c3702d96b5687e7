"""Ask the vlmprune gateway about an image with the official OpenAI SDK (``pip install openai``).

    vlmprune scene --out scene.png        # a test scene of the demo model, its question and answer
    python deploy/client.py scene.png "What color is the circle?" --method fastervlm --ratio 0.9

Prints the answer and the policy the gateway applied (its ``X-VLMPrune-Applied`` header). The image
travels inline as a data URL; ``--policy``, ``--method`` and ``--ratio`` become the
``X-VLMPrune-*`` headers (``deploy/README.md``). Exit status 1 with the gateway's message on an error.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
from pathlib import Path


def image_data_url(path: Path) -> str:
    """The file as a ``data:`` URL (the gateway accepts inline images; remote ones are off by default)."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def policy_headers(args: argparse.Namespace) -> dict[str, str]:
    names = {"policy": "X-VLMPrune-Policy", "method": "X-VLMPrune-Method", "ratio": "X-VLMPrune-Ratio"}
    return {header: str(getattr(args, field)) for field, header in names.items() if getattr(args, field) is not None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ask the vlmprune gateway about an image (OpenAI SDK).")
    p.add_argument("image", type=Path, help="image file (PNG, JPEG, ...)")
    p.add_argument("question", help="the question, e.g. 'What color is the circle?'")
    p.add_argument("--base-url", default=os.environ.get("VLMPRUNE_BASE_URL", "http://localhost:8000/v1"),
                   help="the gateway's OpenAI API (default: $VLMPRUNE_BASE_URL or %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("VLMPRUNE_API_KEY", "unused"),
                   help="API key, when the gateway has VLMPRUNE_API_KEYS (default: $VLMPRUNE_API_KEY)")
    p.add_argument("--model", help="served model (default: the first one /v1/models lists)")
    p.add_argument("--policy", help="named policy: quality, balanced or fast")
    p.add_argument("--method", help="compression method, e.g. fastervlm (see `vlmprune methods`)")
    p.add_argument("--ratio", type=float, help="fraction of visual tokens removed, in [0, 1)")
    p.add_argument("--max-tokens", type=int, default=8, help="answer length limit (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import openai

    args = parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    try:
        model = args.model or client.models.list().data[0].id
        raw = client.chat.completions.with_raw_response.create(
            model=model, max_tokens=args.max_tokens, temperature=0.0, extra_headers=policy_headers(args),
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(args.image)}},
                {"type": "text", "text": args.question},
            ]}],
        )
    except openai.APIStatusError as exc:
        print(f"error {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1
    except (openai.APIConnectionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"answer:  {raw.parse().choices[0].message.content.strip()}")
    print(f"applied: {raw.headers.get('x-vlmprune-applied')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
