"""The server through the real `openai` client over HTTP, on the tiny model: plain, streaming, images,
n > 1, stop strings, auth, metrics."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from observe_r1.format import parse


def data_url(size=(64, 48), color=(200, 30, 30), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_message(url: str, text: str = "How many shapes?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs
    )


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def test_models_lists_the_served_model(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]


def test_a_chat_turn_with_an_image_returns_the_parsed_fields(server):
    r = client(server).chat.completions.create(
        model="tiny",
        messages=image_message(data_url()),
        max_tokens=24,
        seed=7,
        extra_body={"return_raw_text": True},
    )
    choice = r.choices[0]
    raw = extra(choice.message, "raw")
    parsed = parse(raw)
    assert choice.message.content == parsed.answer
    assert (
        extra(choice.message, "reasoning") == parsed.reasoning == extra(choice.message, "reasoning_content")
    )
    assert extra(choice.message, "observation") == parsed.observation
    assert extra(choice, "format_ok") is parsed.format_ok
    assert extra(choice, "format_errors") == list(parsed.errors)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 24
    assert r.usage.prompt_tokens > 64  # the image expands into its patch tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    details = r.usage.completion_tokens_details
    assert details.reasoning_tokens >= 0 and (details.model_extra or {}).get("observation_tokens") is not None


def test_the_same_seed_gives_the_same_answer_and_the_stream_matches_it(server):
    c = client(server)
    kwargs = dict(
        model="tiny",
        messages=image_message(data_url()),
        max_tokens=32,
        seed=11,
        extra_body={"return_raw_text": True},
    )
    whole = c.chat.completions.create(**kwargs)
    assert c.chat.completions.create(**kwargs).choices[0].message.content == whole.choices[0].message.content

    fields = {"content": "", "reasoning": "", "reasoning_content": "", "observation": "", "raw": ""}
    finish = None
    chunks = list(c.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            fields["content"] += delta.content or ""
            for name in ("reasoning", "reasoning_content", "observation", "raw"):
                fields[name] += extra(delta, name) or ""
            if choice.finish_reason:
                finish = choice
    message = whole.choices[0].message
    assert fields["raw"] == extra(message, "raw")
    assert fields["content"] == message.content
    assert fields["reasoning"] == fields["reasoning_content"] == extra(message, "reasoning")
    assert fields["observation"] == extra(message, "observation")
    assert finish.finish_reason == whole.choices[0].finish_reason
    assert extra(finish, "format_ok") is extra(whole.choices[0], "format_ok")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_are_independent_samples(server):
    r = client(server).chat.completions.create(
        model="tiny", messages=image_message(data_url()), n=3, max_tokens=16, seed=3, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert 3 <= r.usage.completion_tokens <= 48


def test_n_choices_stream_on_their_own_indices(server):
    stream = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=8, seed=1, stream=True
    )
    finished = [c.index for chunk in stream for c in chunk.choices if c.finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_strings_end_the_answer_before_them(server):
    c = client(server)
    kwargs = dict(
        model="tiny", messages=[{"role": "user", "content": "Count."}], max_tokens=40, temperature=0
    )
    raw = extra(
        c.chat.completions.create(**kwargs, extra_body={"return_raw_text": True}).choices[0].message, "raw"
    )
    stop = raw[len(raw) // 2 : len(raw) // 2 + 3]
    assert stop.strip(), raw
    r = c.chat.completions.create(**kwargs, stop=[stop], extra_body={"return_raw_text": True})
    assert extra(r.choices[0].message, "raw") == raw[: raw.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_completion_tokens_bounds_the_answer(server):
    r = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "go"}], max_completion_tokens=5, temperature=0
    )
    assert r.usage.completion_tokens <= 5


def test_local_image_paths_need_the_explicit_flag(server, start_server, tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (40, 40)).save(path)
    with pytest.raises(openai.BadRequestError, match="--allow-local-images"):
        client(server).chat.completions.create(model="tiny", messages=image_message(str(path)), max_tokens=2)
    allowed = start_server("--allow-local-images")
    r = client(allowed).chat.completions.create(
        model="tiny", messages=image_message(f"file://{path}"), max_tokens=2
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_required_when_configured(start_server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    for s in (
        start_server(env={"OBSERVE_R1_API_KEY": "s3cret"}),
        start_server("--api-key-file", str(key_file)),
    ):
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}]
            )
        assert httpx.post(f"{s.base_url}/v1/chat/completions", json={}).status_code == 401
        r = client(s, api_key="s3cret").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert r.choices
        assert httpx.get(f"{s.base_url}/health").status_code == 200


def test_metrics_count_requests_latency_tokens_and_format(server):
    client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "m"}], max_tokens=3
    )
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="other", messages=[{"role": "user", "content": "m"}])
    text = httpx.get(f"{server.base_url}/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['observe_r1_requests_total{status="200"}'] >= 1
    assert values['observe_r1_requests_total{status="404"}'] >= 1
    assert values["observe_r1_time_to_first_token_seconds_count"] >= 1
    assert values["observe_r1_e2e_request_latency_seconds_count"] >= 1
    assert values["observe_r1_prompt_tokens_total"] > 0 and values["observe_r1_completion_tokens_total"] > 0
    assert 0.0 <= values["observe_r1_format_followed_ratio"] <= 1.0
    assert values["observe_r1_choices_total"] >= values["observe_r1_format_followed_total"]
    assert "observe_r1_num_requests_waiting" in values and "observe_r1_num_requests_running" in values


THINK_CHUNKS = ["<thi", "nk> Two red, one", " blue: 3 </th", "ink>\n<ans", "wer>3</an", "swer>"]


def test_a_think_model_is_split_into_reasoning_and_answer_plain_and_streamed(tiny_model_dir):
    """`--format-variant think`: the think prompt goes to the model, and its `<think><answer>` text
    (scripted here, tags split across deltas) comes back as reasoning and answer, observation empty."""
    import threading
    import time

    import uvicorn
    from conftest import free_port

    from observe_r1.format import VARIANTS
    from observe_r1_serve.app import create_app
    from observe_r1_serve.config import ServerConfig
    from observe_r1_serve.engine import ChoiceDelta
    from observe_r1_serve.transformers_engine import TransformersEngine

    prompts = []

    class ScriptedThink(TransformersEngine):
        """The real engine's queue and prompt, then a fixed `think` answer in chunks."""

        def generate(self, request):
            prompts.append(request.prompt)
            return self._scripted(super().generate(request))

        async def _scripted(self, stream):
            try:
                async for _ in stream:
                    pass
            finally:
                await stream.aclose()
            for i, chunk in enumerate(THINK_CHUNKS, 1):
                yield ChoiceDelta(0, chunk, i, "stop" if i == len(THINK_CHUNKS) else None)

    config = ServerConfig(
        model=tiny_model_dir, served_model_name="tiny", port=free_port(), format_variant="think"
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, ScriptedThink), port=config.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    base_url = f"http://127.0.0.1:{config.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server never got ready"
            time.sleep(0.2)
        api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
        r = api.chat.completions.create(model="tiny", messages=image_message(data_url()), max_tokens=8)
        choice = r.choices[0]
        assert choice.message.content == "3"
        assert extra(choice.message, "reasoning") == "Two red, one blue: 3"
        assert not extra(choice.message, "observation")
        assert extra(choice, "format_ok") is True and extra(choice, "format_errors") == []
        assert (
            VARIANTS["think"].system_prompt in prompts[-1]
            and VARIANTS["observe"].system_prompt not in prompts[-1]
        )

        fields = {"content": [], "reasoning": [], "observation": []}
        stream = api.chat.completions.create(
            model="tiny", messages=image_message(data_url()), max_tokens=8, stream=True
        )
        for chunk in stream:
            for c in chunk.choices:
                fields["content"].append(c.delta.content or "")
                for name in ("reasoning", "observation"):
                    fields[name].append(extra(c.delta, name) or "")
        pieces = [p for values in fields.values() for p in values]
        assert not any("<" in p or ">" in p for p in pieces)  # never a partial tag
        assert "".join(fields["content"]) == "3"
        assert "".join(fields["reasoning"]) == "Two red, one blue: 3"
        assert "".join(fields["observation"]) == ""
    finally:
        server.should_exit = True
        thread.join(60)


def test_nested_observe_with_the_think_variant_is_refused_naming_both_flags(tiny_model_dir):
    from observe_r1.errors import InvalidValue
    from observe_r1_serve.config import ServerConfig

    with pytest.raises(InvalidValue, match="--nested-observe needs --format-variant='observe'.*not 'think'"):
        ServerConfig(model=tiny_model_dir, format_variant="think", nested_observe=True)
    with pytest.raises(InvalidValue, match="format_variant='plain': expected one of observe, think"):
        ServerConfig(model=tiny_model_dir, format_variant="plain")
