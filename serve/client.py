"""`observe-r1 ask`: one question with an image to a running server, through the `openai` client, as a
user's program would; prints the observation, reasoning and answer fields."""

from __future__ import annotations

import argparse
import base64
import mimetypes
from pathlib import Path

from observe_r1.command import Command
from observe_r1.net import wait_ready


def image_data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--question", required=True)
    parser.add_argument("--image", type=Path, action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--wait-ready", type=float, default=0.0, help="seconds to wait for /ready first")


def run(args: argparse.Namespace) -> None:
    import openai

    if args.wait_ready:
        wait_ready(args.base_url, args.wait_ready)
    content = [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in args.image]
    content.append({"type": "text", "text": args.question})
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    response = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": content}],
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    choice = response.choices[0]
    extra = {**(choice.model_extra or {}), **(choice.message.model_extra or {})}
    print(f"{'observation':>14}: {extra.get('observation')!r}")
    print(f"{'reasoning':>14}: {extra.get('reasoning')!r}")
    print(f"{'content':>14}: {choice.message.content!r}")
    print(f"{'format_ok':>14}: {extra.get('format_ok')} {extra.get('format_errors') or ''}")
    print(f"{'finish_reason':>14}: {choice.finish_reason}")
    print(f"{'usage':>14}: {response.usage.model_dump(exclude_none=True)}")


ASK = Command(
    help="ask a running server one question with images (openai client)", add_arguments=add_arguments, run=run
)
