"""`observe-r1 ladder` for real, as a user runs it: the tiny model in-process through the rollout engine and
behind our own server (openai client), both presets, the cache (rebuild without sampling, SIGKILL and
resume to the same bytes), the empty-ladder message, server failures, and bad rows and options refused
by name before anything is sampled.

The reference is a tiny model rewired to answer "A" with a probability that depends on the prompt
(`letter_model`), so the K samples disagree and the ladder's levels fill; the random tiny model,
never right, is the pre-filter's own smaller model.
"""

import contextlib
import io
import json
import logging
import math
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import CLI, free_port

from observe_r1.answer import accuracy
from observe_r1.cli import main
from observe_r1.data import load_samples
from observe_r1.modeling import load_model
from observe_r1_train.config import load_training_config
from observe_r1_train.ladder.inputs import Row
from observe_r1_train.ladder.outputs import STAGE_FILES
from observe_r1_train.ladder.scoring import question_key
from observe_r1_train.prompts import prompt_text

ROOT = Path(__file__).resolve().parents[1]
K = 4
N_ROWS = 12  # 9 with gold A, 3 with gold B, and one unverifiable row on top
# Small and fixed, so every run here samples the same slices: 2 questions x K rows per generate call.
COMMON = [
    "--samples",
    str(K),
    "--no-progress",
    "sampling.max_new_tokens=4",
    "sampling.max_prompt_tokens=1024",
    "engine.batch_questions=2",
    "prefilter.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def letter_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model whose output layer knows two tokens, "A" and <|im_end|>, along one hidden
    dimension that every input embedding pushes up and A's pushes down: it mostly says "A" and then
    stops, with a probability that varies with the prompt and image."""
    from observe_r1.modeling import load_processor

    target = tmp_path_factory.mktemp("models") / "letter"
    shutil.copytree(tiny_model_dir, target)
    model, tokenizer = load_model(tiny_model_dir), load_processor(tiny_model_dir).tokenizer
    a, end = tokenizer.convert_tokens_to_ids(["A", "<|im_end|>"])
    embed = model.get_input_embeddings().weight.data
    embed[:, 0], embed[a, 0] = 1.0, -1.0
    head = torch.zeros_like(model.lm_head.weight)
    head[a, 0], head[end, 0] = 1.0, -1.0
    model.lm_head.weight.data.copy_(head)
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def rows_file(synth_dir, tmp_path_factory) -> Path:
    """N_ROWS questions on the synthetic images (gold A, or B which the model never says) and one
    row whose gold names no option, which the ladder must drop as unverifiable."""
    synth = load_samples(synth_dir / "data.jsonl")
    rows = [
        {
            "id": f"q{i:02d}",
            "images": s.images,
            "question": s.question.split("\n")[0]
            + "\nChoices:\nA. yes\nB. no\nAnswer with the option letter.",
            "answer": "B" if i % 4 == 3 else "A",
            "choices": ["yes", "no"],
            "level": s.level,
        }
        for i, s in enumerate(synth[:N_ROWS])
    ]
    rows.append({**rows[0], "id": "bad-gold", "answer": "E"})
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ladder(*args: str, check: bool = True, progress: bool = False) -> subprocess.CompletedProcess:
    """`observe-r1 ladder ARGS` in this process (no interpreter start-up per run): its exit status,
    stdout, and stderr with the log lines."""
    argv = ["ladder", *args]
    if progress:
        argv.remove("--no-progress")
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        logging.getLogger().removeHandler(handler)
    proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"observe-r1 ladder failed ({code}):\n{proc.stderr[-4000:]}")
    return proc


def local_args(model: Path, rows: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(rows), "--out", str(out), *COMMON, *extra]


def cached(out: Path, name: str = "reference") -> dict[str, list[dict]]:
    by_key: dict[str, list[dict]] = {}
    for line in (out / "cache" / f"{name}.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_key.setdefault(record["key"], []).append(record)
    return by_key


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def neuraladder(letter_model, tiny_model_dir, rows_file, tmp_path_factory):
    """The default preset, with the random tiny model as the pre-filter's smaller model."""
    out = tmp_path_factory.mktemp("ladders") / "neuraladder"
    args = local_args(letter_model, rows_file, out, f"prefilter.model={tiny_model_dir}")
    return out, args, ladder(*args)


def test_neuraladder_rows_follow_from_the_samples(neuraladder):
    out, _, proc = neuraladder
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["verify"]["dropped"] == 1
    assert list(steps["verify"]["reasons"]) == ["gold names option E, but the row has 2 choices"]
    assert (
        steps["prefilter"]["enabled"] and steps["prefilter"]["dropped"] == 0
    )  # the random model is never right
    assert not steps["u_filter"]["enabled"] and not steps["contamination"]["enabled"]
    sampled = summary["levels"]["sampled"]
    assert sum(sampled) == N_ROWS and sum(n > 0 for n in sampled) >= 3, sampled  # the levels really fill
    assert steps["easy_drop"]["dropped"] == math.floor(0.5 * sampled[0])
    assert "reference: 12 questions: 0 from the cache, 12 sampled" in proc.stdout

    rows = jsonl(out / "ladder.jsonl")
    assert len(rows) == summary["rows"] == N_ROWS - steps["easy_drop"]["dropped"]
    samples = {s.id: s for s in load_samples(out / "ladder.jsonl")}  # the trainer's loader reads it
    by_key = cached(out)
    for row in rows:
        records = sorted(by_key[question_key(Row("", samples[row["id"]]))], key=lambda r: r["index"])
        correct = sum(accuracy(r["text"], samples[row["id"]]) for r in records)
        stats = row["ladder"]
        assert len(records) == stats["samples"] == K and stats["correct"] == correct
        assert row["difficulty"] == 1 - correct / K and row["level"] == K - correct
        assert stats["token_lengths"] == [r["tokens"] for r in records]
        assert row["complexity"] == pytest.approx(sum(stats["token_lengths"]) / K)
        assert row["answer"] == ("B" if row["id"] in {"q03", "q07", "q11"} else "A")
        assert "input_level" in row and "stage" not in row and "hint" not in row
    # Smoothing: each level's stretch keeps its size, holds mostly its own level, and matches the summary.
    segments = [r["ladder"]["segment"] for r in rows]
    assert segments == sorted(segments)
    assert Counter(segments) == Counter(r["level"] for r in rows)
    mix = Counter((r["ladder"]["segment"], r["level"]) for r in rows)
    assert {f"{a}:{b}": n for (a, b), n in mix.items()} == {
        f"{a}:{b}": n for a, m in summary["smoothing"]["mix"].items() for b, n in m.items()
    }
    for segment, size in Counter(segments).items():
        assert mix[(segment, segment)] >= 0.6 * size
    parquet = [
        {k: v for k, v in r.items() if v is not None}
        for r in pq.read_table(out / "ladder.parquet").to_pylist()
    ]
    assert parquet == rows
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (
        out / "ladder.png"
    ).stat().st_size > 20_000
    dropped = jsonl(out / "dropped.jsonl")
    assert dropped[0]["id"] == "bad-gold" and dropped[0]["location"].endswith("rows.jsonl:13")
    assert len(dropped) == 1 + steps["easy_drop"]["dropped"]


def test_difficulty_prior_rebuilds_from_the_cache_into_two_stages(neuraladder, tmp_path):
    source, args, _ = neuraladder
    out = tmp_path / "dp"
    shutil.copytree(source, out)
    args = [a if a != str(source) else str(out) for a in args] + ["--preset", "difficulty-prior"]
    proc = ladder(*args)
    assert "reference: 12 questions: 12 from the cache" in proc.stdout and "sampled" not in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert not steps["prefilter"]["enabled"] and not steps["easy_drop"]["enabled"]
    sampled = summary["levels"]["sampled"]
    assert steps["u_filter"]["dropped"] == sampled[0] + sampled[K]
    assert set(steps["u_filter"]["reasons"]) <= {"p = 0 (every sample wrong)", "p = 1 (every sample right)"}
    rows = jsonl(out / "ladder.jsonl")
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # input order: no ladder order here
    assert all(0 < r["difficulty"] < 1 for r in rows)
    stages = {n: load_samples(out / name) for n, name in STAGE_FILES.items()}
    assert sum(map(len, stages.values())) == len(rows) == summary["rows"]
    assert summary["stages"]["rows"] == {"1": len(stages[1]), "2": len(stages[2])}
    assert all(s.difficulty < 0.75 and s.hint is None for s in stages[1])
    assert all(
        s.difficulty >= 0.75 and s.hint and s.hint.startswith("This problem is difficult") for s in stages[2]
    )
    # The two-stage training configs read these files as they are, and stage 2 puts each row's hint first.
    for n, name in STAGE_FILES.items():
        cfg = load_training_config(
            ROOT / f"train/configs/difficulty_prior_stage{n}.yaml", [f"data.paths=[{out / name}]"]
        )
        assert cfg.hints.enabled == (n == 2)
        assert (
            Path(
                load_training_config(ROOT / f"train/configs/difficulty_prior_stage{n}.yaml").data.paths[0]
            ).name
            == name
        )
    if stages[2]:
        first = stages[2][0]
        assert prompt_text(first, with_hint=True).startswith(first.hint + "\n\n")


def test_sigkill_and_resume_give_the_same_ladder(neuraladder, letter_model, tiny_model_dir, rows_file):
    reference, args, _ = neuraladder
    out = reference.parent / "killed"
    args = [a if a != str(reference) else str(out) for a in args]
    proc = subprocess.Popen(
        [*CLI, "ladder", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    cache = out / "cache" / "reference.jsonl"
    deadline = time.monotonic() + 300
    while not (cache.is_file() and cache.read_text().count("\n") >= 2 * K) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run wrote no samples"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = cache.read_text().count("\n")
    assert 2 * K <= lines < N_ROWS * K and not (out / "ladder.jsonl").exists()
    with cache.open("a") as f:  # a kill in the middle of an append leaves a torn line
        f.write('{"key": "0123", "index": 0, "te')
    resumed = ladder(*args, progress=True)
    assert f"{lines // K} from the cache" in resumed.stdout
    assert "reference samples: 100%" in resumed.stderr and "question" in resumed.stderr  # the progress bar
    for name in ("ladder.jsonl", "ladder.parquet", "ladder.png", "dropped.jsonl"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    assert a["settings"].pop("out") != b["settings"].pop("out") and a == b


def test_the_same_ladder_through_our_server(letter_model, rows_file, start_server, tmp_path):
    """Greedy, so the local engine and the server must give the same answers; the server takes at most
    n=4 per request, so K=6 falls back to one sample per request."""
    greedy = ["sampling.temperature=0", "prefilter.enabled=false", "smoothing.enabled=false"]
    local = tmp_path / "local"
    ladder(*local_args(letter_model, rows_file, local, *greedy))
    server = start_server("--max-n", "4", "--max-completion-tokens", "64", model=letter_model)
    remote = tmp_path / "remote"
    url = f"{server.base_url}/v1"
    args = [
        "--server",
        url,
        "--server-model",
        "tiny",
        "--data",
        str(rows_file),
        "--out",
        str(remote),
        *COMMON,
    ]
    ladder(*args, *greedy)
    keys = ("id", "difficulty", "complexity", "level", "images")
    a, b = jsonl(local / "ladder.jsonl"), jsonl(remote / "ladder.jsonl")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert [r["ladder"]["correct"] for r in a] == [r["ladder"]["correct"] for r in b]
    # One request of n=K per question; the log-probs our server returns count each choice's tokens,
    # exactly as the local engine counts them.
    assert [r["ladder"]["token_lengths"] for r in b] == [r["ladder"]["token_lengths"] for r in a]
    assert all(r["ladder"]["token_lengths"] is not None for r in b)
    # K = 6 > the server's n limit: refused once, then n=1 requests, each seeded on its own.
    six = tmp_path / "six"
    proc = ladder(
        *[a if a != str(remote) else str(six) for a in args], "sampling.samples=6", "prefilter.enabled=false"
    )
    assert "refuses n=6" in proc.stderr
    records = cached(six)
    assert len(records) == N_ROWS and all(
        sorted(r["index"] for r in rs) == list(range(6)) for rs in records.values()
    )
    # A request the server refuses is not retried: the run stops naming the question, the cache kept.
    refused = ladder(
        *[a if a != str(remote) else str(tmp_path / "long") for a in args],
        "sampling.max_new_tokens=100",
        check=False,
    )
    assert refused.returncode == 2
    assert re.search(r"refused the request for question 'q\d\d' \(.*rows.jsonl:\d+\)", refused.stderr)
    assert "max_tokens=100 exceeds this server's limit of 64" in refused.stderr
    assert "run the same command again to continue" in refused.stderr
    # The same cache, another preset: every sample right or every sample wrong, so the U-filter leaves nothing.
    empty = ladder(
        *local_args(letter_model, rows_file, local, *greedy, "--preset", "difficulty-prior"), check=False
    )
    assert empty.returncode == 2
    assert "the ladder is empty: 13 rows read; verify dropped 1" in empty.stderr
    # Greedy: a question's K samples are one answer, so p is 0 or 1 for every one of them.
    assert re.search(
        r"u_filter dropped 12 \(p = 0 \(every sample wrong\): \d+, p = 1 \(every sample right\): \d+\)",
        empty.stderr,
    )
    assert not (local / "ladder.jsonl").exists() and (local / "summary.json").is_file()


def test_an_unreachable_server_is_retried_then_stops_with_a_message(rows_file, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    args = [
        "--server",
        url,
        "--server-model",
        "m",
        "--data",
        str(rows_file),
        "--out",
        str(tmp_path / "o"),
        *COMMON,
    ]
    proc = ladder(*args, "server.retries=2", "server.backoff_s=0.01", check=False)
    assert proc.returncode == 2 and proc.stderr.count("retrying in") == 2
    assert f"the server at {url} failed listing its models 3 times" in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["u_filter.p_low=1.5"], "u_filter: needs 0 <= p_low < p_high <= 1"),
        (["smoothing.widht=1"], "smoothing.widht: unknown key (did you mean 'width'?)"),
        (
            ["--server", "http://x/v1"],
            "reference: give exactly one of reference.model (--model) and reference.server",
        ),
        (["--map", "bogus=col"], "input.map.bogus: not a sample field"),
        (["--map", "question"], "--map: expected FIELD=COLUMN pairs"),
        (["order.enabled=false"], "smoothing.enabled: smoothing mixes the levels of the ordered ladder"),
        (["--preset", "curriculum"], "preset: must be one of neuraladder, difficulty-prior"),
        (["sampling.samples=0"], "sampling.samples: must be >= 1"),
    ],
)
def test_bad_options_are_refused_by_name(tiny_model_dir, rows_file, tmp_path, extra, message):
    proc = ladder(*local_args(tiny_model_dir, rows_file, tmp_path / "o"), *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "cache").exists()


def test_bad_rows_are_refused_before_any_sampling(tiny_model_dir, rows_file, tmp_path):
    lines = rows_file.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join([lines[0], json.dumps({**json.loads(lines[1]), "images": ["nowhere.png"]}), *lines[2:]])
        + "\n"
    )
    proc = ladder(*local_args(tiny_model_dir, bad, tmp_path / "o"), check=False)
    assert (
        proc.returncode == 2 and f"{bad}:2: field 'images': image file not found: nowhere.png" in proc.stderr
    )
    too_long = ladder(
        *local_args(tiny_model_dir, rows_file, tmp_path / "p"), "sampling.max_prompt_tokens=50", check=False
    )
    assert too_long.returncode == 2
    assert f"{rows_file}:1: field 'question': the prompt has" in too_long.stderr
    for out in ("o", "p"):
        assert not list((tmp_path / out).glob("cache/*.jsonl"))


def test_cached_samples_of_other_settings_are_not_reused(neuraladder):
    _, args, _ = neuraladder
    proc = ladder(*args, "sampling.temperature=0.5", check=False)
    assert proc.returncode == 2
    assert (
        "the cached samples were made with other settings (sampling.temperature: 1.0 in the cache, 0.5 now)"
        in proc.stderr
    )
    assert "pass --force" in proc.stderr
