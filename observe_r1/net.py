"""Loopback helpers for the commands that start servers: a free port, and waiting for a server's `/ready`."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

from observe_r1.errors import UserError


class ServerNotReady(UserError, TimeoutError):
    """The server did not turn ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(base_url: str, timeout: float, alive=None) -> None:
    """Poll the server's `/ready` (next to `/v1`) until the model is loaded; `alive`, when given, is
    asked between polls and False stops the wait (the server process has exited)."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while not _ready(f"{root}/ready"):
        if alive is not None and not alive():
            raise ServerNotReady(f"the server at {root} exited before it was ready")
        if time.monotonic() > deadline:
            raise ServerNotReady(f"the server at {root} was not ready within {timeout:.0f}s")
        time.sleep(0.25)
