"""Evaluate a model with lmms-eval and report accuracy, format compliance and reasoning-chain length.

    python eval/run.py --suite reasoning        # the server at $OPENAI_BASE_URL or 127.0.0.1:8000
    python eval/run.py --suite reasoning --base-url http://host:8000/v1 --model observe-r1 \
        --tokenizer runs/model --output runs/eval/observe-r1
    python eval/run.py compare runs/eval/a runs/eval/b

Each lmms-eval task runs as its own subprocess and leaves OUTPUT/done/TASK.json once its samples are
read back and checked, so a run that is interrupted and started again skips the finished tasks. Every
check that can fail without running a model (suite and task names, the judge, the tokenizer, the
server and its model name, the local data) is made before the first task starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python eval/run.py`: make the repository importable as a package root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from observe_r1.command import Command  # noqa: E402
from observe_r1.errors import UserError  # noqa: E402
from observe_r1.format import DEFAULT_VARIANT, VARIANTS, variant_spec  # noqa: E402
from observe_r1.io import atomic_write_text  # noqa: E402
from observe_r1_eval import lmms, report, suites  # noqa: E402
from observe_r1_eval.lmms import EvalError  # noqa: E402

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
SYNTH_SIZE = 64
SETTINGS = (
    "backend",
    "model",
    "base_url",
    "model_args",
    "limit",
    "max_new_tokens",
    "local_data",
    "format_variant",
)


def log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=[*suites.load_suites(), "all"], help="a suite of eval/suites.yaml")
    what.add_argument(
        "--tasks", type=lambda s: [t for t in s.split(",") if t], help="lmms-eval task names, comma-separated"
    )
    p.add_argument(
        "--model",
        help="the served model name (openai backend; default: the server's only model) or checkpoint (vllm)",
    )
    p.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
        help=f"OpenAI-compatible server (openai backend; default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})",
    )
    p.add_argument(
        "--backend", choices=lmms.BACKENDS, default="openai", help="vllm: lmms-eval loads --model itself"
    )
    p.add_argument("--model-args", default="", help="extra key=value,... for lmms-eval's model")
    p.add_argument(
        "--tokenizer",
        help="tokenizer of the served model for the lengths (default: --model if a folder, else the "
        "server's /tokenize, which ours and vLLM's have)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N samples of each task")
    p.add_argument("--max-new-tokens", type=int, help="override the tasks' generation length")
    p.add_argument("--output", type=Path, help="run folder (default runs/eval/MODEL)")
    p.add_argument(
        "--local-data", type=Path, help=f"data file of the local suite (default: {SYNTH_SIZE} synthetic rows)"
    )
    p.add_argument(
        "--nested-observe", action="store_true", help="format check also accepts <observe> nested in <think>"
    )
    p.add_argument(
        "--format-variant",
        choices=VARIANTS,
        default=DEFAULT_VARIANT,
        help="the model's output format: observe (<observe><think><answer>) or think (<think><answer>); the\n"
        "system prompt sent (openai backend), the format rate and the part lengths follow it",
    )
    p.add_argument("--judge-model", help="LLM judge for tasks that use one (e.g. gpt-4o-mini)")
    p.add_argument(
        "--judge-base-url", default="https://api.openai.com/v1", help="the judge's OpenAI-compatible API"
    )
    p.add_argument(
        "--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key"
    )
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/run.py compare", description="put several runs side by side")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each holds report.json)")
    p.add_argument("--output", type=Path, help="also write the table to this markdown file")
    return p


def judge_environment(benchmarks: list[suites.Benchmark], args: argparse.Namespace) -> dict[str, str]:
    """The environment variables that give lmms-eval's judged tasks their judge; refuses a missing one."""
    needs = [b.task for b in benchmarks if b.judge == "required"]
    if not args.judge_model:
        if needs:
            raise EvalError(
                f"{', '.join(needs)} cannot be scored without an LLM judge: pass --judge-model "
                "(and --judge-base-url, --judge-api-key-env), or leave them out with --tasks"
            )
        # lmms-eval's MathVerse module builds its judge's client on import, and the openai package refuses to
        # build one without a key; with the judge off, the rule-based scorers never call it.
        return {"USE_LLM_JUDGE": "False", "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY") or "no-judge"}
    key = os.environ.get(args.judge_api_key_env)
    if not key:
        raise EvalError(f"--judge-model is set but ${args.judge_api_key_env} (--judge-api-key-env) is empty")
    mapping = suites.judge_env()
    base = args.judge_base_url.rstrip("/")
    values = {
        "model": args.judge_model,
        "base_url": base,
        "chat_completions_url": f"{base}/chat/completions",
        "api_key": key,
    }
    env = {var: values[name] for name, variables in mapping.items() if name != "fixed" for var in variables}
    return env | mapping["fixed"]


