"""Bad input, load, the full queue, disconnects, SIGTERM and start-up failures against the real server."""

import asyncio
import base64
import json
import signal
import time

import httpx
import pytest
from test_serve import data_url, image_message

CHAT = "/v1/chat/completions"


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{CHAT}", json=body, timeout=60, **kwargs)


def ask(content, **kwargs) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kwargs}


def gauge(server, name: str) -> float:
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


def wait_for_gauge(server, name: str, value: float, timeout: float = 30) -> float:
    """Poll a gauge until it reaches `value` (bounded): slots are freed asynchronously."""
    deadline = time.monotonic() + timeout
    while (current := gauge(server, name)) != value and time.monotonic() < deadline:
        time.sleep(0.2)
    return current


BAD_REQUESTS = [
    (ask("x", model="nope"), 404, "model"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    (ask("x", n="two"), 400, "n"),
    (ask("x", temperature=5), 400, "temperature"),
    (ask("x", top_p=0), 400, "top_p"),
    (ask("x", max_tokens=10**6), 400, "max_tokens"),
    (ask("x", max_completion_tokens=0), 400, "max_completion_tokens"),
    (ask("x", n=50), 400, "n"),
    (ask("x", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (ask("x", stop=[""]), 400, "stop[0]"),
    (ask("x", stream="yes"), 400, "stream"),
    (ask([{"type": "video", "video": "v.mp4"}]), 400, "messages[0].content[0]"),
    (ask([{"type": "text"}]), 400, "messages[0].content[0].text"),
    (
        {"model": "tiny", "messages": image_message("data:image/png;base64,@@@@")},
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        {"model": "tiny", "messages": image_message("data:image/png,rawbytes")},
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        {
            "model": "tiny",
            "messages": image_message("data:image/png;base64," + base64.b64encode(b"not an image").decode()),
        },
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        {"model": "tiny", "messages": image_message("ftp://host/x.png")},
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        {"model": "tiny", "messages": image_message(data_url((3000, 3000)))},
        400,
        "messages[0].content[0].image_url.url",
    ),
    (
        {
            "model": "tiny",
            "messages": image_message(data_url()) * 1
            + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}] * 3}],
        },
        400,
        "messages[1].content",
    ),
    (ask("word " * 3000), 400, "messages"),
]


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory):
    from conftest import Server

    s = Server(
        tiny_model_dir,
        "--max-image-pixels",
        str(1000 * 1000),
        "--max-images-per-request",
        "2",
        "--max-prompt-tokens",
        "2000",
        "--max-completion-tokens",
        "64",
        "--max-body-bytes",
        str(200_000),
        log_dir=tmp_path_factory.mktemp("limited"),
    ).wait_ready()
    yield s
    s.stop()


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_naming_the_parameter(limited, body, status, param):
    r = post(limited, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"] and error["type"]


def test_malformed_json_and_oversize_bodies_are_refused_and_the_server_keeps_serving(limited):
    r = httpx.post(
        f"{limited.base_url}{CHAT}",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        f"{limited.base_url}{CHAT}", content=b"[1, 2]", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = post(limited, ask("x" * 300_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}]}'

    r = httpx.post(
        f"{limited.base_url}{CHAT}", content=chunked(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert httpx.get(f"{limited.base_url}/v1/nope").status_code == 404
    assert httpx.get(f"{limited.base_url}{CHAT}").status_code == 405
    assert post(limited, ask("still here?")).status_code == 200
    assert limited.proc.poll() is None


def client_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried `response`."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


FAIL_AT_ONCE, FAIL_MID_STREAM = "<<fail at once>>", "<<fail mid-stream>>"


def ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def failing(tiny_model_dir):
    """The real server in this process over the real engine, which fails on a prompt holding a marker:
    while preparing it (before the response starts), or in its stream after the first text. No real
    request fails there (everything that can fail on its input is refused before), so the failure is
    injected."""
    import threading

    import uvicorn
    from conftest import free_port

    from observe_r1_serve.app import create_app
    from observe_r1_serve.config import ServerConfig
    from observe_r1_serve.transformers_engine import TransformersEngine

    class Failing(TransformersEngine):
        async def prepare(self, request, max_prompt_tokens):
            if FAIL_AT_ONCE in request.prompt:  # before the response starts, as a processor that raises
                raise RuntimeError("the engine failed")
            await super().prepare(request, max_prompt_tokens)

        def generate(self, request):
            stream = super().generate(request)
            return self._failing(stream) if FAIL_MID_STREAM in request.prompt else stream

        async def _failing(self, stream):
            try:
                async for item in stream:
                    yield item
                    if item.text:
                        raise RuntimeError("the engine failed mid-stream")
            finally:
                await stream.aclose()

    config = ServerConfig(model=tiny_model_dir, served_model_name="tiny", port=free_port())
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, Failing), port=config.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    base_url = f"http://127.0.0.1:{config.port}"
    try:
        deadline = time.monotonic() + 120
        while not ready(base_url):
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server never got ready"
            time.sleep(0.2)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(60)


def test_a_failure_inside_the_engine_is_a_500_and_the_connection_stays_usable(failing):
    broken = ask(FAIL_AT_ONCE)
    steps = [(broken, 500), (ask("hello"), 200), ({**broken, "stream": True}, 500), (ask("hello"), 200)]
    with httpx.Client(base_url=failing, timeout=60, limits=httpx.Limits(max_connections=1)) as c:
        responses = [c.post(CHAT, json=body) for body, _ in steps]
        ports = {client_port(r) for r in responses}
    assert [r.status_code for r in responses] == [status for _, status in steps]
    for r in responses[::2]:
        assert r.json()["error"] == {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    assert len(ports) == 1
    assert "connection" not in {k.lower() for k in responses[0].headers}


def test_a_stream_that_fails_mid_way_ends_with_an_error_event_on_a_usable_connection(failing):
    broken = ask(FAIL_MID_STREAM, max_tokens=16, temperature=0)
    with httpx.Client(base_url=failing, timeout=60, limits=httpx.Limits(max_connections=1)) as c:
        with c.stream("POST", CHAT, json={**broken, "stream": True}) as streamed:
            events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
        whole = c.post(CHAT, json=broken)
        good = c.post(CHAT, json=ask("hello"))
        ports = {client_port(r) for r in (streamed, whole, good)}
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert any(json.loads(e).get("choices") for e in events[:-2])  # the stream had begun
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    assert good.status_code == 200
    assert len(ports) == 1


def test_two_hundred_requests_at_concurrency_32_are_all_answered(server):
    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as c:
            gate = asyncio.Semaphore(32)

            async def one(i):
                async with gate:
                    body = {
                        "model": "tiny",
                        "messages": image_message(data_url()),
                        "max_tokens": 8,
                        "seed": i,
                    }
                    if i % 2:
                        body["stream"] = True
                        events = []
                        async with c.stream("POST", CHAT, json=body) as r:
                            assert r.status_code == 200
                            async for line in r.aiter_lines():
                                if line.startswith("data: "):
                                    events.append(line[6:])
                        assert events[-1] == "[DONE]"
                        finals = [json.loads(e) for e in events[:-1]]
                        return [c for e in finals for c in e["choices"] if c.get("finish_reason")]
                    r = await c.post(CHAT, json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["choices"]

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(run())
    assert len(results) == 200
    for choices in results:
        assert len(choices) == 1
        assert choices[0]["finish_reason"] in ("stop", "length")
        assert isinstance(choices[0]["format_ok"], bool)
    assert gauge(server, "observe_r1_num_requests_waiting") == 0


def test_a_full_queue_answers_429_with_retry_after_never_hangs(start_server):
    s = start_server("--max-batch-size", "1", "--max-waiting", "1", "--batch-wait-ms", "0")

    async def run():
        async with httpx.AsyncClient(base_url=s.base_url, timeout=120) as c:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 200,
                "temperature": 0,
            }
            return await asyncio.gather(*(c.post(CHAT, json=body) for _ in range(8)))

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "queue_full"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(start_server):
    s = start_server("--max-batch-size", "1")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4000,
        "seed": 10,  # the tiny model's answer to this seed runs ~900 tokens before its end token
        "stream": True,
    }
    with httpx.Client(base_url=s.base_url, timeout=60) as c, c.stream("POST", CHAT, json=body) as r:
        lines = r.iter_lines()  # held: a dropped line iterator closes the response
        # The role chunk is sent before the request reaches the engine; the first text is generated.
        assert next(line for line in lines if '"role"' not in line and line.startswith("data: "))
        assert gauge(s, "observe_r1_num_requests_running") == 1
    assert wait_for_gauge(s, "observe_r1_num_requests_running", 0) == 0
    # The slot is free: a new request is served (by the same single-row batch slot).
    assert post(s, ask("next")).status_code == 200


def test_sigterm_finishes_in_flight_streams_then_exits(start_server):
    s = start_server()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 150,
        "stream": True,
        "temperature": 0,
    }
    events = []
    with httpx.Client(base_url=s.base_url, timeout=120) as c, c.stream("POST", CHAT, json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    s.proc.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    finals = [c for e in events[:-1] for c in json.loads(e)["choices"] if c.get("finish_reason")]
    assert finals and finals[0]["finish_reason"] in ("stop", "length")
    # uvicorn ends by re-raising the signal after its graceful shutdown, as a process should.
    assert s.proc.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.base_url}/health")


def test_ready_waits_for_the_model_and_a_broken_model_ends_the_process(
    start_server, tiny_model_dir, tmp_path
):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    s = start_server(model=broken, ready=False)
    assert s.proc.wait(120) == 1
    assert "loading the model" in s.log()

    s = start_server(ready=False)
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and 200 not in seen:
        try:
            seen.add(httpx.get(f"{s.base_url}/ready", timeout=2).status_code)
        except httpx.HTTPError:
            time.sleep(0.05)
    assert 200 in seen and seen <= {200, 503}


def test_serve_refuses_a_missing_model_folder_at_once(tmp_path):
    from conftest import run_cli

    proc = run_cli("serve", "--model", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and "model folder not found" in proc.stderr


def test_schemathesis_finds_no_server_errors(limited, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    command = [st, "run", f"{limited.base_url}/openapi.json", "--checks", "not_a_server_error"]
    command += ["--max-examples", "60", "--request-timeout", "60", "--generation-deterministic", "--no-color"]
    # Run in tmp_path: schemathesis keeps a cache folder in its working directory.
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert limited.proc.poll() is None


def test_media_placeholders_typed_into_a_prompt_are_refused_naming_where(limited):
    """A prompt of an image model that holds `<|image_pad|>` (as text or as its token id) would claim
    image features no image brings: 400 naming the part, and the server answers the next request."""
    pad = httpx.post(f"{limited.base_url}/tokenize", json={"prompt": "<|image_pad|>"}).json()["tokens"]
    assert len(pad) == 1
    chat = [
        (ask("look at <|image_pad|> here"), "messages[0].content"),
        (
            {"model": "tiny", "messages": image_message(data_url())},
            None,
        ),
        (
            ask([{"type": "text", "text": "a"}, {"type": "text", "text": "<|video_pad|>"}]),
            "messages[0].content[1].text",
        ),
    ]
    for body, param in chat:
        r = post(limited, body | {"max_tokens": 2})
        assert (r.status_code, r.json().get("error", {}).get("param")) == (
            (400, param) if param else (200, None)
        ), r.text
    completions = [
        ({"prompt": "a <|image_pad|> b"}, "prompt"),
        ({"prompt": ["fine", "<|video_pad|>"]}, "prompt[1]"),
        ({"prompt": [5, pad[0], 6]}, "prompt[1]"),
        ({"prompt": [[5], [10**7]]}, "prompt[1][0]"),
    ]
    for body, param in completions:
        r = httpx.post(f"{limited.base_url}/v1/completions", json={"model": "tiny", "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert post(limited, ask("still here?")).status_code == 200
