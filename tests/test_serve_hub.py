"""`observe-r1 serve --model OWNER/NAME`: a Hub id is read from the Hub cache (here one laid out by the test,
offline, as huggingface_hub writes it) and served as that folder."""

from pathlib import Path

import httpx
import huggingface_hub.constants
import pytest
from conftest import Server

from observe_r1.errors import UserError
from observe_r1.tiny_model import build
from observe_r1_serve.config import ServerConfig
from observe_r1_serve.hub import resolve_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hub cache holding `org/tiny` at `main`, the tiny model as its snapshot."""
    repo = tmp_path / "hub" / "models--org--tiny"
    build(repo / "snapshots" / REVISION, size="tiny", seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_a_hub_id_resolves_to_its_cached_snapshot(hub_cache):
    config = ServerConfig(model=Path("org/tiny"))
    resolve_model(config)
    assert config.model == hub_cache / "hub" / "models--org--tiny" / "snapshots" / REVISION
    assert config.model_name == "org/tiny"
    named = ServerConfig(model=Path("org/tiny"), served_model_name="mine")
    resolve_model(named)
    assert named.model_name == "mine"


def test_a_hub_id_without_a_copy_is_refused(hub_cache):
    with pytest.raises(UserError, match=r"--model org/absent is no local folder, and the Hub gave no copy"):
        resolve_model(ServerConfig(model=Path("org/absent")))
    with pytest.raises(UserError, match="model folder not found"):  # a path, not a Hub id
        resolve_model(ServerConfig(model=Path("no/such/folder")))


def test_the_server_serves_a_hub_id(hub_cache):
    server = Server(
        Path("org/tiny"), env={"HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1"}, log_dir=hub_cache
    )
    try:
        server.wait_ready()
        assert httpx.get(f"{server.base_url}/ready").json()["status"] == "ready"
    finally:
        server.stop()
