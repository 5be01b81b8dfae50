"""Shared fixtures: the tiny model and a small synthetic set, built once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from observe_r1.net import free_port

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


# The sampling defaults Qwen2.5-VL's checkpoints ship (near-greedy: top_k 1, a tiny top_p, a penalty).
QWEN_LIKE_SAMPLING = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.001,
    "top_k": 1,
    "repetition_penalty": 1.05,
}


def qwen_like_copy(model_dir: Path, target: Path) -> Path:
    """A copy of `model_dir` whose generation config carries Qwen2.5-VL's sampling defaults."""
    import json
    import shutil

    shutil.copytree(model_dir, target)
    path = target / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **QWEN_LIKE_SAMPLING}, indent=2))
    return target


@pytest.fixture(scope="session")
def qwen_like_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's weights with Qwen2.5-VL's sampling defaults in its generation config."""
    return qwen_like_copy(tiny_model_dir, tmp_path_factory.mktemp("models") / "tiny-qwen-like")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from observe_r1.synth import generate

    return generate(tmp_path_factory.mktemp("data") / "synth", n=40, seed=0, progress=False).parent


class Server:
    """`observe-r1 serve` in a subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, *args: str, env: dict | None = None, log_dir: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [*CLI, "serve", "--model", str(model_dir), "--port", str(self.port)]
        command += ["--served-model-name", "tiny", *args]
        self.proc = subprocess.Popen(
            command,
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 120) -> "Server":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_server(tiny_model_dir, tmp_path):
    """Start servers on the tiny model with extra options; all are stopped at the end of the test."""
    servers = []

    def start(*args: str, env: dict | None = None, model: Path | None = None, ready: bool = True) -> Server:
        server = Server(model or tiny_model_dir, *args, env=env, log_dir=tmp_path)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """One shared server with default settings, for tests that do not change them."""
    s = Server(tiny_model_dir, log_dir=tmp_path_factory.mktemp("server")).wait_ready()
    yield s
    s.stop()
