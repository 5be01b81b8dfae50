"""The `observe-r1` command end to end, in subprocesses, as `make demo` runs it."""

import json

from conftest import run_cli

from observe_r1.data import load_samples
from observe_r1.format import parse


def test_build_generate_and_chat_end_to_end(tmp_path):
    out = run_cli("tiny-model", str(tmp_path / "model"), "--seed", "0").stdout
    assert "parameters" in out
    run_cli("synth-data", str(tmp_path / "data"), "--n", "12", "--seed", "1")
    samples = load_samples(tmp_path / "data" / "data.jsonl")
    assert len(samples) == 12

    proc = run_cli(
        "chat",
        "--model",
        str(tmp_path / "model"),
        "--sample",
        str(tmp_path / "data" / "data.jsonl"),
        "--row",
        "3",
        "--max-new-tokens",
        "16",
        "--seed",
        "0",
        "--json",
    )
    report = json.loads(proc.stdout)
    assert report["question"] == samples[3].question
    assert report["gold_answer"] == samples[3].answer
    assert 1 <= report["completion_tokens"] <= 16
    parsed = parse(report["raw"])
    assert (report["observation"], report["reasoning"], report["answer"]) == (
        parsed.observation,
        parsed.reasoning,
        parsed.answer,
    )
    assert report["format_ok"] == parsed.format_ok
    assert report["format_errors"] == list(parsed.errors)


def test_chat_with_an_image_file_and_question(tiny_model_dir, synth_dir):
    image = sorted((synth_dir / "images").iterdir())[0]
    proc = run_cli(
        "chat", "--model", str(tiny_model_dir), "--question", "What is shown?", "--image", str(image)
    )
    assert "format_ok" in proc.stdout and "answer" in proc.stdout


def test_errors_exit_2_with_a_message_naming_the_problem(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "images": [], "question": "q", "answer": "1"}\n{"id": "b", "images": []}\n')
    proc = run_cli("chat", "--model", str(tiny_model_dir), "--sample", str(bad), check=False)
    assert proc.returncode == 2
    assert f"{bad}:2: field 'question': missing required field" in proc.stderr

    proc = run_cli("chat", "--model", str(tmp_path / "nomodel"), "--question", "q", check=False)
    assert proc.returncode == 2 and "model folder not found" in proc.stderr

    proc = run_cli("tiny-model", str(tiny_model_dir), check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr

    proc = run_cli("synth-data", str(tmp_path / "d"), "--n", "5", "--image-size", "5000", check=False)
    assert proc.returncode == 2 and "image_size" in proc.stderr
    assert not (tmp_path / "d").exists()
