"""The vLLM reasoning-parser plugin (`serve/reasoning_parser.py`) inside a real vLLM.

These tests need vLLM, which lives in its own environment (`.venv-vllm`, the CPU build); elsewhere
the module is skipped. Run: `.venv-vllm/bin/python -m pytest tests/test_vllm_reasoning_parser.py`.

The parser is driven through vLLM's own `Parser` (the object its chat-completions server holds per
choice), so the streaming tests exercise vLLM's calling sequence, including the end-of-stream flush.
The end-to-end test serves a tiny random text-only Qwen2 on CPU; its output is random, so the tests
check that the fields agree with `observe_r1.format.parse` of the raw text, not particular words.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from itertools import pairwise
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.parser.parser_manager import ParserManager  # noqa: E402
from vllm.reasoning import ReasoningParser, ReasoningParserManager  # noqa: E402
from vllm.tokenizers import get_tokenizer  # noqa: E402
from vllm_helpers.tiny_qwen2 import build_tiny_qwen2  # noqa: E402

from observe_r1.format import ALL_TAGS, format_response, parse  # noqa: E402

PLUGIN = Path(__file__).resolve().parents[1] / "serve" / "reasoning_parser.py"
PARSER_NAME = "observe_r1"
SERVER_START_TIMEOUT_S = 300
# Settings that make vLLM's CPU engine start in seconds and stay small: no torch.compile, 1 GiB of
# KV cache, the engine worker inside the engine-core process, no thread pinning.
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}
WELL_FORMED_REGEX = (
    r"<observe>[a-z ]{1,20}</observe>\n<think>[a-z ]{1,20}</think>\n<answer>[0-9]{1,3}</answer>"
)
# Answer text outside the blocks and no answer block: format.py sends the loose text to the answer.
MALFORMED_REGEX = r"[a-z]{1,8} <think>[a-z ]{1,20}</think>"


def expected_split(text: str) -> tuple[str | None, str | None]:
    """What the plugin must return for `text` whose observe text all comes before its think text."""
    result = parse(text)
    reasoning = "\n\n".join(part for part in (result.observation, result.reasoning) if part)
    return reasoning or None, result.answer or None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("vllm_models") / "tiny_qwen2", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return get_tokenizer(str(model_dir))


@pytest.fixture(scope="module")
def parser_cls():
    """vLLM's per-request parser class with our plugin as the reasoning parser, loaded by path."""
    ReasoningParserManager.import_reasoning_parser(str(PLUGIN))
    return ParserManager.get_parser(reasoning_parser_name=PARSER_NAME)


@pytest.fixture(scope="module")
def chat_request():
    return ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "How many circles?"}])


@pytest.fixture(scope="module")
def prompt_ids(tokenizer, chat_request) -> list[int]:
    prompt = tokenizer.apply_chat_template(chat_request.messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def test_plugin_registers_by_path(parser_cls):
    registered = ReasoningParserManager.get_reasoning_parser(PARSER_NAME)
    assert issubclass(registered, ReasoningParser)
    assert registered.__module__ == "reasoning_parser", "vLLM loads the plugin by file path"


@pytest.mark.parametrize(
    ("observation", "reasoning", "answer"),
    [("I see 3 red circles.", "3 circles so 3.", "3"), ("two bars", "the left bar is taller", "A")],
)
def test_well_formed_split(parser_cls, tokenizer, chat_request, observation, reasoning, answer):
    text = format_response(f" {observation} ", f"\n{reasoning}\n", answer)
    got_reasoning, got_content, tool_calls = parser_cls(tokenizer).parse(text, chat_request)
    assert (got_reasoning, got_content) == (f"{observation}\n\n{reasoning}", answer)
    assert not tool_calls


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("The answer is 4.", None, "The answer is 4."),
        ("<think>2 plus 2</think> 4", "2 plus 2", "4"),
        ("<observe>two dots</observe><think>so 2", "two dots\n\nso 2", None),
        ("<observe>x</observe><think>y</think>", "x\n\ny", None),
        ("<observe></observe><think>y</think><answer>5</answer>", "y", "5"),
        ("<think>a<observe>b</observe>c</think><answer>d</answer>", "a\n\nb\n\nc", "d"),
        ("<answer>1</answer><think>late</think><answer>2</answer>", "late", "1\n2"),
        ("<think>a < b and <thin</think><answer>yes</answer>", "a < b and <thin", "yes"),
        ("", None, None),
    ],
)
def test_malformed_split(parser_cls, tokenizer, chat_request, text, reasoning, content):
    got_reasoning, got_content, _ = parser_cls(tokenizer).parse(text, chat_request)
    assert (got_reasoning, got_content) == (reasoning, content)
    assert got_content == (parse(text).answer or None), "the answer is always format.parse's"


