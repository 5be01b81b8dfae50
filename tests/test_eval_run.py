"""eval/run.py for real: lmms-eval in .venv-eval against `observe-r1 serve` on the tiny model, local suite.

Each lmms-eval start costs about 20 s here (it indexes its ~2,000 task files), so the end-to-end test
does the interruption and the resume in one run of two tasks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, run_cli

from observe_r1_eval import lmms, report

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "eval" / "run.py")]

pytestmark = pytest.mark.skipif(
    not (REPO / ".venv-eval" / "bin" / "python").exists(),
    reason="lmms-eval's environment: run `make setup-eval`",
)


def eval_args(server, tiny_model_dir, synth_dir, out, *extra):
    return [
        "--suite", "local", "--model", "tiny", "--base-url", f"{server.base_url}/v1",
        "--tokenizer", str(tiny_model_dir), "--local-data", str(synth_dir / "data.jsonl"),
        "--limit", "4", "--max-new-tokens", "24", "--output", str(out), *extra,
    ]  # fmt: skip


def run_eval(*args, timeout=600):
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout)


def test_local_suite_end_to_end_interrupted_and_resumed(server, tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    args = eval_args(server, tiny_model_dir, synth_dir, out)
    # A shell without job control starts background commands with SIGINT ignored, and children
    # inherit that; a user's Ctrl-C reaches a foreground process, so restore the default here.
    first = subprocess.Popen(
        [*RUN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    done_open = out / "done" / "observe_r1_local_open.json"
    deadline = time.monotonic() + 300
    while not done_open.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done_open.exists(), first.communicate()
    first.send_signal(signal.SIGINT)  # while the second task runs
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert not (out / "report.json").exists() and not (out / "done" / "observe_r1_local_choice.json").exists()
    finished_at = done_open.stat().st_mtime

    second = run_eval(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[1/2] observe_r1_local_open: already done, skipping" in second.stderr
    assert "[2/2] observe_r1_local_choice: running lmms-eval" in second.stderr
    assert done_open.stat().st_mtime == finished_at

    rows = json.loads((out / "report.json").read_text())["benchmarks"]
    assert [r["task"] for r in rows] == ["observe_r1_local_open", "observe_r1_local_choice"]
    for row in rows:
        assert row["samples"] == 4 and row["metric"] == "accuracy"
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["format_rate"] <= 1
        assert set(row["tokens"]) == {"observation", "reasoning", "answer", "total"}
        assert row["tokens"]["total"]["mean"] > 0  # the random model says something
        texts = lmms.responses(Path(row["samples_file"]))
        assert len(texts) == 4 and not lmms.failures(texts)
    assert "| local open-answer | `observe_r1_local_open` | 4 |" in second.stdout  # the table is printed
    assert (out / "report.md").read_text() in second.stdout
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    compared = run_cli("eval", "compare", str(out), str(out), "--output", str(tmp_path / "compare.md"))
    assert "| local multiple-choice |" in compared.stdout == (tmp_path / "compare.md").read_text() + "\n"

    changed = run_eval(*eval_args(server, tiny_model_dir, synth_dir, out, "--max-new-tokens", "8"))
    assert changed.returncode == 2 and "holds finished tasks of other settings" in changed.stderr


def test_the_suite_alone_finds_the_server_its_model_and_its_tokenizer(
    server, tiny_model_dir, synth_dir, tmp_path
):
    """`eval/run.py --suite local` with no --model, --base-url or --tokenizer: the server from
    $OPENAI_BASE_URL, its only model from /v1/models, the lengths counted by its /tokenize exactly as
    the checkpoint's tokenizer counts them."""
    out = tmp_path / "run"
    args = ["--suite", "local", "--local-data", str(synth_dir / "data.jsonl"), "--limit", "2"]
    env = {**os.environ, "OPENAI_BASE_URL": f"{server.base_url}/v1"}
    proc = subprocess.run(
        [*RUN, *args, "--max-new-tokens", "16", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["model"] == "tiny"
    count = report.token_counter(str(tiny_model_dir))
    for row in json.loads((out / "report.json").read_text())["benchmarks"]:
        texts = lmms.responses(Path(row["samples_file"]))
        expected = report.chain_stats(texts, count)
        assert row["tokens"] == expected["tokens"] and row["tokens"]["total"]["mean"] > 0


def test_tokenize_endpoint_counts_as_the_model_does(server, tiny_model_dir):
    tokenizer = report.token_counter(str(tiny_model_dir))
    text = "<observe>two red squares</observe><think>2</think><answer>2</answer>"
    answer = httpx.post(f"{server.base_url}/tokenize", json={"model": "tiny", "prompt": text}, timeout=30)
    assert answer.status_code == 200 and answer.json()["count"] == len(answer.json()["tokens"]) == tokenizer(
        text
    )
    wrong = httpx.post(f"{server.base_url}/tokenize", json={"model": "other", "prompt": text}, timeout=30)
    assert wrong.status_code == 404 and wrong.json()["error"]["param"] == "model"
    special = httpx.post(
        f"{server.base_url}/tokenize", json={"prompt": text, "add_special_tokens": True}, timeout=30
    )
    assert special.status_code == 400 and special.json()["error"]["param"] == "add_special_tokens"


def test_several_models_or_no_tokenize_need_the_flags_named(tiny_model_dir, synth_dir, tmp_path):
    """A server that lists two models and has no /tokenize (not ours): --model, then --tokenizer, named."""
    import http.server
    import threading

    class Peer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "a"}, {"id": "b"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    peer = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    threading.Thread(target=peer.serve_forever, daemon=True).start()
    try:
        base = ["--suite", "local", "--base-url", f"http://127.0.0.1:{peer.server_port}/v1"]
        base += ["--output", str(tmp_path / "run")]
        several = run_eval(*base)
        assert several.returncode == 2 and "serves 2 models (a, b): pass --model" in several.stderr
        untokenized = run_eval(*base, "--model", "a")
        assert untokenized.returncode == 2 and "pass --tokenizer" in untokenized.stderr
        assert "has no /tokenize endpoint" in untokenized.stderr
    finally:
        peer.shutdown()


def test_server_errors_stop_the_run_without_a_report(start_server, tiny_model_dir, synth_dir, tmp_path):
    server = start_server("--max-prompt-tokens", "16")  # every request is refused with a 400
    out = tmp_path / "run"
    proc = run_eval(*eval_args(server, tiny_model_dir, synth_dir, out, "--model-args", "max_retries=1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "observe_r1_local_open: 4 of 4 requests to the model failed" in proc.stderr
    assert "prompt" in proc.stderr  # the server's own message comes through
    assert not (out / "report.json").exists() and not (out / "done").exists()


def test_server_down_is_a_clear_error(tiny_model_dir, synth_dir, tmp_path):
    class Closed:
        base_url = f"http://127.0.0.1:{free_port()}"

    proc = run_eval(*eval_args(Closed, tiny_model_dir, synth_dir, tmp_path / "run"))
    assert proc.returncode == 2
    assert f"cannot reach the server at {Closed.base_url}/v1" in proc.stderr
    assert not (tmp_path / "run" / "lmms").exists()


def test_model_the_server_does_not_serve_is_refused(server, tiny_model_dir, synth_dir, tmp_path):
    args = eval_args(server, tiny_model_dir, synth_dir, tmp_path / "run")
    args[args.index("tiny")] = "no-such-model"
    proc = run_eval(*args)
    assert proc.returncode == 2
    assert "does not serve model 'no-such-model' (it serves: tiny)" in proc.stderr


def test_unknown_suite_and_task_are_refused_before_anything_runs(server, tiny_model_dir, tmp_path):
    proc = run_eval("--suite", "nope", "--model", "tiny", "--tokenizer", str(tiny_model_dir))
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr

    out = tmp_path / "run"
    proc = run_eval(
        "--tasks", "mathvista_testmini_cot_reasoning,not_a_task", "--model", "tiny", "--tokenizer",
        str(tiny_model_dir), "--base-url", f"{server.base_url}/v1", "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "lmms-eval cannot run these tasks:\n  not_a_task: lmms-eval knows no such task\n" in proc.stderr
    assert not (out / "lmms").exists()


def test_judge_required_task_is_refused_without_a_judge(tiny_model_dir, tmp_path):
    proc = run_eval("--suite", "general", "--model", "tiny", "--tokenizer", str(tiny_model_dir))
    assert proc.returncode == 2
    assert "hallusion_bench_image cannot be scored without an LLM judge" in proc.stderr


LMMS_CHECK = r"""
import json, sys
from lmms_eval.api.reasoning import strip_reasoning_tags
from lmms_eval.models import get_model
from observe_r1.format import SYSTEM_PROMPT
tags, doc, base_url = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
sys.path.insert(0, sys.argv[4])
import utils  # the local task's functions
good = "<observe>two cyan shapes</observe><think>count them: 2</think><answer>2</answer>"
hidden = "<observe>I see 2</observe><think>it is 2</think><answer>3</answer>"
scores = [utils.process_results(doc, [strip_reasoning_tags(t, tags)])["accuracy"] for t in (good, hidden)]
model = get_model("observe_r1")(model="tiny", base_url=base_url)
messages = [{"role": "system", "content": "the task's own prompt"}, {"role": "user", "content": "How many?"}]
r = model.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, seed=0)
print(json.dumps({"scores": scores, "content": r.choices[0].message.content, "system": SYSTEM_PROMPT}))
"""


def test_lmms_eval_scores_the_answer_and_sees_the_raw_text(server, synth_dir):
    """In lmms-eval's environment: with our reasoning tags, the local task scores the <answer> block
    (a right number inside <observe>/<think> does not count), and the `observe_r1` model returns the
    server's raw text, asked with the Observe-R1 system prompt instead of the task's."""
    import httpx

    from observe_r1_eval import suites

    doc = {"id": "x", "images": [], "question": "How many cyan shapes?", "answer": "2", "choices": []}
    proc = subprocess.run(
        [str(REPO / ".venv-eval" / "bin" / "python"), "-c", LMMS_CHECK, json.dumps(suites.reasoning_tags()),
         json.dumps(doc), f"{server.base_url}/v1", str(REPO / "eval" / "tasks" / "local")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["scores"] == [1.0, 0.0]
    direct = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": "tiny", "max_tokens": 12, "temperature": 0, "seed": 0, "return_raw_text": True,
              "messages": [{"role": "system", "content": got["system"]}, {"role": "user", "content": "How many?"}]},
        timeout=120,
    ).json()["choices"][0]["message"]  # fmt: skip
    assert got["content"] == direct["raw"]


def test_judge_settings_become_the_variables_lmms_eval_tasks_read(monkeypatch):
    import argparse

    from observe_r1_eval import run, suites

    general = suites.select("general", None)
    args = argparse.Namespace(
        judge_model="judge-1", judge_base_url="http://judge:9000/v1/", judge_api_key_env="MY_JUDGE_KEY"
    )
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(lmms.EvalError, match=r"\$MY_JUDGE_KEY \(--judge-api-key-env\) is empty"):
        run.judge_environment(general, args)
    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    env = run.judge_environment(general, args)
    assert env["JUDGE_MODEL_NAME"] == env["MODEL_VERSION"] == "judge-1"
    assert env["JUDGE_BASE_URL"] == "http://judge:9000/v1"
    assert env["OPENAI_API_URL"] == "http://judge:9000/v1/chat/completions"
    assert env["JUDGE_API_KEY"] == env["OPENAI_API_KEY"] == "k"
    assert env["USE_LLM_JUDGE"] == "True"


def task_env(benchmarks):
    """The environment eval/run.py gives lmms-eval for these benchmarks when no judge is named."""
    import argparse

    from observe_r1_eval import run

    no_judge = run.judge_environment(
        [b for b in benchmarks if b.judge != "required"], argparse.Namespace(judge_model=None)
    )
    return {**os.environ, **no_judge, "PYTHONPATH": str(REPO)}


def test_every_task_of_every_suite_loads_in_lmms_evals_environment(tmp_path):
    """Each task's YAML, functions and the modules its code imports (MathVista's scorer needs Levenshtein,
    which lmms-eval does not install), as lmms-eval loads them before a run, stopping before the data."""
    from observe_r1_eval import run, suites

    benchmarks = [b for entries in suites.load_suites().values() for b in entries]
    include = run.prepare_tasks(tmp_path, None, local=True)
    problems = lmms.check_tasks(
        lmms.lmms_python(), include, [b.task for b in benchmarks], task_env(benchmarks)
    )
    assert problems == {}


def test_a_task_whose_code_needs_a_missing_module_is_named(tmp_path):
    folder = tmp_path / "tasks" / "probe"
    folder.mkdir(parents=True)
    task = "dataset_path: json\ntask: {name}\noutput_type: generate_until\ndoc_to_text: !function {module}.doc_to_text\n"
    (folder / "lazy.yaml").write_text(task.format(name="probe_lazy", module="lazy_utils"))
    (folder / "lazy_utils.py").write_text(
        "def doc_to_text(doc):\n    import not_installed_scorer\n    return doc['q']\n\n"
        "def optional():\n    try:\n        import not_installed_extra\n    except ImportError:\n        pass\n"
    )
    (folder / "eager.yaml").write_text(task.format(name="probe_eager", module="eager_utils"))
    (folder / "eager_utils.py").write_text(
        "import not_installed_at_top\n\ndef doc_to_text(doc):\n    return ''\n"
    )
    names = ["probe_lazy", "probe_eager", "no_such_task_xyz"]
    problems = lmms.check_tasks(
        lmms.lmms_python(), tmp_path / "tasks", names, {**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert problems["probe_lazy"] == "its code imports modules that are not installed: not_installed_scorer"
    assert "No module named 'not_installed_at_top'" in problems["probe_eager"]
    assert problems["no_such_task_xyz"] == "lmms-eval knows no such task"
