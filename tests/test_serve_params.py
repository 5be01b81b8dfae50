"""OpenAI's parameters through the real `openai` client over HTTP, on the tiny model: log-probs equal to
the model's own log-softmax (chat and plain completions, streamed and not), penalties and logit_bias
in the direction they push, every parameter the server cannot honour refused by name, fields that are
no parameter ignored with a header (or refused with --reject-unknown-params)."""

import itertools
import math

import openai
import pytest
import torch
from test_serve import client

from observe_r1.format import SYSTEM_PROMPT

ASK = [{"role": "user", "content": "How many circles are there?"}]

# Every OpenAI chat parameter this server cannot honour, with a value a client would send.
REFUSED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "high",
    "verbosity": "low",
    "web_search_options": {},
}


def refusal(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value


class Reference:
    """The served model's own raw log-softmax, recomputed here with transformers."""

    def __init__(self, model_dir, model=None):
        from transformers import AutoTokenizer

        from observe_r1.modeling import load_model
        from observe_r1_serve.engine import TokenBytes

        self.model = model or load_model(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.token_bytes = token_bytes = TokenBytes(self.tokenizer)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.ids = {}
        for i in range(min(vocab, len(self.tokenizer))):
            self.ids.setdefault(bytes(token_bytes(i)), i)

    def chat_prompt(self, messages, system=SYSTEM_PROMPT) -> list[int]:
        turns = [{"role": "system", "content": system}, *messages] if system else messages
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_id(self, entry) -> int:
        return self.ids[bytes(entry.bytes)]

    @torch.inference_mode()
    def log_softmax(self, ids: list[int]) -> torch.Tensor:
        """Row t: log p(. | ids[: t + 1])."""
        logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def check_entries(entries, prompt_ids: list[int], reference: Reference, k: int) -> None:
    """Each entry is its token's log-probability under the model given the prompt and the tokens
    before it; its top list is the k most likely, sorted, with the sampled token when it ranks there."""
    generated = [reference.token_id(e) for e in entries]
    table = reference.log_softmax(prompt_ids + generated)[len(prompt_ids) - 1 :]
    for t, (entry, token) in enumerate(zip(entries, generated, strict=True)):
        assert entry.logprob == pytest.approx(table[t, token].item(), abs=2e-3)
        values, ids = table[t].topk(k)
        assert [reference.token_id(e) for e in entry.top_logprobs] == ids.tolist()
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(values.tolist(), abs=2e-3)
        assert all(a.logprob >= b.logprob for a, b in itertools.pairwise(entry.top_logprobs))
        if entry.logprob > entry.top_logprobs[-1].logprob + 1e-4:
            assert entry.token in [e.token for e in entry.top_logprobs]


def test_chat_logprobs_are_the_models_raw_log_softmax_streamed_or_not(server, reference):
    # Temperature, top-p and top-k change the draw, not the log-probabilities returned (vLLM's raw mode).
    kwargs = dict(model="tiny", messages=ASK, max_tokens=10, seed=3, temperature=1.4, top_p=0.9)
    kwargs |= dict(logprobs=True, top_logprobs=3, extra_body={"return_raw_text": True, "top_k": 50})
    r = client(server).chat.completions.create(**kwargs)
    prompt = reference.chat_prompt(ASK)
    assert r.usage.prompt_tokens == len(prompt)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 10
    check_entries(entries, prompt, reference, k=3)
    raw = (r.choices[0].message.model_extra or {})["raw"]
    # The raw text is the entries' bytes less special tokens (decoded without them, as vLLM does).
    shown = [e for e in entries if reference.token_id(e) not in reference.token_bytes.hidden]
    assert b"".join(bytes(e.bytes) for e in shown).decode("utf-8", "replace") == raw

    chunks = list(client(server).chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    # A chunk carries the entries of exactly the tokens whose raw text it carries.
    for c in chunks:
        for ch in c.choices:
            text = (ch.delta.model_extra or {}).get("raw") or ""
            carried = ch.logprobs.content if ch.logprobs else []
            got = b"".join(
                bytes(e.bytes) for e in carried if reference.token_id(e) not in reference.token_bytes.hidden
            )
            assert got.decode("utf-8", "replace") == text


def test_logprobs_without_top_logprobs_and_top_logprobs_alone(server):
    r = client(server).chat.completions.create(model="tiny", messages=ASK, max_tokens=4, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert (
        client(server).chat.completions.create(model="tiny", messages=ASK, max_tokens=2).choices[0].logprobs
        is None
    )
    err = refusal(lambda: client(server).chat.completions.create(model="tiny", messages=ASK, top_logprobs=2))
    assert err.param == "top_logprobs"
    err = refusal(
        lambda: client(server).chat.completions.create(
            model="tiny", messages=ASK, logprobs=True, top_logprobs=21
        )
    )
    assert err.param == "top_logprobs"


def test_completions_echo_scores_the_prompt_with_the_models_log_softmax(server, reference):
    prompt = reference.tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    r = client(server).completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2, seed=1
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = prompt + [reference.ids[t.encode()] for t in lp.tokens[len(prompt) :]]
    table = reference.log_softmax(ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(table[t - 1, ids[t]].item(), abs=2e-3)
        assert lp.tokens[t] in lp.top_logprobs[t] and len(lp.top_logprobs[t]) in (2, 3)
    assert r.choices[0].text.startswith("one two three four")
    assert lp.text_offset[: len(prompt)] == list(
        itertools.accumulate((len(t) for t in lp.tokens[: len(prompt) - 1]), initial=0)
    )

    scored = client(server).completions.create(
        model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0
    )
    assert scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1 : len(prompt)], abs=1e-4
    )

    events = list(
        client(server).completions.create(model="tiny", prompt="one two", max_tokens=5, seed=2, stream=True)
    )
    plain = client(server).completions.create(model="tiny", prompt="one two", max_tokens=5, seed=2)
    assert "".join(c.text for e in events for c in e.choices) == plain.choices[0].text


def greedy_tokens(server, **kwargs) -> list[bytes]:
    extra_body = {"ignore_eos": True} | kwargs.pop("extra_body", {})
    r = client(server).chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=24,
        temperature=0,
        logprobs=True,
        extra_body=extra_body,
        **kwargs,
    )
    assert r.usage.completion_tokens == 24  # ignore_eos: always to max_tokens
    return [bytes(e.bytes) for e in r.choices[0].logprobs.content]


def test_penalties_and_logit_bias_push_the_way_they_say(server, reference):
    """The case: the tiny model's logits lie within about a unit of each other, so a bias of 1.5 on one
    token makes greedy decoding repeat it throughout; the penalties then push it out."""
    token = 100
    spelled = reference.token_bytes(token)
    plain = greedy_tokens(server)
    assert spelled not in plain
    bias = {str(token): 1.5}
    assert greedy_tokens(server, logit_bias=bias) == [spelled] * 24
    # 1.5 - 0.5 x count: the bias is spent after a few repeats.
    assert 1 < greedy_tokens(server, logit_bias=bias, frequency_penalty=0.5).count(spelled) < 6
    assert greedy_tokens(server, logit_bias=bias, presence_penalty=2.0).count(spelled) == 1
    # A negative presence penalty rewards repeating the first token.
    assert greedy_tokens(server, presence_penalty=-2.0) == [plain[0]] * 24
    assert greedy_tokens(server, logit_bias={str(reference.ids[plain[0]]): -100})[0] != plain[0]
    err = refusal(lambda: greedy_tokens(server, logit_bias={"not-a-token": 1}))
    assert err.param == "logit_bias"


def test_min_tokens_holds_off_the_end(server):
    r = client(server).chat.completions.create(
        model="tiny", messages=ASK, max_tokens=12, temperature=0, extra_body={"min_tokens": 12}
    )
    assert r.usage.completion_tokens == 12


@pytest.mark.parametrize("param", sorted(REFUSED))
def test_parameters_the_server_cannot_honour_are_refused_by_name(server, param):
    err = refusal(
        lambda: client(server).chat.completions.create(
            model="tiny", messages=ASK, extra_body={param: REFUSED[param]}
        )
    )
    assert err.param == param and err.code == "unsupported_parameter"
    assert err.body["type"] == "invalid_request_error" and param in err.body["message"]


def test_neutral_values_and_no_effect_parameters_are_accepted(server):
    r = client(server).chat.completions.with_raw_response.create(
        model="tiny",
        messages=ASK,
        max_tokens=2,
        user="u1",
        metadata={"run": "x"},
        store=False,
        service_tier="auto",
        response_format={"type": "text"},
        tool_choice="none",
        modalities=["text"],
    )
    assert r.http_response.status_code == 200 and "x-observe-r1-ignored-params" not in r.headers


def test_unknown_fields_are_ignored_with_a_header_or_refused_on_request(server, start_server):
    r = client(server).chat.completions.with_raw_response.create(
        model="tiny", messages=ASK, max_tokens=2, extra_body={"vendor_extra": 1, "zz": 2}
    )
    assert r.headers["x-observe-r1-ignored-params"] == "vendor_extra, zz"
    assert "vendor_extra, zz" in server.log()
    strict = start_server("--reject-unknown-params")
    err = refusal(
        lambda: client(strict).chat.completions.create(
            model="tiny", messages=ASK, extra_body={"vendor_extra": 1}
        )
    )
    assert err.param == "vendor_extra" and err.code == "unknown_parameter"
    assert math.isfinite(
        client(strict).chat.completions.create(model="tiny", messages=ASK, max_tokens=1).usage.total_tokens
    )
