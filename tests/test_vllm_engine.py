"""Our server on the vLLM engine, for real: vLLM's CPU build (`.venv-vllm`, see the Makefile) serving a
tiny text-only Qwen2 over HTTP, and a tiny Qwen2.5-VL answering an image request (vLLM's Qwen2.5-VL
path needs torchvision: the test shim `vllm_helpers.image_only` stands in for it, loaded as a vLLM
plugin). Skipped where vLLM is not installed."""

import asyncio
import base64
import io
import os
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

pytest.importorskip("vllm")

from conftest import Server  # noqa: E402
from test_serve import client, data_url, extra, image_message  # noqa: E402
from test_serve_robustness import CHAT, wait_for_gauge  # noqa: E402
from vllm_helpers import image_only  # noqa: E402
from vllm_helpers.tiny_qwen2 import build_tiny_qwen2  # noqa: E402
from vllm_helpers.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl  # noqa: E402

from observe_r1.errors import UserError  # noqa: E402
from observe_r1.format import parse  # noqa: E402
from observe_r1_serve.config import ServerConfig  # noqa: E402
from observe_r1_serve.vllm_engine import engine_args  # noqa: E402


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "qwen2", seed=0)


@pytest.fixture(scope="module")
def vllm_server(tiny_qwen2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model = tiny_qwen2_dir
    args = ["--engine", "vllm", "--max-prompt-tokens", "1024", "--max-completion-tokens", "256"]
    args += ["--max-batch-size", "2", "--max-waiting", "1"]
    # The options the Helm chart drives, as the CPU build accepts them (it has no GPU memory to share).
    args += [
        "--max-model-len",
        "1536",
        "--max-num-seqs",
        "2",
        "--vllm-engine-args",
        '{"max_num_batched_tokens": 2048}',
    ]
    s = Server(model, *args, log_dir=root).wait_ready(timeout=300)
    yield s
    s.stop()


def ask(text="How many circles?"):
    return [{"role": "user", "content": text}]


def test_ready_reports_the_vllm_engine(vllm_server):
    assert httpx.get(f"{vllm_server.base_url}/ready").json()["engine"] == "vllm"


def test_answers_are_split_like_the_transformers_engine(vllm_server):
    r = client(vllm_server).chat.completions.create(
        model="tiny", messages=ask(), max_tokens=24, seed=5, extra_body={"return_raw_text": True}
    )
    message = r.choices[0].message
    parsed = parse(extra(message, "raw"))
    assert (message.content, extra(message, "reasoning"), extra(message, "observation")) == (
        parsed.answer,
        parsed.reasoning,
        parsed.observation,
    )
    assert extra(r.choices[0], "format_ok") is parsed.format_ok
    assert 1 <= r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 10


def test_seeded_stream_matches_the_whole_answer(vllm_server):
    c = client(vllm_server)
    kwargs = dict(
        model="tiny", messages=ask(), max_tokens=32, seed=9, n=2, extra_body={"return_raw_text": True}
    )
    whole = c.chat.completions.create(**kwargs)
    assert [ch.message.content for ch in c.chat.completions.create(**kwargs).choices] == [
        ch.message.content for ch in whole.choices
    ]
    raw = {0: "", 1: ""}
    content = {0: "", 1: ""}
    finished = []
    for chunk in c.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            raw[ch.index] += extra(ch.delta, "raw") or ""
            content[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.append(ch.index)
    assert sorted(finished) == [0, 1]
    for ch in whole.choices:
        assert raw[ch.index] == extra(ch.message, "raw")
        assert content[ch.index] == ch.message.content


def test_stop_strings_and_greedy_decoding(vllm_server):
    c = client(vllm_server)
    kwargs = dict(
        model="tiny",
        messages=ask("Count."),
        max_tokens=40,
        temperature=0,
        extra_body={"return_raw_text": True},
    )
    raw = extra(c.chat.completions.create(**kwargs).choices[0].message, "raw")
    assert raw == extra(c.chat.completions.create(**kwargs).choices[0].message, "raw")
    stop = raw[len(raw) // 2 : len(raw) // 2 + 3]
    r = c.chat.completions.create(**kwargs, stop=[stop])
    assert extra(r.choices[0].message, "raw") == raw[: raw.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_limits_and_errors_apply_before_vllm(vllm_server):
    with pytest.raises(openai.BadRequestError) as info:
        client(vllm_server).chat.completions.create(model="tiny", messages=ask("w " * 2000), max_tokens=4)
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client(vllm_server).chat.completions.create(model="tiny", messages=ask(), max_tokens=100_000)
    assert info.value.body["param"] == "max_tokens"


def test_images_are_refused_before_vllm_when_the_model_takes_none(vllm_server):
    with pytest.raises(openai.BadRequestError) as info:
        client(vllm_server).chat.completions.create(
            model="tiny", messages=image_message(data_url()), max_tokens=4
        )
    assert info.value.body["param"] == "messages[0].content[0]"
    assert "takes no image input" in info.value.body["message"]
    assert client(vllm_server).chat.completions.create(model="tiny", messages=ask(), max_tokens=2).choices


def test_a_full_queue_answers_429_and_disconnects_abort(vllm_server):
    async def burst():
        async with httpx.AsyncClient(base_url=vllm_server.base_url, timeout=120) as c:
            body = {"model": "tiny", "messages": ask(), "max_tokens": 200, "temperature": 0}
            return await asyncio.gather(*(c.post(CHAT, json=body) for _ in range(8)))

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert 200 in codes and 429 in codes, codes

    body = {"model": "tiny", "messages": ask(), "max_tokens": 256, "stream": True}
    with httpx.Client(base_url=vllm_server.base_url, timeout=60) as c, c.stream("POST", CHAT, json=body) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
    assert wait_for_gauge(vllm_server, "observe_r1_num_requests_running", 0) == 0
    assert wait_for_gauge(vllm_server, "observe_r1_num_requests_waiting", 0) == 0


@pytest.fixture(scope="module")
def vllm_qwen_like_server(tiny_qwen2_dir, tmp_path_factory):
    """The same tiny Qwen2 weights with Qwen2.5-VL's sampling defaults in their generation config."""
    from conftest import qwen_like_copy

    root = tmp_path_factory.mktemp("vllm-qwen-like")
    model = qwen_like_copy(tiny_qwen2_dir, root / "qwen2")
    args = ["--engine", "vllm", "--max-prompt-tokens", "1024", "--max-completion-tokens", "256"]
    s = Server(model, *args, log_dir=root).wait_ready(timeout=300)
    yield s
    s.stop()


def test_sampling_policy_on_the_vllm_engine(vllm_server, vllm_qwen_like_server):
    """As on the transformers engine (tests/test_sampling_policy.py): explicit settings answer alike on
    both checkpoints, and unset ones come from the checkpoint's generation config."""
    from test_sampling_policy import EXPLICIT, QWEN_LIKE, answers

    seeds = range(3)
    explicit = [answers(vllm_qwen_like_server, seed, **EXPLICIT) for seed in seeds]
    assert explicit == [answers(vllm_server, seed, **EXPLICIT) for seed in seeds]
    assert len(set(explicit)) > 1
    unset = [answers(vllm_qwen_like_server, seed) for seed in seeds]
    assert unset == [answers(vllm_server, seed, **QWEN_LIKE) for seed in seeds]
    assert "top_k=1 (checkpoint)" in vllm_qwen_like_server.log()


def test_engine_arguments_come_from_the_server_options(tmp_path):
    config = ServerConfig(model=tmp_path, max_prompt_tokens=100, max_completion_tokens=28, max_batch_size=5)
    args = engine_args(config, on_gpu=False)
    assert (args.max_model_len, args.max_num_seqs, args.tensor_parallel_size) == (128, 5, 1)
    config.tensor_parallel_size, config.gpu_memory_utilization = 2, 0.75
    config.max_model_len, config.max_num_seqs = 4096, 64
    config.vllm_engine_args = '{"max_num_batched_tokens": 8192, "enable_prefix_caching": false}'
    args = engine_args(config, on_gpu=True)
    assert (args.tensor_parallel_size, args.gpu_memory_utilization) == (2, 0.75)
    assert (args.max_model_len, args.max_num_seqs) == (4096, 64)
    assert (args.max_num_batched_tokens, args.enable_prefix_caching) == (8192, False)


@pytest.mark.parametrize(
    "extra, message",
    [
        ('{"max_num_seqs": 4}', "'max_num_seqs', which the server sets itself"),
        ('{"max_num_batched_token": 4}', "did you mean 'max_num_batched_tokens'?"),
        ("[1]", "must be a JSON object"),
    ],
)
def test_pass_through_engine_arguments_are_checked(tmp_path, extra, message):
    with pytest.raises(UserError, match=re.escape(message)):
        engine_args(ServerConfig(model=tmp_path, vllm_engine_args=extra), on_gpu=False)


@pytest.fixture(scope="module")
def qwen2_reference(tiny_qwen2_dir):
    from test_serve_params import Reference
    from transformers import AutoModelForCausalLM

    return Reference(tiny_qwen2_dir, model=AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir).eval())


def test_logprobs_are_the_models_raw_log_softmax_like_the_transformers_engine(vllm_server, qwen2_reference):
    from test_serve_params import check_entries

    kwargs = dict(model="tiny", messages=ask(), max_tokens=8, seed=3, temperature=1.4, top_p=0.9)
    kwargs |= dict(logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    r = client(vllm_server).chat.completions.create(**kwargs)
    prompt = qwen2_reference.chat_prompt(ask())
    assert r.usage.prompt_tokens == len(prompt)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 8
    check_entries(entries, prompt, qwen2_reference, k=3)
    chunks = list(client(vllm_server).chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.bytes for e in streamed] == [e.bytes for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)


def test_penalties_bias_and_refusals_match_the_transformers_engine(vllm_server, qwen2_reference):
    from test_serve_params import REFUSED, refusal

    def greedy(**kwargs) -> list[bytes]:
        extra_body = {"ignore_eos": True} | kwargs.pop("extra_body", {})
        r = client(vllm_server).chat.completions.create(
            model="tiny",
            messages=ask(),
            max_tokens=12,
            temperature=0,
            logprobs=True,
            extra_body=extra_body,
            **kwargs,
        )
        return [bytes(e.bytes) for e in r.choices[0].logprobs.content]

    spelled = qwen2_reference.token_bytes(100)
    assert greedy(logit_bias={"100": 100}) == [spelled] * 12
    # A bias of 3 less the penalties (2 + 2 x count) is negative after the token's first use.
    biased = greedy(logit_bias={"100": 3}).count(spelled)
    penalised = greedy(logit_bias={"100": 3}, presence_penalty=2.0, frequency_penalty=2.0).count(spelled)
    assert penalised < biased and penalised <= 1
    plain = greedy()
    assert greedy(presence_penalty=-2.0).count(plain[0]) >= plain.count(plain[0])
    for param, value in REFUSED.items():
        err = refusal(
            lambda p=param, v=value: client(vllm_server).chat.completions.create(
                model="tiny", messages=ask(), extra_body={p: v}
            )
        )
        assert err.param == param

    prompt = qwen2_reference.tokenizer("one two three", add_special_tokens=False)["input_ids"]
    scored = client(vllm_server).completions.create(
        model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1
    )
    table = qwen2_reference.log_softmax(prompt)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and scored.usage.completion_tokens == 0
    expected = [table[t - 1, prompt[t]].item() for t in range(1, len(prompt))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=2e-3)


def test_image_request_matches_the_transformers_engine(tmp_path):
    """One image request, over HTTP, to our server on each engine serving the tiny Qwen2.5-VL: the vLLM
    engine (vLLM's own processor expanding the placeholder, through the test shim, loaded as a vLLM
    plugin in the server's processes) counts the prompt's tokens as the transformers engine does and
    answers greedily with the same raw text."""
    folder = build_tiny_qwen2_5_vl(tmp_path / "vl", seed=0)
    tests = Path(__file__).parent
    env = {"PYTHONPATH": os.pathsep.join([str(image_only.plugin_path(tmp_path / "plugin")), str(tests)])}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    noise = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    url = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    servers = {}
    try:
        for engine in ("vllm", "transformers"):  # both start at once
            args = ["--engine", engine, "--dtype", "fp32", "--max-prompt-tokens", "512"]
            args += ["--max-completion-tokens", "64", "--max-batch-size", "2"]
            servers[engine] = Server(folder, *args, env=env, log_dir=tmp_path)
        answers = {
            engine: client(server.wait_ready(timeout=300)).chat.completions.create(
                model="tiny",
                messages=image_message(url),
                max_tokens=12,
                temperature=0,
                extra_body={"return_raw_text": True},
            )
            for engine, server in servers.items()
        }
    finally:
        for server in servers.values():
            server.stop()
    got, expected = answers["vllm"], answers["transformers"]
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens
    assert got.usage.completion_tokens == expected.usage.completion_tokens > 0
    assert extra(got.choices[0].message, "raw") == extra(expected.choices[0].message, "raw")
