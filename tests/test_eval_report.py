"""Report statistics on fixed logged samples with known answers (no lmms-eval, no model)."""

import json
import math

import numpy as np
import pytest

from observe_r1_eval import lmms, report

FIXED = __import__("pathlib").Path(__file__).with_name("eval_data") / "samples_fixed.jsonl"


def words(text: str) -> int:
    return len(text.split())


def test_responses_are_the_raw_texts_of_logged_samples():
    texts = lmms.responses(FIXED)
    assert len(texts) == 4
    assert texts[0].startswith("<observe>three red circles</observe>")
    assert texts[1].startswith("<observe>two bars</observe>")  # nested list of repeats: the first one
    assert texts[3] == "the answer is 12"  # no tags: lmms-eval logs only `filtered_resps`


def test_chain_stats_on_fixed_samples():
    stats = report.chain_stats(lmms.responses(FIXED), words)
    assert stats["samples"] == 4
    assert stats["format_rate"] == 0.5  # samples 0 and 1 follow the format; 2 lacks <observe>, 3 has no tags
    # observation words: 3, 2, 0 (missing), 0 (no tags); reasoning: 5, 12, 3, 0; answer: 1, 1, 1, 4 (outside text)
    assert stats["tokens"]["observation"] == {"mean": 1.25, "median": 1.0, "p90": pytest.approx(2.7)}
    assert stats["tokens"]["reasoning"] == {"mean": 5.0, "median": 4.0, "p90": pytest.approx(9.9)}
    assert stats["tokens"]["answer"] == {"mean": 1.75, "median": 1.0, "p90": pytest.approx(3.1)}
    assert stats["tokens"]["total"]["mean"] == pytest.approx(
        np.mean([words(t) for t in lmms.responses(FIXED)])
    )


def test_nested_observe_counts_as_compliant_when_asked():
    text = "<think><observe>a cat</observe>so one animal</think><answer>1</answer>"
    assert report.chain_stats([text], words)["format_rate"] == 0.0
    stats = report.chain_stats([text], words, nested_observe=True)
    assert stats["format_rate"] == 1.0
    assert stats["tokens"]["observation"]["mean"] == 2


@pytest.mark.parametrize("values", [[1], [5, 1], [3, 1, 4, 1, 5, 9, 2, 6], list(range(101))])
def test_percentile_matches_numpy(values):
    for q in (0, 10, 50, 90, 100):
        assert report.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert report.summarise(values)["median"] == pytest.approx(np.median(values))


def test_empty_input_gives_nan_not_zero():
    stats = report.chain_stats([], words)
    assert math.isnan(stats["format_rate"])
    assert math.isnan(stats["tokens"]["total"]["mean"])


def test_request_failures_are_recognised():
    texts = ["<answer>1</answer>", "[LMMS_EVAL_REQUEST_FAILED after 5 retries] Connection error.", "fine"]
    assert lmms.failures(texts) == [texts[1]]


def test_lengths_in_tokens_of_the_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    count = report.token_counter(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "<observe>three red circles</observe><think>1+1+1</think><answer>3</answer>"
    stats = report.chain_stats([text], count)
    assert stats["tokens"]["total"]["mean"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert stats["tokens"]["answer"]["mean"] == len(tokenizer("3", add_special_tokens=False)["input_ids"])


def test_writers_and_compare(tmp_path):
    stats = report.chain_stats(lmms.responses(FIXED), words)
    rows = [{"benchmark": "Fixed", "task": "fixed_task", "metric": "accuracy", "accuracy": 0.75, **stats}]
    text = report.write(rows, tmp_path, "fixed run")
    assert "| Fixed | `fixed_task` | 4 | 75.0 | 50.0 | 1.0 (1.2 / 2.7) |" in text
    assert (tmp_path / "report.md").read_text() == text
    assert json.loads((tmp_path / "report.json").read_text())["benchmarks"][0]["accuracy"] == 0.75
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = [dict(rows[0], accuracy=0.5), dict(rows[0], benchmark="Only here", accuracy=0.25)]
    table = report.compare_markdown({"a": rows, "b": other})
    assert "| Fixed | 75.0 / 50.0 / " in table and "| Only here | – | 25.0 / 50.0 / " in table