def random_response(rng: random.Random) -> str:
    """Text made of tags, words and would-be tags, in any order (well-formed or not), ending in a word."""
    words = ["three", "red", "circles", "so", "42", "a<b", "<thi nk", "</answ er", "<<", "\n", "  "]
    if rng.random() < 0.3:
        return format_response(*(" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(3)))
    pieces = rng.choices([*ALL_TAGS, *words, *words], k=rng.randint(1, 25))
    return "".join(pieces) + rng.choice(["end", " 7", "ok."])


def stream(parser, tokenizer, chat_request, prompt_ids, text: str, rng: random.Random) -> tuple[str, str]:
    """Feed `text` to `parser` as vLLM does, decoded incrementally: one token per delta for half the
    seeds, a random number of tokens per delta for the others."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n_cuts = len(ids) - 1 if rng.random() < 0.5 else rng.randint(0, max(len(ids) - 1, 0))
    cuts = sorted(rng.sample(range(1, len(ids)), k=n_cuts))
    bounds = [0, *cuts, len(ids)]
    reasoning, content, decoded = [], [], ""
    for i, (start, end) in enumerate(pairwise(bounds)):
        current = tokenizer.decode(ids[:end])
        delta = parser.parse_delta(
            current[len(decoded) :],
            ids[start:end],
            chat_request,
            prompt_token_ids=prompt_ids,
            finished=i == len(bounds) - 2,
        )
        decoded = current
        if delta is not None:
            reasoning.append(delta.reasoning or "")
            content.append(delta.content or "")
    assert decoded == text
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("seed", range(300))
def test_streaming_matches_non_streaming(parser_cls, tokenizer, chat_request, prompt_ids, seed):
    rng = random.Random(seed)
    text = random_response(rng)
    reasoning, content, _ = parser_cls(tokenizer).parse(text, chat_request)
    streamed = stream(parser_cls(tokenizer), tokenizer, chat_request, prompt_ids, text, rng)
    assert streamed == (reasoning or "", content or "")


def test_stream_cut_inside_a_tag_in_think_drops_the_partial_tag(
    parser_cls, tokenizer, chat_request, prompt_ids
):
    """The documented limit: vLLM's end-of-stream flush can only add content."""
    text = "<observe>a</observe><think>b <thi"
    assert parser_cls(tokenizer).parse(text, chat_request)[:2] == ("a\n\nb <thi", None)
    streamed = stream(parser_cls(tokenizer), tokenizer, chat_request, prompt_ids, text, random.Random(0))
    assert streamed == ("a\n\nb", "")


def test_stream_cut_inside_a_tag_in_the_answer_keeps_it(parser_cls, tokenizer, chat_request, prompt_ids):
    text = "<think>b</think><answer>4 </an"
    streamed = stream(parser_cls(tokenizer), tokenizer, chat_request, prompt_ids, text, random.Random(0))
    assert streamed == ("b", "4 </an") == parser_cls(tokenizer).parse(text, chat_request)[:2]


def test_reasoning_never_ends_early(parser_cls, tokenizer, prompt_ids):
    """vLLM stops consulting the parser once reasoning ends; ours must see the whole output."""
    parser = parser_cls(tokenizer)
    ids = tokenizer.encode(format_response("x", "y", "1") + "<think>more</think>", add_special_tokens=False)
    assert not parser.is_reasoning_end(prompt_ids)
    assert not parser.is_reasoning_end(ids)


def test_token_accounting(parser_cls, tokenizer):
    parser = parser_cls(tokenizer)
    text = format_response("I see 3 red circles", "3 circles so the total is 3", "42")
    ids = tokenizer.encode(text, add_special_tokens=False)
    reasoning_tokens = parser.count_reasoning_tokens(ids)
    content_ids = parser.reasoning_parser.extract_content_ids(ids)
    assert 0 < reasoning_tokens < len(ids) - len(content_ids)
    assert tokenizer.decode(content_ids) == "42"
    assert parser.count_reasoning_tokens(tokenizer.encode("just an answer", add_special_tokens=False)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"vLLM not healthy after {SERVER_START_TIMEOUT_S}s:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`vllm serve` with the plugin on loopback.

    Started as `python -m vllm.entrypoints.launchers.api_server.entry`, the server `vllm serve` runs
    in-process (same arguments, with `--model` for the positional model): the CPU build's `vllm`
    script looks up the version of a distribution named `vllm` and fails, as it is `vllm-cpu`.
    `enable_in_reasoning` lets a regex shape the random model's output, since the parser never
    declares the reasoning over (see its docstring).
    """
    from openai import OpenAI

    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(model_dir), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "4", "--seed", "0",
        "--reasoning-parser-plugin", str(PLUGIN), "--reasoning-parser", PARSER_NAME,
        "--structured-outputs-config", json.dumps({"enable_in_reasoning": True}),
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **VLLM_CPU_ENV},
            cwd=log.parent,
            start_new_session=True,
        )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log)
        yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chat(client, stream: bool, **extra):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "How many circles?"}],
        n=2,
        max_tokens=120,
        seed=1,
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        extra_body=extra,
    )


@pytest.mark.parametrize(
    "regex", [WELL_FORMED_REGEX, MALFORMED_REGEX, None], ids=["well-formed", "malformed", "free"]
)
def test_server_splits_like_format_parse(server, tokenizer, regex):
    shape = {"structured_outputs": {"regex": regex}} if regex else {}
    response = chat(server, stream=False, return_token_ids=True, **shape)
    for choice in response.choices:
        raw = tokenizer.decode(choice.token_ids, skip_special_tokens=True)
        assert (choice.message.reasoning, choice.message.content) == expected_split(raw), raw
        if regex == WELL_FORMED_REGEX:
            assert choice.finish_reason == "stop" and parse(raw).format_ok, raw
    reasoning_tokens = response.usage.completion_tokens_details.reasoning_tokens
    assert (reasoning_tokens > 0) == any(choice.message.reasoning for choice in response.choices)

    fields: dict[int, list[str]] = {choice.index: ["", ""] for choice in response.choices}
    usage = None
    for chunk in chat(server, stream=True, **shape):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            fields[choice.index][0] += getattr(choice.delta, "reasoning", None) or ""
            fields[choice.index][1] += choice.delta.content or ""
    for choice in response.choices:
        assert fields[choice.index] == [choice.message.reasoning or "", choice.message.content or ""]
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
