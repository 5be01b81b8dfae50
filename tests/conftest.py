"""Shared fixtures: the tiny model and a small synthetic set, built once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLI = [sys.executable, "-m", "observe_r1.cli"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `observe-r1 ARGS` in a subprocess, as a user would."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"observe-r1 {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from observe_r1.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from observe_r1.synth import generate

    return generate(tmp_path_factory.mktemp("data") / "synth", n=40, seed=0, progress=False).parent