def _auth_headers() -> dict[str, str]:
    key = os.environ.get("OBSERVE_R1_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_models(base_url: str) -> list[str]:
    """The model names the server lists at /models; says why and stops before lmms-eval starts when it
    cannot be asked."""
    import httpx

    url = f"{base_url.rstrip('/')}/models"
    try:
        response = httpx.get(url, headers=_auth_headers(), timeout=30)
    except httpx.HTTPError as e:
        raise EvalError(
            f"cannot reach the server at {base_url} ({type(e).__name__}: {e}); is it running?"
        ) from e
    if response.status_code != 200:
        raise EvalError(
            f"the server at {base_url} answered {response.status_code} to GET {url}: {response.text[:500]}"
        )
    return [m.get("id") for m in response.json().get("data", [])]


def served_model(base_url: str, model: str | None) -> str:
    """`model` if the server serves it, or with no `model` the server's only one."""
    served = served_models(base_url)
    if model is None:
        if len(served) != 1:
            raise EvalError(
                f"the server at {base_url} serves {len(served)} models ({', '.join(served) or 'none'}): "
                "pass --model to pick one"
            )
        return served[0]
    if model not in served:
        raise EvalError(
            f"the server at {base_url} does not serve model '{model}' (it serves: {', '.join(served) or 'none'})"
        )
    return model


def server_token_counter(base_url: str, model: str) -> Callable[[str], int] | None:
    """Token counts from the server's own tokenizer (POST /tokenize, which our server and vLLM's
    have), or None when the server has no such endpoint."""
    import httpx

    client = httpx.Client(headers=_auth_headers(), timeout=60)
    url = base_url.rstrip("/").removesuffix("/v1") + "/tokenize"

    def tokenize(text: str) -> httpx.Response:
        return client.post(url, json={"model": model, "prompt": text, "add_special_tokens": False})

    try:
        probe = tokenize("observe")
    except httpx.HTTPError:
        return None
    if probe.status_code != 200 or "count" not in probe.json():
        return None

    def count(text: str) -> int:
        response = tokenize(text)
        if response.status_code != 200:
            raise EvalError(f"POST {url} answered {response.status_code}: {response.text[:500]}")
        return response.json()["count"]

    return count


def token_counter(args: argparse.Namespace) -> Callable[[str], int]:
    """The lengths' tokenizer: --tokenizer, the checkpoint folder, or the server's /tokenize."""
    local = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    if local is not None:
        return report.token_counter(local)
    counter = server_token_counter(args.base_url, args.model) if args.backend == "openai" else None
    if counter is None:
        raise EvalError(
            "pass --tokenizer (the served model's folder or hub id): the lengths are counted in its tokens, "
            f"and the server at {args.base_url} has no /tokenize endpoint to count them"
        )
    return counter


def prepare_tasks(out: Path, local_data: Path | None, local: bool) -> Path:
    """OUTPUT/lmms-tasks, the one folder lmms-eval's --include_path takes: a copy of eval/tasks in which
    every task folder with a `_data_yaml` (the local tasks, and copies of them) reads a validated,
    normalised copy of the local data (absolute image paths, the same columns in every row, so
    lmms-eval's json loader reads any file observe_r1.data accepts)."""
    folder = out / "lmms-tasks"
    shutil.copytree(
        suites.TASKS_DIR, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    if not local and local_data is None:
        return folder
    from observe_r1.data import load_samples

    if local_data is None:
        from observe_r1.synth import generate

        local_data = out / "local-data" / "data.jsonl"
        if not local_data.exists():
            generate(local_data.parent, n=SYNTH_SIZE, seed=0, progress=False, overwrite=True)
    rows = [
        {
            "id": s.id,
            "images": s.images,
            "question": s.question,
            "answer": s.answer,
            "choices": s.choices or [],
        }
        for s in load_samples(local_data)
    ]
    data = folder / "local-data.jsonl"
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    data_yaml = {"dataset_kwargs": {"data_files": {"test": str(data.resolve())}}}
    for path in folder.rglob("_data_yaml"):
        atomic_write_text(path, json.dumps(data_yaml) + "\n")  # JSON is YAML
    return folder


def check_settings(out: Path, settings: dict) -> None:
    """A restarted run must be the same run: finished tasks of other settings are not mixed into one report."""
    path = out / "run.json"
    if path.exists() and any((out / "done").glob("*.json")):
        old = json.loads(path.read_text())
        changed = [
            f"{k}: {old.get(k)!r} before, {settings[k]!r} now" for k in SETTINGS if old.get(k) != settings[k]
        ]
        if changed:
            raise EvalError(
                f"{out} holds finished tasks of other settings ({'; '.join(changed)}); use another --output"
            )


def evaluate_task(bench, args, python, target, include_path, out, env, count_tokens) -> dict:
    """Run one task with lmms-eval, check its samples are model output, and return its report row."""
    task_dir = out / "lmms" / bench.task
    shutil.rmtree(task_dir, ignore_errors=True)  # what an interrupted attempt left
    cmd = lmms.command(
        python,
        bench.task,
        target,
        include_path,
        task_dir,
        suites.reasoning_tags(),
        args.limit,
        args.max_new_tokens,
    )
    lmms.run(cmd, task_dir / "lmms-eval.log", env)
    results_path, samples_path = lmms.outputs(task_dir, bench.task)
    texts = lmms.responses(samples_path)
    failed = lmms.failures(texts)
    if failed:
        raise EvalError(
            f"{bench.task}: {len(failed)} of {len(texts)} requests to the model failed, so its score would be "
            f"meaningless; first error: {failed[0][:500]}"
        )
    if not texts:
        raise EvalError(f"{bench.task}: lmms-eval logged no samples ({samples_path})")
    metric, acc = lmms.accuracy(results_path, bench.task, bench.metric)
    stats = report.chain_stats(texts, count_tokens, args.nested_observe, args.format_variant)
    return {
        "benchmark": bench.benchmark,
        "task": bench.task,
        "metric": metric,
        "accuracy": acc,
        **stats,
        "results": str(results_path),
        "samples_file": str(samples_path),
    }


def run(args: argparse.Namespace) -> int:
    variant_spec(args.format_variant, args.nested_observe, ("--nested-observe", "--format-variant"))
    benchmarks = suites.select(args.suite, args.tasks)
    python = lmms.lmms_python()
    judge = judge_environment(benchmarks, args)
    if args.backend == "openai":
        args.model = served_model(args.base_url, args.model)
    elif args.model is None:
        raise EvalError("--model: the vllm backend needs the checkpoint to load")
    count_tokens = token_counter(args)
    out = args.output or Path("runs/eval") / Path(args.model).name
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["local_data"] = str(args.local_data) if args.local_data else None
    check_settings(out, settings)
    include_path = prepare_tasks(out, args.local_data, local=any(b.is_local for b in benchmarks))
    env = {
        **os.environ,
        **judge,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(lmms.REPO), os.environ.get("PYTHONPATH")])),
    }
    if not all(b.is_local for b in benchmarks):
        log("loading the tasks with lmms-eval ...")
        problems = lmms.check_tasks(python, include_path, [b.task for b in benchmarks], env)
        if problems:
            raise EvalError(
                "lmms-eval cannot run these tasks:\n" + "".join(f"  {t}: {p}\n" for t, p in problems.items())
            )
    atomic_write_text(out / "run.json", json.dumps(settings, indent=2) + "\n")

    target = lmms.Target(args.backend, args.model, args.base_url, args.model_args, args.format_variant)
    rows, timings = [], []
    for i, bench in enumerate(benchmarks, 1):
        done = out / "done" / f"{bench.task}.json"
        if done.exists():
            log(f"[{i}/{len(benchmarks)}] {bench.task}: already done, skipping")
            rows.append(json.loads(done.read_text()))
            continue
        log(f"[{i}/{len(benchmarks)}] {bench.task}: running lmms-eval")
        start = time.monotonic()
        row = evaluate_task(bench, args, python, target, include_path, out, env, count_tokens)
        row["seconds"] = round(time.monotonic() - start, 1)
        atomic_write_text(done, json.dumps(row, indent=2) + "\n")
        rows.append(row)
        timings.append(row["seconds"])
        eta = sum(timings) / len(timings) * (len(benchmarks) - i)
        log(
            f"[{i}/{len(benchmarks)}] {bench.task}: accuracy {row['accuracy']:.3f}, format {row['format_rate']:.3f}, "
            f"{row['seconds']:.0f}s; ETA {eta:.0f}s for {len(benchmarks) - i} more"
        )
    text = report.write(rows, out, title=f"{args.model} ({args.suite or 'tasks'})")
    print(text)
    log(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return 0


def compare(args: argparse.Namespace) -> int:
    runs = {}
    for folder in args.runs:
        path = folder / "report.json"
        if not path.exists():
            raise EvalError(f"{folder} has no report.json: not a finished eval/run.py run")
        runs[folder.name if folder.name not in runs else str(folder)] = json.loads(path.read_text())[
            "benchmarks"
        ]
    text = report.compare_markdown(runs)
    if args.output:
        atomic_write_text(args.output, text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        args, action = compare_parser().parse_args(argv[1:]), compare
    else:
        args, action = run_parser().parse_args(argv), run
    try:
        return action(args)
    except UserError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eval: interrupted; finished tasks are kept and skipped on the next run", file=sys.stderr)
        return 130


EVAL = Command(help="lmms-eval suites and the chain-length report (eval/run.py)", run=main, passthrough=True)

if __name__ == "__main__":
    sys.exit(main())
