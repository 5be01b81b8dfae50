"""The sampling policy on every path (observe_r1/sampling.py), tried on the tiny model with a generation
config like Qwen2.5-VL's (top_k 1, top_p 0.001, a repetition penalty) and on the same weights without it.

- chat and the server: what the command line or the request sets wins; what it leaves unset comes from
  the checkpoint (`--generation-config auto`), or from nowhere (`none`);
- the export and the rollout: tests/test_train_run.py (the run starts from the Qwen-like base).
"""

import json

import pytest
from test_serve import client

from observe_r1 import cli
from observe_r1.sampling import NEUTRAL, SamplingError, SamplingParams, checkpoint_defaults, resolve

QWEN_LIKE = {"temperature": 0.7, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}
EXPLICIT = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}  # neutral, all set
SEEDS = range(5)


def test_checkpoint_defaults_are_read_from_its_generation_config(qwen_like_model_dir, tiny_model_dir):
    assert checkpoint_defaults(qwen_like_model_dir) == QWEN_LIKE
    assert checkpoint_defaults(tiny_model_dir) == {"temperature": 1.0, "top_p": 1.0}


def test_resolve_prefers_the_request_then_the_checkpoint_then_neutral():
    values, sources = resolve({"temperature": 0.0, "top_p": None}, {"top_p": 0.5, "top_k": 3})
    assert values == {"temperature": 0.0, "top_p": 0.5, "top_k": 3, "repetition_penalty": 1.0}
    assert sources == {
        "temperature": "request",
        "top_p": "checkpoint",
        "top_k": "checkpoint",
        "repetition_penalty": "neutral",
    }
    assert resolve({}, {}) == (NEUTRAL, dict.fromkeys(NEUTRAL, "neutral"))


@pytest.mark.parametrize(
    "bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"repetition_penalty": 0.0}, {"n": 0}]
)
def test_out_of_range_settings_are_refused_by_name(bad):
    name = next(iter(bad))
    with pytest.raises(SamplingError, match=f"^{name}="):
        SamplingParams(**bad)


def chat(capsys, model, seed, *flags):
    code = cli.main(["chat", "--model", str(model), "--question", "How many?", "--max-new-tokens", "12"]
                    + ["--seed", str(seed), "--json", *flags])  # fmt: skip
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_chat_takes_unset_settings_from_the_checkpoint_and_says_so(capsys, qwen_like_model_dir):
    runs = [chat(capsys, qwen_like_model_dir, seed, "--temperature", "1") for seed in SEEDS]
    assert len({r["raw"] for r in runs}) == 1  # top_k=1 from the checkpoint: one answer whatever the seed
    assert runs[0]["sampling"] == (
        "temperature=1.0 (request), top_p=0.001 (checkpoint), top_k=1 (checkpoint), repetition_penalty=1.05 (checkpoint)"
    )


def test_chat_with_every_setting_given_samples_alike_on_both_checkpoints(
    capsys, qwen_like_model_dir, tiny_model_dir
):
    flags = ["--temperature", "1", "--top-p", "1", "--top-k", "0", "--repetition-penalty", "1"]
    qwen = [chat(capsys, qwen_like_model_dir, seed, *flags)["raw"] for seed in SEEDS]
    plain = [chat(capsys, tiny_model_dir, seed, *flags)["raw"] for seed in SEEDS]
    assert qwen == plain and len(set(qwen)) > 1


def test_chat_can_ignore_the_checkpoints_generation_config(capsys, qwen_like_model_dir, tiny_model_dir):
    ignored = chat(capsys, qwen_like_model_dir, 3, "--generation-config", "none")
    assert ignored["raw"] == chat(capsys, tiny_model_dir, 3)["raw"]
    assert (
        ignored["sampling"]
        == "temperature=1.0 (neutral), top_p=1.0 (neutral), top_k=0 (neutral), repetition_penalty=1.0 (neutral)"
    )


def answers(server, seed, **settings):
    """The raw text of one seeded request, with the named sampling settings (the others unset)."""
    r = client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "How many circles?"}],
        max_tokens=16,
        seed=seed,
        extra_body={
            "return_raw_text": True,
            **{k: v for k, v in settings.items() if k in ("top_k", "repetition_penalty")},
        },
        **{k: v for k, v in settings.items() if k in ("temperature", "top_p")},
    )
    return r.choices[0].message.model_extra["raw"]


@pytest.fixture(scope="module")
def servers(qwen_like_model_dir, tiny_model_dir, tmp_path_factory):
    """Servers on the Qwen-like checkpoint (its defaults, and ignoring them) and on the plain one."""
    from conftest import Server

    log_dir = tmp_path_factory.mktemp("policy")
    started = {
        "qwen": Server(qwen_like_model_dir, log_dir=log_dir),
        "qwen-ignored": Server(qwen_like_model_dir, "--generation-config", "none", log_dir=log_dir),
        "plain": Server(tiny_model_dir, log_dir=log_dir),
    }
    yield {name: s.wait_ready() for name, s in started.items()}
    for s in started.values():
        s.stop()


def test_server_with_explicit_settings_answers_alike_on_both_checkpoints(servers):
    qwen = [answers(servers["qwen"], seed, **EXPLICIT) for seed in SEEDS]
    assert qwen == [answers(servers["plain"], seed, **EXPLICIT) for seed in SEEDS]
    assert len(set(qwen)) > 1
    greedy = {"temperature": 0.0, "repetition_penalty": 1.0}  # a penalty can be turned off by the request
    assert answers(servers["qwen"], 0, **greedy) == answers(servers["plain"], 0, **greedy)


def test_server_takes_unset_settings_from_the_checkpoint_and_logs_them(servers):
    unset = [answers(servers["qwen"], seed) for seed in SEEDS]
    assert unset == [answers(servers["plain"], seed, **QWEN_LIKE) for seed in SEEDS]
    assert "top_k=1 (checkpoint), repetition_penalty=1.05 (checkpoint)" in servers["qwen"].log()


def test_server_can_ignore_the_checkpoints_generation_config(servers):
    ignored = [answers(servers["qwen-ignored"], seed) for seed in SEEDS]
    assert ignored == [answers(servers["plain"], seed, **EXPLICIT) for seed in SEEDS]
    assert "top_k=0 (neutral), repetition_penalty=1.0 (neutral)" in servers["qwen-ignored"].log()
