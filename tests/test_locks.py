"""The locks (locks/*.lock.txt) against pyproject.toml, and the installed environments against the locks."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("locks", REPO / "scripts" / "locks.py")
locks = importlib.util.module_from_spec(spec)
sys.modules["locks"] = locks  # dataclasses look their module up there
spec.loader.exec_module(locks)


@pytest.fixture
def project(tmp_path):
    """A copy of pyproject.toml and the locks that a test may edit."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "locks", tmp_path / "locks")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_the_checked_in_locks_match_pyproject():
    assert locks.check() == []
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "locks.py"), "check"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "match pyproject.toml" in proc.stdout


def test_a_dependency_added_without_relocking_is_named(project):
    edit(project / "pyproject.toml", 'train = ["deepspeed', 'train = ["pyfiglet>=1", "deepspeed')
    edit(project / "pyproject.toml", '"levenshtein>=0.25",', '"levenshtein>=0.25", "jiwer>=3",')
    problems = locks.check(project / "pyproject.toml", project / "locks")
    assert (
        "pyproject.toml declares 'pyfiglet>=1' (extra 'train'), which locks/main-cpu.lock.txt does not pin"
        in problems
    )
    assert (
        "pyproject.toml declares 'pyfiglet>=1' (extra 'train'), which locks/main-cuda.lock.txt does not pin"
        in problems
    )
    for lock in ("eval-cpu", "image-eval"):
        assert (
            f"pyproject.toml declares 'jiwer>=3' (dependency group 'eval-harness'), which locks/{lock}.lock.txt "
            "does not pin"
        ) in problems
    assert (
        "pyproject.toml declares 'pyfiglet>=1' (extra 'train'), which locks/image-cpu.lock.txt does not pin"
        in problems
    )
    assert len(problems) == 5


def test_the_image_environments_share_torch_with_the_main_one(project):
    """The image's environments hard-link torch and the CUDA libraries from one cache: their pins must be
    the main CUDA environment's."""
    cuda = locks.read_lock(REPO / "locks" / "main-cuda.lock.txt")
    for name in ("image-eval", "image-cpu"):
        pins = locks.read_lock(REPO / "locks" / f"{name}.lock.txt")
        assert pins["torch"][0] == cuda["torch"][0]
        assert pins["nvidia-cudnn-cu13"][0] == cuda["nvidia-cudnn-cu13"][0]
    edit(project / "locks" / "image-eval.lock.txt", f"torch=={cuda['torch'][0]} ", "torch==2.12.0 ")
    assert locks.check(project / "pyproject.toml", project / "locks") == [
        f"locks/image-eval.lock.txt pins torch==2.12.0, but locks/main-cuda.lock.txt has {cuda['torch'][0]} "
        "and the two must agree"
    ]


def test_a_range_the_lock_no_longer_satisfies_is_named(project):
    edit(project / "pyproject.toml", '"transformers>=5.17,<6"', '"transformers>=6"')
    problems = locks.check(project / "pyproject.toml", project / "locks")
    pinned = locks.read_lock(REPO / "locks" / "main-cpu.lock.txt")["transformers"][0]
    assert (
        f"locks/main-cpu.lock.txt pins transformers=={pinned}, which no longer satisfies 'transformers>=6' "
        "([project] dependencies in pyproject.toml)"
    ) in problems


def test_a_marker_that_does_not_apply_here_needs_no_pin(project):
    edit(
        project / "pyproject.toml",
        'train = ["deepspeed',
        'train = ["pywin32>=300; sys_platform == \'win32\'", "deepspeed',
    )
    assert locks.check(project / "pyproject.toml", project / "locks") == []


def test_a_hand_edited_lock_is_refused(project):
    lock = project / "locks" / "eval-cpu.lock.txt"
    text = lock.read_text()
    # A pin without its hashes, an excluded package, and math-verify apart from the main environment.
    text = re.sub(r"(?m)^(pillow==\S+) \\\n(    --hash=\S+( \\)?\n)+", r"\1\n", text)
    text = text.replace("math-verify==", "math-verify==0.1.0 \\\n    --hash=sha256:00\n#", 1)
    lock.write_text(text + "torchvision==0.28.0 \\\n    --hash=sha256:00\n")
    problems = locks.check(project / "pyproject.toml", project / "locks")
    assert "locks/eval-cpu.lock.txt pins pillow without a hash" in problems
    assert "locks/eval-cpu.lock.txt pins torchvision, which it must exclude" in problems
    assert any(
        p.startswith("locks/eval-cpu.lock.txt pins math-verify==0.1.0, but the main environment")
        for p in problems
    )


def test_a_missing_lock_is_named(project):
    (project / "locks" / "vllm-cpu.lock.txt").unlink()
    assert locks.check(project / "pyproject.toml", project / "locks") == [
        "locks/vllm-cpu.lock.txt is missing (the lock of .venv-vllm)"
    ]


FREEZE = "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"


@pytest.mark.parametrize(
    "venv, lock", [(".venv", "main-cpu"), (".venv-vllm", "vllm-cpu"), (".venv-eval", "eval-cpu")]
)
def test_each_environment_holds_exactly_what_its_lock_pins(venv, lock):
    python = REPO / venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{venv} is not set up")
    out = subprocess.run([str(python), "-c", FREEZE], capture_output=True, text=True, check=True).stdout
    installed = {locks.canonicalize_name(k): v for k, v in json.loads(out).items()}
    assert installed.pop("observe-r1") == "0.1.0"
    pinned = {k: str(v) for k, (v, _) in locks.read_lock(REPO / "locks" / f"{lock}.lock.txt").items()}
    assert installed == pinned
