"""Load lmms-eval tasks as far as one can without their data, inside lmms-eval's environment.

    .venv-eval/bin/python eval/task_check.py INCLUDE_PATH TASK...

For each task (a group: each of its tasks) this reads its YAML as lmms-eval does before a run, which
imports the task's Python modules and resolves every `!function` (prompt, visual, processing, metric and
aggregation functions), then reads those modules and every lmms-eval task module they brought in, and
looks up each module they import, at the top or inside a function (a scorer that imports its library
only when it scores). Nothing is downloaded. Prints one JSON object: task -> what is wrong, or null.

lmms-eval leaves its tasks' dependencies to the user, so this is what tells, before a long run starts
(eval/run.py calls it) and in the tests, that the eval environment has what the suites need.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import sys


def module_files(value, found: set[str]) -> None:
    """The source files of the functions in a loaded task config (nested lists and dicts included)."""
    if callable(value):
        try:
            found.add(inspect.getfile(value))
        except TypeError:
            pass
    elif isinstance(value, dict):
        for v in value.values():
            module_files(v, found)
    elif isinstance(value, list):
        for v in value:
            module_files(v, found)


CATCHES_IMPORT_ERROR = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _imports(node: ast.AST) -> set[str]:
    """The absolute module names that the imports under `node` name."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            names |= {alias.name for alias in sub.names}
        elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
            names.add(sub.module)
    return names


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    caught = {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)}
    caught |= {n.attr for n in ast.walk(handler.type) if isinstance(n, ast.Attribute)}
    return bool(caught & CATCHES_IMPORT_ERROR)


def required_imports(path: str) -> set[str]:
    """The modules a source file imports, wherever in it, except inside a `try` that catches the
    ImportError (a module the task treats as optional)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for inner in node.body:
                optional |= _imports(inner)
    return _imports(tree) - optional


def missing_modules(files: set[str]) -> set[str]:
    """The top-level modules that `files`, and the lmms-eval task modules they import, need and lack."""
    missing, seen, todo = set(), set(), list(files)
    while todo:
        path = todo.pop()
        if path in seen or not path.endswith(".py"):
            continue
        seen.add(path)
        for module in required_imports(path):
            top = module.split(".")[0]
            if importlib.util.find_spec(top) is None:
                missing.add(top)
            elif module.startswith("lmms_eval.tasks"):
                spec = importlib.util.find_spec(module)
                if spec is not None and spec.origin:
                    todo.append(spec.origin)
    return missing


def check_task(manager, name: str, files: set[str]) -> None:
    """Load `name` (a group: its tasks), adding the source files of its functions to `files`."""
    config = manager._get_config(name)
    subtasks = config.get("task") if isinstance(config.get("task"), list) else []
    for sub in subtasks:
        check_task(manager, sub if isinstance(sub, str) else sub["task"], files)
    module_files(config, files)


def main(include_path: str, tasks: list[str]) -> dict[str, str | None]:
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    problems: dict[str, str | None] = {}
    for task in tasks:
        if task not in known:
            problems[task] = "lmms-eval knows no such task"
            continue
        files: set[str] = set()
        try:
            check_task(manager, task, files)
        except Exception as e:  # noqa: BLE001 - any failure of a task's own code is what this reports
            problems[task] = f"loading it fails: {type(e).__name__}: {e}"
            continue
        missing = sorted(missing_modules(files))
        problems[task] = (
            f"its code imports modules that are not installed: {', '.join(missing)}" if missing else None
        )
    return problems


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
