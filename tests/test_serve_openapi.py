"""The OpenAPI document tells the truth: schemathesis, with all its checks, against the real server
(`serve/openapi.py` puts the running server's limits into FastAPI's document)."""

import shutil
import subprocess
import sys
from pathlib import Path

import httpx


def test_the_document_carries_the_running_servers_limits(server):
    doc = httpx.get(f"{server.base_url}/openapi.json").json()
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["model"]["enum"] == ["tiny"]
    assert "422" not in doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "/v1/completions" in doc["paths"]
    r = httpx.delete(f"{server.base_url}/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_every_reference_in_the_document_resolves(server):
    doc = httpx.get(f"{server.base_url}/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(doc))
    assert "#/components/schemas/ChatCompletionChunk" in found  # the event stream's chunks
    schemas = doc["components"]["schemas"]
    assert {r for r in found if r.removeprefix("#/components/schemas/") not in schemas} == set()


def test_schemathesis_finds_no_disagreement_between_document_and_server(start_server, tmp_path):
    s = start_server("--max-completion-tokens", "16", "--max-n", "2")
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    command = [st, "run", f"{s.base_url}/openapi.json", "--checks", "all", "--max-examples", "25"]
    # Every check but one: "schema-valid request accepted" cannot hold for an image URL, whose bytes
    # must decode to an image the model takes, which no JSON Schema can say (the 400 names the part).
    command += ["--exclude-checks", "positive_data_acceptance"]
    command += ["--request-timeout", "60", "--generation-deterministic", "--no-color"]
    # Run in tmp_path: schemathesis keeps a cache folder in its working directory.
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
